"""The model runtime and attention operator on one CUDA GPU, against transformers and torch SDPA.

Model: a SmolLM2-135M-shaped Llama (30 layers, hidden 576, 9 heads / 3 KV heads, head dim 64,
intermediate 1536, vocab 49152, tied) with random weights, bf16 on the GPU. Speed does not depend on
the weight values, and the real GGUF does not fit the device machine's transfer limit; quality is
measured on CPU with the real weights (benchmarks/model.py, benchmarks/longctx_quality.py).

Cells, all in one process and one run, each against its peer:
- prefill at 512 / 2K / 8K tokens: `Session.feed(ids)` vs transformers `model(ids, logits_to_keep=1)`
  (sdpa attention); both compute logits for the last row only.
- decode at 2K context: `Session.generate(N)` vs a transformers loop of
  `model(next, past_key_values=..., logits_to_keep=1)` with greedy argmax; tokens/s and share of the
  bandwidth bound (weights + attended KV bytes per token over the measured device copy rate).
- batched decode: 1 / 16 / 64 sessions at 512 tokens, each generating 32 tokens through
  `Engine.submit` + `run_until_idle`, vs the same sessions one at a time, and vs transformers'
  batched greedy loop over the same prompts (equal lengths: no padding).
- attention: `streamctx.operators.attention` vs `torch.nn.functional.scaled_dot_product_attention`
  (causal, [1, 9, T, 64] bf16 with 3 KV heads) at 8K and 32K tokens.
Each cell records the device's peak allocated memory (reset before the cell).

Run: `python benchmarks/gpu.py --out DIR` (writes gpu.json and gpu.md into DIR; ~3 minutes on an H200).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from streamctx import Engine  # noqa: E402
from streamctx.operators.attn import attention  # noqa: E402
from tests.fixtures.tiny_models import make_tiny_llama  # noqa: E402

SMOLLM2_SHAPE = dict(hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64, intermediate=1536, tie=True,
                     rope_theta=100000.0, max_position_embeddings=8192, vocab_size=49152)
DECODE_STEPS = 64
BATCH_NEW_TOKENS = 32


DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def timed(fn: Callable[[], Any], repeats: int = 3) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_mib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if DEVICE == "cuda" else None


def copy_rate_gbps(elements: int = 2**30) -> float:
    """Device memory read+write rate of a device-to-device copy (bytes read + written)."""
    a = torch.empty(elements, dtype=torch.bfloat16, device=DEVICE)
    b = torch.empty_like(a)
    dt = timed(lambda: b.copy_(a), repeats=10)
    del a, b
    return 2 * 2 * elements / dt / 1e9


def ids_of(n: int, seed: int, vocab: int = 512) -> torch.Tensor:
    """Random ids below 512: valid for the full and the smoke vocabulary (speed does not depend on them)."""
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def prefill_cells(engine: Engine, hf: Any, lengths: tuple[int, ...]) -> list[dict[str, Any]]:
    rows = []
    for n in lengths:
        ids = ids_of(n, n)
        counter = iter(range(10**6))

        def ours() -> None:
            s = engine.session(f"p{n}-{next(counter)}")
            s.feed(ids)
            s.close()

        def theirs() -> None:
            with torch.no_grad():
                hf(ids[None].to(DEVICE), logits_to_keep=1)

        reset_peak()
        t_ours = timed(ours)
        mem_ours = peak_mib()
        reset_peak()
        t_hf = timed(theirs)
        mem_hf = peak_mib()
        rows.append(dict(cell=f"prefill_{n}", tok_s=n / t_ours, peer_tok_s=n / t_hf, vs_peer=t_hf / t_ours,
                         peak_mib=mem_ours, peer_peak_mib=mem_hf))
        print(rows[-1], flush=True)
    return rows


def hf_greedy(hf: Any, ids: torch.Tensor, steps: int) -> float:
    """Seconds for `steps` greedy decode forwards of transformers after prefilling `ids` [B, T]."""
    with torch.no_grad():
        out = hf(ids.to(DEVICE), use_cache=True, logits_to_keep=1)
        pkv = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            out = hf(nxt, past_key_values=pkv, use_cache=True, logits_to_keep=1)
            pkv = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        return time.perf_counter() - t


def decode_cell(engine: Engine, hf: Any, weight_bytes: int, rate_gbps: float, ctx: int) -> dict[str, Any]:
    ids = ids_of(ctx, 7)
    cfg = hf.config
    kv_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
    bound = rate_gbps * 1e9 / 2 / (weight_bytes + kv_bytes * (ctx + DECODE_STEPS // 2))  # reads: half the copy rate
    reset_peak()
    s = engine.session("decode")
    s.feed(ids)
    s.generate(4)  # warm-up
    sync()
    t = time.perf_counter()
    s.generate(DECODE_STEPS + 1)  # DECODE_STEPS forwards; the last token stays pending
    sync()
    ours = DECODE_STEPS / (time.perf_counter() - t)
    mem = peak_mib()
    s.close()
    hf_greedy(hf, ids[None, :256], 4)  # warm-up
    reset_peak()
    theirs = DECODE_STEPS / hf_greedy(hf, ids[None], DECODE_STEPS)
    row = dict(cell=f"decode_{ctx}", tok_s=ours, peer_tok_s=theirs, vs_peer=ours / theirs, bound_tok_s=bound,
               of_bound=ours / bound, peer_of_bound=theirs / bound, peak_mib=mem, peer_peak_mib=peak_mib())
    print(row, flush=True)
    return row


def batch_cells(engine: Engine, hf: Any, context: int, counts: tuple[int, ...]) -> list[dict[str, Any]]:
    rows = []
    prompt = ids_of(context, 11)
    base = engine.session("base")
    base.feed(prompt)
    blob = base.save()
    base.generate(BATCH_NEW_TOKENS)  # warm-up
    base.close()
    for n in counts:
        def clones(tag: str) -> list[str]:
            return [engine.session(f"{tag}{n}-{i}", state=blob).id for i in range(n)]

        sids = clones("one")[:4]  # one at a time: a rate, so 4 sessions measure it
        sync()
        t = time.perf_counter()
        for sid in sids:
            engine.sessions[sid].generate(BATCH_NEW_TOKENS)
        sync()
        one_at_a_time = len(sids) * BATCH_NEW_TOKENS / (time.perf_counter() - t)
        for sid in list(engine.sessions):
            if sid.startswith("one"):
                engine.sessions[sid].close()
        sids = clones("batch")
        reset_peak()
        sync()
        t = time.perf_counter()
        tickets = [engine.submit(sid, generate=True, max_new_tokens=BATCH_NEW_TOKENS) for sid in sids]
        engine.run_until_idle()
        sync()
        batched = n * BATCH_NEW_TOKENS / (time.perf_counter() - t)
        mem = peak_mib()
        assert all(t.error is None for t in tickets), [t.error for t in tickets if t.error]
        for sid in sids:
            engine.sessions[sid].close()
        reset_peak()
        peer = n * (BATCH_NEW_TOKENS - 1) / hf_greedy(hf, prompt[None].repeat(n, 1), BATCH_NEW_TOKENS - 1)
        rows.append(dict(cell=f"batch_{context}x{n}", tok_s=batched, one_at_a_time_tok_s=one_at_a_time,
                         speedup=batched / one_at_a_time, peer_tok_s=peer, vs_peer=batched / peer, peak_mib=mem,
                         peer_peak_mib=peak_mib()))
        print(rows[-1], flush=True)
    return rows


def attention_cells(lengths: tuple[int, ...]) -> list[dict[str, Any]]:
    rows = []
    for t in lengths:
        g = torch.Generator(device=DEVICE).manual_seed(t)
        q = torch.randn(1, 9, t, 64, device=DEVICE, dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, 3, t, 64, device=DEVICE, dtype=torch.bfloat16, generator=g)
        v = torch.randn(1, 3, t, 64, device=DEVICE, dtype=torch.bfloat16, generator=g)
        reset_peak()
        t_ours = timed(lambda: attention(q, k, v, causal=True), repeats=5)
        mem = peak_mib()
        out = attention(q, k, v, causal=True)
        reset_peak()
        t_sdpa = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                 enable_gqa=True), repeats=5)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        flops = 4 * 9 * 64 * t * t / 2
        rows.append(dict(cell=f"attention_causal_{t}", ms=t_ours * 1e3, peer_ms=t_sdpa * 1e3,
                         vs_peer=t_sdpa / t_ours, tflops=flops / t_ours / 1e12, peak_mib=mem,
                         peer_peak_mib=peak_mib(), max_abs_diff=float((out.float() - ref.float()).abs().max())))
        print(rows[-1], flush=True)
        if t == max(lengths):  # the sliding window at the longest length (the peer does full causal)
            torch.cuda.reset_peak_memory_stats() if DEVICE == "cuda" else None
            w = min(4096, t // 2)
            t_win = timed(lambda: attention(q, k, v, causal=True, window=w, sinks=4), repeats=5)
            rows.append(dict(cell=f"attention_window{w}_sinks4_{t}", ms=t_win * 1e3, peer_ms=t_sdpa * 1e3,
                             vs_peer=t_sdpa / t_win, peak_mib=peak_mib()))
            print(rows[-1], flush=True)
    return rows


def to_markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    cols = ["cell", "tok_s", "peer_tok_s", "vs_peer", "one_at_a_time_tok_s", "speedup", "of_bound",
            "peer_of_bound", "ms", "peer_ms", "tflops", "max_abs_diff", "peak_mib", "peer_peak_mib"]

    def fmt(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = [f"# {meta['device']}: streamctx vs transformers / torch SDPA (bf16)", "",
             f"torch {meta['torch']}, transformers {meta['transformers']}; device copy rate "
             f"{meta['copy_gbps']:.0f} GB/s (read + write); weights {meta['weight_mib']:.0f} MiB. "
             "Peer columns: transformers for model cells, SDPA for attention cells; vs_peer > 1 means we are faster.",
             "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--smoke", action="store_true",
                        help="a 2-layer model and short lengths on the CPU: checks the script, measures nothing")
    args = parser.parse_args()
    global DEVICE
    shape = dict(SMOLLM2_SHAPE)
    prefill, ctx, batch_ctx, counts, attn = (512, 2048, 8192), 2048, 512, (1, 16, 64), (8192, 32768)
    if args.smoke:
        DEVICE = "cpu"
        shape.update(layers=2, vocab_size=512)
        prefill, ctx, batch_ctx, counts, attn = (64,), 64, 32, (1, 3), (256,)
    elif not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA device (--smoke checks the script on the CPU)")
    import transformers

    torch.manual_seed(0)
    meta: dict[str, Any] = dict(device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)",
                                torch=torch.__version__, transformers=transformers.__version__,
                                copy_gbps=copy_rate_gbps(2**20 if args.smoke else 2**30))
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny_llama(Path(tmp) / "smollm2-shape", tokenizer="bytes", dtype=torch.bfloat16, **shape)
        engine = Engine.load(folder, device=DEVICE, dtype=torch.bfloat16, max_batch=max(counts))
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                               attn_implementation="sdpa").to(DEVICE).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    meta["weight_mib"] = weight_bytes / 2**20
    rows: list[dict[str, Any]] = []
    sections: list[Callable[[], list[dict[str, Any]]]] = [
        lambda: attention_cells(attn),
        lambda: prefill_cells(engine, hf, prefill),
        lambda: [decode_cell(engine, hf, weight_bytes, meta["copy_gbps"], ctx)],
        lambda: batch_cells(engine, hf, batch_ctx, counts),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    for section in sections:
        try:
            rows.extend(section())
        except Exception as exc:  # a failed section is recorded, the others still run
            rows.append(dict(cell=f"error: {type(exc).__name__}: {exc}"[:200]))
            print(rows[-1], flush=True)
        (args.out / "gpu.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        (args.out / "gpu.md").write_text(to_markdown(meta, rows))
    print(to_markdown(meta, rows))


if __name__ == "__main__":
    main()
