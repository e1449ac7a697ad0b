"""Issue-2 operator benchmark: exact attention vs torch SDPA / FlexAttention / the dense reference.

CPU fp32, B=1, H=8, D=64, two threads (window and block-sparse also at one thread, where a shared
machine's load distorts least); wall time best-of-runs plus the process's CPU time; every cell in its own subprocess (peak RSS per cell).
- causal: ours vs `scaled_dot_product_attention(is_causal=True)` (and the dense reference <= 8K);
- sliding window w=1024: ours vs compiled FlexAttention with a sliding-window block mask, and vs SDPA
  with an explicit boolean mask (8K and 16K only);
- block-sparse pattern at 16K: time must fall with density;
- then the recurrent operators' cells (`benchmarks/operators_recurrent.py`, if present).

    flock /tmp/streamctx-bench.lock python benchmarks/operators.py [--cap 900] [--only NAME] [--redo]

Writes `benchmarks/results/operators.json` and `operators.md`; cell JSONs under
`benchmarks/results/operators_cells/cells/` make the run resumable.
"""

from __future__ import annotations

import importlib.util
import os
import resource
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
CELLS_DIR = RESULTS / "operators_cells"
H, D, WINDOW, THREADS = 8, 64, 1024, 2
K = 1024


def _inputs(t: int, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, H, t, D, generator=gen) for _ in range(3))


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure(fn, *, repeats: int, max_time_s: float, rss_inputs: float) -> dict[str, Any]:
    """Best-of-`repeats` wall time and this process's CPU time of a run (best of the same runs: on a
    shared machine load inflates wall time, CPU time much less), the 1-minute load average, and
    `rss_inputs`, the RSS once inputs exist (before any setup)."""
    cpu: list[float] = []

    def timed() -> None:
        start = time.process_time()
        fn()
        cpu.append(time.process_time() - start)

    seconds = harness.time_fn(timed, warmup=1 if repeats > 1 else 0, repeats=repeats, max_time_s=max_time_s)
    timed_cpu = cpu[1:] if repeats > 1 and len(cpu) > 1 else cpu
    return {"time_s": seconds, "cpu_s": round(min(timed_cpu), 4), "load_1m": round(os.getloadavg()[0], 2),
            "inputs_rss_mib": round(rss_inputs, 1)}


# ------------------------------------------------------------------------------------------ cells
def causal(impl: str, t: int) -> dict[str, Any]:
    import torch

    from streamctx.operators.attn import attention, naive

    harness.set_threads(THREADS)
    q, k, v = _inputs(t)
    rss = _rss_mib()
    fns = {
        "ours": lambda: attention(q, k, v, return_lse=True),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
        "naive": lambda: naive.attention(q, k, v),
    }
    with torch.no_grad():
        return _measure(fns[impl], repeats=10 if t <= 4 * K else 3 if t <= 16 * K else 1, max_time_s=30,
                        rss_inputs=rss)


def window(impl: str, t: int, threads: int = THREADS) -> dict[str, Any]:
    import torch

    from streamctx.operators.attn import attention, naive

    harness.set_threads(threads)
    q, k, v = _inputs(t)
    rss = _rss_mib()
    extra: dict[str, Any] = {}
    if impl == "ours":
        fn = lambda: attention(q, k, v, window=WINDOW)  # noqa: E731
    elif impl == "sdpa_mask":
        mask = naive.visible_mask(t, t, window=WINDOW)
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    elif impl == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def sliding(b, h, qi, kv):
            return (qi >= kv) & (qi - kv < WINDOW)

        start = time.perf_counter()
        # _compile=True builds the block mask without a dense [T, T] mask (32 GiB at 64K)
        block_mask = create_block_mask(sliding, None, None, t, t, device="cpu", _compile=True)
        compiled = torch.compile(flex_attention)
        compiled(q, k, v, block_mask=block_mask)
        extra["compile_s"] = round(time.perf_counter() - start, 1)
        fn = lambda: compiled(q, k, v, block_mask=block_mask)  # noqa: E731
    else:
        raise ValueError(impl)
    with torch.no_grad():
        return {**_measure(fn, repeats=5, max_time_s=30, rss_inputs=rss), **extra}


def sparse(impl: str, t: int, density: float, threads: int = THREADS) -> dict[str, Any]:
    import torch

    from streamctx.operators.attn import attention, patterns

    harness.set_threads(threads)
    q, k, v = _inputs(t)
    rss = _rss_mib()
    bs = 128
    n = t // bs
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(n, n, generator=gen) < density
    mask |= torch.eye(n, dtype=torch.bool)  # every query block sees its own block
    pattern = patterns.block_sparse_pattern(mask, bs)
    with torch.no_grad():
        row = _measure(lambda: attention(q, k, v, pattern=pattern), repeats=5, max_time_s=30, rss_inputs=rss)
    row["causal_density"] = round(pattern.density(n, causal=True), 3)
    return row


def _cells() -> list[Cell]:
    """Cheap, decisive cells first, so a capped run still gets the comparisons; 64K and the 8K dense
    reference last."""
    cells: list[Cell] = []

    def add(group: str, fn, name: str, **params) -> None:
        cells.append(Cell(name, fn, params, group=group))

    for threads, tag in ((THREADS, ""), (1, "_1t")):  # one thread: the comparison load disturbs least
        for t in (16 * K, 64 * K):
            for impl in ("ours", "flex"):
                add("window", window, f"window{WINDOW}_T{t // K}K_{impl}{tag}", impl=impl, t=t, threads=threads)
        for density in (0.1, 0.3, 1.0):
            add("block-sparse", sparse, f"sparse_T16K_d{int(density * 100)}{tag}", impl="ours", t=16 * K,
                density=density, threads=threads)
    for t in (1 * K, 4 * K, 16 * K):
        for impl in ("ours", "sdpa"):
            add("causal", causal, f"causal_T{t // K}K_{impl}", impl=impl, t=t)
    for t in (8 * K, 16 * K):
        add("window", window, f"window{WINDOW}_T{t // K}K_sdpa_mask", impl="sdpa_mask", t=t)
    add("causal", causal, "causal_T64K_ours", impl="ours", t=64 * K)
    for t in (1 * K, 4 * K, 8 * K):
        add("causal", causal, f"causal_T{t // K}K_naive", impl="naive", t=t)
    return cells


def _reuse_recurrent_cells(names: list[str]) -> None:
    """Seed this run with cells the recurrent benchmark already measured (same harness, same cell
    functions); delete them under `operators_cells/cells/` or pass --redo to measure them again."""
    src = RESULTS / "operators_recurrent" / "cells"
    dst = CELLS_DIR / "cells"
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (src / f"{name}.json").exists() and not (dst / f"{name}.json").exists():
            (dst / f"{name}.json").write_text((src / f"{name}.json").read_text())


def _recurrent_module():
    """The recurrent-operator helper's cells: `benchmarks/operators_recurrent.py` exposing `cells()`
    -> list[harness.Cell] (and optionally `postprocess(rows) -> rows`)."""
    path = ROOT / "benchmarks" / "operators_recurrent.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("benchmarks.operators_recurrent", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PEERS = {"causal": "sdpa", "window": "flex", "block-sparse": None}


def _postprocess(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add `ratio_vs_peer` (time / peer's time in the same group and T) and `extra_mib`."""
    def key(r: dict[str, Any]) -> tuple:
        return r["group"], r.get("t"), r.get("threads", THREADS)

    peer_time = {key(r): r["time_s"] for r in rows
                 if r.get("status") == "ok" and r.get("impl") == PEERS.get(r["group"])}
    dense = {key(r): r["time_s"] for r in rows
             if r.get("group") == "block-sparse" and r.get("density") == 1.0 and r.get("status") == "ok"}
    for r in rows:
        if r.get("status") != "ok" or "time_s" not in r:
            continue
        if r["group"] == "block-sparse" and key(r) in dense:
            r["ratio_vs_peer"] = r["time_s"] / dense[key(r)]
            r["peer"] = "100% density"
        elif key(r) in peer_time:
            r["ratio_vs_peer"] = r["time_s"] / peer_time[key(r)]
            r["peer"] = PEERS[r["group"]]
        if "inputs_rss_mib" in r and "peak_rss_mib" in r:
            r["extra_mib"] = round(r["peak_rss_mib"] - r["inputs_rss_mib"], 1)
    return rows


COLUMNS = ["group", "impl", "t", "threads", "density", "time_s", "cpu_s", "peer", "ratio_vs_peer", "tokens_per_s",
           "max_abs_err_vs_reference", "peak_rss_mib", "extra_mib", "load_1m", "status"]


def main() -> None:
    cells = _cells()
    post = _postprocess
    recurrent = _recurrent_module()
    if recurrent is not None:
        extra = list(recurrent.cells())
        if "--cell" not in sys.argv:
            _reuse_recurrent_cells([c.name for c in extra])
        cells += extra
        if hasattr(recurrent, "postprocess"):
            post = lambda rows: recurrent.postprocess(_postprocess(rows))  # noqa: E731
    harness.main(cells, results=CELLS_DIR, prefix="operators", title="Issue 2 operators (CPU fp32, B=1, H=8, D=64)",
                 columns=COLUMNS, postprocess=post, combined_dir=RESULTS)


if __name__ == "__main__":
    main()
