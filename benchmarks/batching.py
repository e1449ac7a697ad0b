"""Issue-8 batching benchmark: SmolLM2-135M CPU fp32, many sessions decoding together vs one at a time.

Cells (each in its own subprocess, so peak RSS belongs to the cell):
- decode_{512,2K}_nNN: NN sessions cloned from one prefilled context (`save()` once, restore NN
  times), each generating 32 tokens. Batched: `engine.submit(...)` for all, then `engine.step()`
  until idle; aggregate tokens/s = NN * 32 / wall time, per-token latency = step wall times (every
  session in a step gets its next token). One at a time, in the same process and alternated with
  the batched run (paired, best of `rounds`): `Session.generate(32)` session after session; its
  per-token latency is the forward time of each step. The one-at-a-time rate does not depend on
  NN (every clone is the same), so it runs on min(NN, 2) sessions.
  `of_bound`: batched tokens/s over the bandwidth bound of the batch: each step reads the weights
  once plus every session's attended KV, over the read rate the cell measures before each of its
  rounds (`torch.sum` over 512 MB, the best of them: the machine's rate swings from minute to
  minute, so the `membw` row's rate, measured apart, can sit below what decode itself reads).
- mixed_512: 15 sessions decode continuously while 4 new sessions arrive one after another
  with a 512-token prompt and ask for 8 tokens: time to first token of the arrivals (prefill
  chunk batched with the others' decode steps) vs the same arrival on an idle engine, and the
  decoders' per-token latency while prefills join their steps.
- membw: the machine's memory read rate (`benchmarks/model.py`'s `torch.sum` measurement).
- gemm: the machine's fp32 matmul rate on the model's layer shapes at 64 rows. Batches of 16 and
  more are compute-bound on 2 cores, so `of_roofline` compares with min(bandwidth, compute) bound.

    for c in membw decode_512_n01 ...; do flock /tmp/streamctx-bench.lock python benchmarks/batching.py --only $c; done

Writes `benchmarks/results/batching.json` and `batching.md`; cell JSONs under
`benchmarks/results/batching/cells/` make the run resumable.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402
from benchmarks.harness import Cell  # noqa: E402
from benchmarks.model import MEMBW_BYTES, _kv_bytes_per_token, _prompt, _read_rate, memory_read_gbps  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CELLS_DIR = RESULTS / "batching"
THREADS = 2
NEW_TOKENS = 32


def _load() -> float:
    return os.getloadavg()[0]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _engine_with_clones(context: int, n: int) -> tuple[Any, bytes]:
    import torch

    from streamctx import Engine

    harness.set_threads(THREADS)
    engine = Engine.load("smollm2", dtype=torch.float32, device="cpu", max_batch=max(64, n))
    base = engine.session("base")
    base.feed(_prompt(context))
    blob = base.save()
    base.close()
    return engine, blob


def _timed_forward(engine: Any) -> list[float]:
    """Record the wall time of every model step the engine takes (its `_forward`)."""
    times: list[float] = []
    real = engine._forward

    def timed(*args: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        out = real(*args, **kw)
        times.append(time.perf_counter() - t0)
        return out

    engine._forward = timed
    return times


def _flops_per_token(engine: Any, context: int) -> int:
    """Matmul FLOPs of one decoded token: every weight once (the tied embedding as lm_head only)
    plus attention's two products over `context` keys in every layer."""
    c = engine.config
    params = (engine.model.weight_nbytes() // 4) - c.hidden_size * (c.num_layers * 2 + 1)  # less the norms
    return 2 * params + 4 * c.num_layers * c.num_heads * c.head_dim * context


def decode(context: int, n: int, rounds: int) -> dict[str, Any]:
    import torch

    engine, blob = _engine_with_clones(context, n)
    singles = min(n, 2)
    best_b, best_s = 0.0, 0.0
    lat_b: list[float] = []
    lat_s: list[float] = []
    rates: list[float] = []
    membw_buf = torch.ones(MEMBW_BYTES // 4, dtype=torch.float32)
    load = _load()
    fwd = _timed_forward(engine)
    for r in range(rounds):
        rates.append(_read_rate(membw_buf, repeats=5))
        sids = [f"r{r}b{i}" for i in range(n)]
        for sid in sids:
            engine.session(sid, state=blob)
        for sid in sids:
            engine.submit(sid, generate=True, max_new_tokens=NEW_TOKENS)
        steps: list[float] = []
        t0 = time.perf_counter()
        while not engine.idle:
            a = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - a)
        dt = time.perf_counter() - t0
        tokens = sum(1 for _ in sids) * NEW_TOKENS
        if tokens / dt > best_b:
            best_b, lat_b = tokens / dt, steps[1:]  # the first step only samples from restored logits
        for sid in sids:
            engine.sessions[sid].close()

        fwd.clear()
        t0 = time.perf_counter()
        for i in range(singles):
            s = engine.session(f"r{r}s{i}", state=blob)
            s.generate(NEW_TOKENS)
            s.close()
        dt = time.perf_counter() - t0
        if singles * NEW_TOKENS / dt > best_s:
            best_s, lat_s = singles * NEW_TOKENS / dt, list(fwd)
    weights = engine.model.weight_nbytes()
    kv = _kv_bytes_per_token(context + NEW_TOKENS // 2)
    return {"impl": "streamctx", "context": context, "sessions": n, "new_tokens": NEW_TOKENS,
            "tok_s": best_b, "single_tok_s": best_s, "speedup": best_b / best_s,
            "p50_ms": 1e3 * _pct(lat_b, 0.5), "p99_ms": 1e3 * _pct(lat_b, 0.99),
            "single_p50_ms": 1e3 * _pct(lat_s, 0.5), "single_p99_ms": 1e3 * _pct(lat_s, 0.99),
            "p99_vs_single": _pct(lat_b, 0.99) / _pct(lat_s, 0.99),
            "bytes_per_step": weights + n * kv, "flops_per_token": _flops_per_token(engine, context + NEW_TOKENS // 2),
            "mem_gbps": max(rates), "rounds": rounds, "threads": THREADS, "load_1m": load}


def mixed(context: int, decoders: int, arrivals: int, every: int) -> dict[str, Any]:
    """Arrivals with a `context`-token prompt join `decoders` sessions that keep decoding."""
    engine, blob = _engine_with_clones(context, decoders)
    prompt = _prompt(context + 64)[64:]  # a different text than the decoders' context
    load = _load()
    # Reference: the same arrival on an idle engine (its prefill chunk alone, then its first token).
    idle = engine.submit("idle", prompt, generate=True, max_new_tokens=8)
    engine.run_until_idle()
    ttft_idle = idle.ttft
    engine.sessions["idle"].close()
    for i in range(decoders):
        engine.session(f"d{i}", state=blob)
        engine.submit(f"d{i}", generate=True, max_new_tokens=10_000)
    for _ in range(3):
        engine.step()
    new: list[Any] = []
    steps: list[float] = []
    mixed_steps: list[float] = []
    k = 0
    while len(new) < arrivals or any(not t.done for t in new):
        if len(new) < arrivals and k % every == 0:
            new.append(engine.submit(f"a{len(new)}", prompt, generate=True, max_new_tokens=8))
        prefilling = any(t.first_token_at is None for t in new)  # an arrival's prompt joins this step
        a = time.perf_counter()
        engine.step()
        (mixed_steps if prefilling else steps).append(time.perf_counter() - a)
        k += 1
    ttfts = [t.ttft for t in new]
    return {"impl": "streamctx", "context": context, "sessions": decoders, "arrivals": arrivals,
            "ttft_ms": 1e3 * _pct(ttfts, 0.5), "ttft_max_ms": 1e3 * max(ttfts), "ttft_idle_ms": 1e3 * ttft_idle,
            "p50_ms": 1e3 * _pct(steps, 0.5) if steps else None,
            "mixed_step_p50_ms": 1e3 * _pct(mixed_steps, 0.5), "mixed_step_p99_ms": 1e3 * _pct(mixed_steps, 0.99),
            "threads": THREADS, "load_1m": load}


def membw() -> dict[str, Any]:
    harness.set_threads(THREADS)
    return {"impl": "torch.sum", "mem_gbps": memory_read_gbps(512 << 20, repeats=10), "load_1m": _load()}


def gemm() -> dict[str, Any]:
    """The machine's fp32 matmul rate on SmolLM2's layer shapes at 64 rows (decode of 64 sessions):
    with the bandwidth bound it gives the roofline, since big batches are compute-bound on 2 cores.
    The fastest of `F.linear`, `linear` (the native kernel over plain weights) and the model's own
    products (`gemm_packed` over weights packed once, the SwiGLU pair in one pass) is the rate."""
    import torch
    import torch.nn.functional as F

    from streamctx.model.linear import linear
    from streamctx.operators import cpu

    harness.set_threads(THREADS)
    h, inter, qkv = 576, 1536, 960  # hidden, MLP, fused q/k/v rows
    ws = [torch.randn(qkv, h), torch.randn(h, h), torch.randn(inter, h), torch.randn(inter, h),
          torch.randn(h, inter)] * 30
    x, xi = torch.randn(64, h), torch.randn(64, inter)

    def run(fn: Any) -> None:
        for w in ws:
            fn(xi if w.shape[1] == inter else x, w)

    flops = sum(2 * 64 * w.numel() for w in ws)
    rates = {name: flops / harness.time_fn(lambda: run(fn), warmup=1, repeats=5) / 1e9
             for name, fn in (("F.linear", F.linear), ("linear", linear))}
    if cpu.available():
        packed = [cpu.pack_weights(ws[i]) if i % 5 in (0, 1, 4) else cpu.pack_swiglu(ws[i], ws[i + 1])
                  for i in range(len(ws)) if i % 5 != 3]

        def run_packed() -> None:
            for p in packed:
                cpu.gemm_packed_unchecked(xi if p.k == inter else x, p)

        rates["gemm_packed"] = flops / harness.time_fn(run_packed, warmup=1, repeats=5) / 1e9
    best = max(rates, key=rates.__getitem__)
    return {"impl": best, "gemm_gflops": rates[best], "f_linear_gflops": rates["F.linear"],
            "split_linear_gflops": rates["linear"], "packed_gflops": rates.get("gemm_packed"), "load_1m": _load()}


CELLS = [
    Cell("membw", membw, {}, group="machine", timeout_s=120),
    Cell("gemm", gemm, {}, group="machine", timeout_s=120),
    *(Cell(f"decode_{label}_n{n:02d}", decode, {"context": ctx, "n": n, "rounds": 2}, group="decode",
           timeout_s=600)
      for ctx, label, sizes in ((512, "512", (1, 4, 16, 64)), (2048, "2K", (1, 4, 16)))
      for n in sizes),
    Cell("mixed_512", mixed, {"context": 512, "decoders": 15, "arrivals": 4, "every": 6}, group="mixed",
         timeout_s=600),
]


def add_bound(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`of_bound`: batched tokens/s over the batch's bandwidth bound (the read rate the cell measured
    between its own rounds, else the `membw` row's); `of_roofline`: over min(bandwidth bound,
    compute bound at the `gemm` row's matmul rate)."""
    bw = next((r.get("mem_gbps") for r in rows if r["cell"] == "membw"), None)
    gf = next((r.get("gemm_gflops") for r in rows if r["cell"] == "gemm"), None)
    for r in rows:
        rate = r.get("mem_gbps") or bw
        if rate and r.get("bytes_per_step") and r.get("status") == "ok":
            r["mem_gbps"] = rate
            r["bound_tok_s"] = r["sessions"] * rate * 1e9 / r["bytes_per_step"]
            r["of_bound"] = r["tok_s"] / r["bound_tok_s"]
            if gf and r.get("flops_per_token"):
                r["compute_tok_s"] = gf * 1e9 / r["flops_per_token"]
                r["of_roofline"] = r["tok_s"] / min(r["bound_tok_s"], r["compute_tok_s"])
    return rows


if __name__ == "__main__":
    harness.main(
        CELLS,
        results=CELLS_DIR,
        prefix="batching",
        title="SmolLM2-135M CPU fp32: batched sessions (Engine.submit/step) vs one at a time, 2 threads",
        columns=["cell", "context", "sessions", "tok_s", "single_tok_s", "speedup", "bound_tok_s", "of_bound",
                 "compute_tok_s", "of_roofline", "gemm_gflops",
                 "p50_ms", "p99_ms", "single_p50_ms", "single_p99_ms", "p99_vs_single", "ttft_ms", "ttft_max_ms",
                 "ttft_idle_ms", "mixed_step_p50_ms", "mixed_step_p99_ms", "mem_gbps", "peak_rss_mib",
                 "load_1m", "status"],
        postprocess=add_bound,
        combined_dir=RESULTS,
    )
