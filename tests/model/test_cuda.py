"""The model runtime on a CUDA device: the same exactness contracts as on CPU.

fp32 on CUDA equals transformers' fp32 reference (CPU) within the fp32 logit bound; bf16 (the CUDA
default) is bounded by transformers' own bf16 error on the same device; batched steps, every KV
policy, saved sessions and the Mamba decoder behave on the GPU as they do on the CPU.
Skipped where no CUDA device is present (the `gpu` marker).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from streamctx import Engine
from tests.fixtures.tiny_models import make_tiny_llama, make_tiny_mamba, reference_logits
from tests.model.test_batching import POLICIES as BATCH_POLICIES
from tests.tolerances import assert_close, assert_lowp_close

pytestmark = pytest.mark.gpu

VOCAB = 173
ATOL = 1e-4  # fp32 max abs logit difference vs transformers, as on CPU
LOGIT_SCALE = 10.0  # batched vs one at a time: fp32 tolerance x 10 (reduction order differs)

POLICIES: dict[str, Any] = {  # the policies of the batching tests, plus hierarchical
    **BATCH_POLICIES,
    "hierarchical": {"name": "hierarchical", "sinks": 2, "window": 8, "group": 4, "factor": 2, "per_level": 4,
                     "levels": 2, "slack": 3},
}


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("cuda") / "llama", hidden=63, heads=9, kv_heads=3, head_dim=8,
                           layers=2, vocab_size=VOCAB, tie=False, attention_bias=True, tokenizer="bytes")


def test_default_dtype_on_cuda_is_bf16(llama_folder: Path) -> None:
    engine = Engine.load(llama_folder, device="cuda")
    logits = engine.session("s").feed(_ids(9, 0), return_logits=True).logits
    assert logits.dtype == torch.bfloat16 and logits.device.type == "cuda"


def test_fp32_cuda_logits_match_transformers_streamed(llama_folder: Path) -> None:
    """One shot and streamed in uneven splits (prefill chunks straddle blocks), fp32 on the GPU."""
    ids = _ids(53, 1)
    ref = reference_logits(llama_folder, ids)
    engine = Engine.load(llama_folder, device="cuda", dtype=torch.float32, block_size=4, prefill_chunk=7)
    whole = engine.session("whole").feed(ids, return_logits=True).logits
    assert whole.device.type == "cuda"
    assert float((whole.cpu() - ref).abs().max()) <= ATOL
    s = engine.session("split")
    parts = [s.feed(ids[a:b], return_logits=True).logits for a, b in [(0, 1), (1, 12), (12, 13), (13, 40), (40, 53)]]
    assert float((torch.cat(parts).cpu() - ref).abs().max()) <= ATOL


def test_bf16_cuda_error_bounded_by_transformers_bf16(llama_folder: Path) -> None:
    import transformers

    ids = _ids(41, 2)
    ref = reference_logits(llama_folder, ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_folder, dtype=torch.bfloat16).to("cuda").eval()
    with torch.no_grad():
        theirs = hf(ids[None].cuda()).logits[0].cpu()
    ours = Engine.load(llama_folder, device="cuda").session("s").feed(ids, return_logits=True).logits.cpu()
    assert_lowp_close(ours, theirs, ref, factor=3.0, floor=1e-2)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_policies_on_cuda_match_cpu(llama_folder: Path, policy: str) -> None:
    """Each KV policy, driven past its budget on the GPU, gives the CPU run's logits (fp32)."""
    cpu = Engine.load(llama_folder, device="cpu", block_size=4, prefill_chunk=8)
    gpu = Engine.load(llama_folder, device="cuda", dtype=torch.float32, block_size=4, prefill_chunk=8)
    feeds = [_ids(37, 3)] + [_ids(1, 100 + i) for i in range(20)]
    a, b = cpu.session("s", policy=POLICIES[policy]), gpu.session("s", policy=POLICIES[policy])
    for i, ids in enumerate(feeds):
        want = a.feed(ids, return_logits=True).logits
        got = b.feed(ids, return_logits=True).logits
        assert_close(got.cpu(), want, scale=LOGIT_SCALE, msg=f"{policy} feed {i}")
    assert a.n_tokens == b.n_tokens


def test_batched_steps_on_cuda_equal_one_at_a_time(llama_folder: Path) -> None:
    engine = Engine.load(llama_folder, device="cuda", dtype=torch.float32, block_size=4, prefill_chunk=16)
    single = Engine.load(llama_folder, device="cuda", dtype=torch.float32, block_size=4, prefill_chunk=16)
    names = sorted(POLICIES)
    scripts = {f"s{i}": [_ids(5 + 7 * i, i)] + [_ids(1, 50 + 10 * i + k) for k in range(8)] for i in range(6)}
    want = {}
    for i, (sid, feeds) in enumerate(scripts.items()):
        s = single.session(sid, policy=POLICIES[names[i % len(names)]])
        want[sid] = [s.feed(ids, return_logits=True).logits for ids in feeds]
    tickets: dict[str, list[Any]] = {}
    for i, sid in enumerate(scripts):
        engine.session(sid, policy=POLICIES[names[i % len(names)]])
        tickets[sid] = []
    for k in range(9):
        for sid, feeds in scripts.items():
            tickets[sid].append(engine.submit(sid, feeds[k], return_logits=True))
        engine.step()
    engine.run_until_idle()
    for sid, ts in tickets.items():
        for k, t in enumerate(ts):
            assert t.done and t.error is None, t.error
            assert_close(t.feed.logits.cpu(), want[sid][k].cpu(), scale=LOGIT_SCALE, msg=f"{sid} request {k}")


def test_greedy_generation_batched_equals_alone_on_cuda(llama_folder: Path) -> None:
    engine = Engine.load(llama_folder, device="cuda", dtype=torch.float32, block_size=4)
    alone = {}
    for i in range(4):
        s = engine.session(f"a{i}")
        s.feed(_ids(11 + i, 200 + i))
        alone[i] = s.generate(max_new_tokens=12).token_ids
        s.close()
    tickets = {i: engine.submit(f"b{i}", _ids(11 + i, 200 + i).tolist(), generate=True, max_new_tokens=12)
               for i in range(4)}
    engine.run_until_idle()
    for i, t in tickets.items():
        assert t.generation.token_ids == alone[i]


def test_saved_cuda_session_restores_exactly_on_cuda_and_on_cpu(llama_folder: Path) -> None:
    gpu = Engine.load(llama_folder, device="cuda", dtype=torch.float32, block_size=4)
    cpu = Engine.load(llama_folder, device="cpu", block_size=4)
    s = gpu.session("s")
    s.feed(_ids(30, 4))
    blob = s.save()
    nxt = _ids(5, 5)
    want = s.feed(nxt, return_logits=True).logits
    again = gpu.session("s2", state=blob).feed(nxt, return_logits=True).logits
    assert torch.equal(again, want)  # same device, same kernels: bit-identical
    moved = cpu.session("s3", state=blob).feed(nxt, return_logits=True).logits
    assert_close(moved, want.cpu(), scale=LOGIT_SCALE)


def test_mamba_fp32_cuda_matches_transformers(tmp_path: Path) -> None:
    folder = make_tiny_mamba(tmp_path / "mamba", hidden=40, layers=2, state_size=8, vocab_size=VOCAB,
                             tokenizer="bytes")
    ids = _ids(33, 6)
    ref = reference_logits(folder, ids)
    engine = Engine.load(folder, device="cuda", dtype=torch.float32)
    s = engine.session("s")
    parts = [s.feed(ids[a:b], return_logits=True).logits for a, b in [(0, 10), (10, 11), (11, 33)]]
    assert float((torch.cat(parts).cpu() - ref).abs().max()) <= ATOL
