"""Recurrent operators benchmark (issue 2, second half): selective scan and linear attention, CPU fp32.

Interface (used by `benchmarks/operators.py` so the issue-2 table is one command):
- `cells() -> list[harness.Cell]`: every measurement, each run in its own subprocess (peak RSS per cell);
  rows carry `group`, `impl`, `t` (sequence length), `time_s`, `inputs_rss_mib`.
- `postprocess(rows) -> rows`: adds, per group and length, `peer` / `ratio_vs_peer` (time / peer's time,
  the convention of operators.py) and `speedup_vs_<impl>` (peer's time / ours) for every other impl.
Standalone:

    flock /tmp/streamctx-bench.lock python benchmarks/operators_recurrent.py [--cap 900] [--only NAME] [--redo]

writes `benchmarks/results/operators_recurrent.json` and `.md` (cells under `operators_recurrent/cells/`).

Cells (one thread, see THREADS; B=1):
- scan (Dm=256, N=16, L=4K and 16K; Mamba's initialisation: A = -[1..N], delta = softplus(x + dt_bias)
  with dt in [1e-3, 0.1]): `chunked` (ours) vs `reference` (our sequential loop, the definition) vs
  `transformers` (transformers' torch Mamba scan, `mamba_selective_scan`, the path MambaMixer takes
  without CUDA kernels). The chunked cell also reports its max |error| against the reference on a 1K
  prefix. A `decode` cell times one L=1 step (the decoder's per-token call).
- linear attention (H=8, D=64, T=16K, elu+1): `chunked` vs `recurrent` (the loop reference).
Loops are timed once on the whole length (the slowest takes seconds, not minutes), so nothing is
extrapolated; the chunked paths take the median of 3 runs after a warm-up. Each row records the
1-minute load average (`load_1m`): the machine has 2 cores, and a value well above 2 means other
work shared them during the cell.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402
from benchmarks.harness import Cell  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CELLS_DIR = RESULTS / "operators_recurrent"
# One thread: on the shared 2-core machine a descheduled second OpenMP thread stalls every parallel op
# (exp on 4096 elements already goes parallel) by milliseconds, which hits the per-step loops hardest.
THREADS = 1
K = 1024
DM, N = 256, 16
H, D = 8, 64
PEERS = {"scan": "transformers", "scan-decode": "transformers", "linear": "recurrent"}


def _scan_inputs(length: int, seed: int = 0) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.rand(DM, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return {
        "u": torch.randn(1, DM, length, generator=g),
        "delta": 0.5 * torch.randn(1, DM, length, generator=g),
        "A": -torch.arange(1, N + 1, dtype=torch.float32).repeat(DM, 1),
        "B": torch.randn(1, N, length, generator=g),
        "C": torch.randn(1, N, length, generator=g),
        "D": torch.ones(DM),
        "z": torch.randn(1, DM, length, generator=g),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),  # softplus^-1(dt), as Mamba initialises it
    }


def _scan_fn(impl: str):
    if impl == "chunked":
        from streamctx.operators.ssm import selective_scan

        return lambda a, **kw: selective_scan(**a, delta_softplus=True, **kw)
    if impl == "reference":
        from streamctx.operators.ssm import naive

        return lambda a, **kw: naive.selective_scan(**a, delta_softplus=True, **kw)
    if impl == "transformers":
        from transformers.models.mamba.modeling_mamba import mamba_selective_scan

        def run(a, return_state: bool = False, initial_state=None):
            if initial_state is not None:
                raise ValueError("transformers' torch scan takes no initial state")
            return mamba_selective_scan(a["u"], a["delta"], a["A"], a["B"], a["C"], D=a["D"], z=a["z"],
                                        delta_bias=a["delta_bias"], delta_softplus=True,
                                        return_last_state=return_state)

        return run
    raise ValueError(impl)


def scan(impl: str, t: int) -> dict[str, Any]:
    import torch

    harness.set_threads(THREADS)
    args = _scan_inputs(t)
    fn = _scan_fn(impl)
    rss_inputs = harness_rss()
    loop = impl != "chunked"  # the loops run for seconds: one timed run, no warm-up
    with torch.no_grad():
        seconds = harness.time_fn(lambda: fn(args), warmup=0 if loop else 1, repeats=1 if loop else 3,
                                  max_time_s=30.0)
        row: dict[str, Any] = {"time_s": seconds, "inputs_rss_mib": rss_inputs,
                               "tokens_per_s": t / seconds, "load_1m": _load()}
        if impl == "chunked":
            prefix = {k: (v[..., :K] if v.dim() == 3 else v) for k, v in args.items()}
            ref = _scan_fn("reference")(prefix)
            row["max_abs_err_vs_reference"] = (fn(prefix) - ref).abs().max().item()
    return row


def scan_decode(impl: str, t: int) -> dict[str, Any]:
    """One L=1 step with a carried state (transformers: its scan on L=1, which starts from zeros)."""
    import torch

    harness.set_threads(THREADS)
    args = _scan_inputs(1)
    fn = _scan_fn(impl)
    state = torch.randn(1, DM, N)
    kw = {} if impl == "transformers" else {"initial_state": state, "return_state": True}
    with torch.no_grad():
        seconds = harness.time_fn(lambda: fn(args, **kw), warmup=3, repeats=200, max_time_s=5.0)
    return {"time_s": seconds, "inputs_rss_mib": harness_rss(), "tokens_per_s": 1 / seconds, "load_1m": _load()}


def linear(impl: str, t: int) -> dict[str, Any]:
    import torch

    from streamctx.operators.linear import linear_attention, naive

    harness.set_threads(THREADS)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, t, D, generator=g) for _ in range(3))
    fn = linear_attention if impl == "chunked" else naive.linear_attention
    rss_inputs = harness_rss()
    loop = impl != "chunked"
    with torch.no_grad():
        seconds = harness.time_fn(lambda: fn(q, k, v), warmup=0 if loop else 1, repeats=1 if loop else 3,
                                  max_time_s=30.0)
        row: dict[str, Any] = {"time_s": seconds, "inputs_rss_mib": rss_inputs, "tokens_per_s": t / seconds,
                               "load_1m": _load()}
        if impl == "chunked":
            sl = slice(0, K)
            ref = naive.linear_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl])
            row["max_abs_err_vs_reference"] = (fn(q[:, :, sl], k[:, :, sl], v[:, :, sl]) - ref).abs().max().item()
    return row


def _load() -> float:
    """1-minute load average when the cell finished: above ~2 the 2-core machine was shared."""
    import os

    return round(os.getloadavg()[0], 2)


def harness_rss() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def cells() -> list[Cell]:
    out: list[Cell] = []
    for t in (4 * K, 16 * K):
        for impl in ("chunked", "reference", "transformers"):
            out.append(Cell(f"recurrent_scan_L{t // K}K_{impl}", scan, {"impl": impl, "t": t}, group="scan"))
    for impl in ("chunked", "reference", "transformers"):
        out.append(Cell(f"recurrent_scan_decode_{impl}", scan_decode, {"impl": impl, "t": 1}, group="scan-decode"))
    for impl in ("chunked", "recurrent"):
        out.append(Cell(f"recurrent_linear_T16K_{impl}", linear, {"impl": impl, "t": 16 * K}, group="linear"))
    return out


def postprocess(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    times: dict[tuple[str, Any], dict[str, float]] = {}
    for r in rows:
        if r.get("group") in PEERS and r.get("status") == "ok":
            times.setdefault((r["group"], r.get("t")), {})[r["impl"]] = r["time_s"]
    for r in rows:
        if r.get("group") not in PEERS or r.get("status") != "ok":
            continue
        group_times = times.get((r["group"], r.get("t")), {})
        peer = PEERS[r["group"]]
        if peer in group_times and r["impl"] != peer:
            r["peer"] = peer
            r["ratio_vs_peer"] = r["time_s"] / group_times[peer]
        for other, other_time in group_times.items():
            if other != r["impl"]:
                r[f"speedup_vs_{other}"] = other_time / r["time_s"]
        if "inputs_rss_mib" in r and "peak_rss_mib" in r:
            r["extra_mib"] = round(r["peak_rss_mib"] - r["inputs_rss_mib"], 1)
    return rows


COLUMNS = ["group", "impl", "t", "time_s", "tokens_per_s", "speedup_vs_reference", "speedup_vs_transformers",
           "speedup_vs_recurrent", "max_abs_err_vs_reference", "peak_rss_mib", "extra_mib", "load_1m", "status"]

if __name__ == "__main__":
    harness.main(cells(), results=CELLS_DIR, prefix="operators_recurrent",
                 title="Recurrent operators (CPU fp32, B=1, 1 thread)", columns=COLUMNS,
                 postprocess=postprocess, combined_dir=RESULTS)
