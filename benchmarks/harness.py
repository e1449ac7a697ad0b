"""Shared benchmark harness: one subprocess per cell, peak RSS, resume, time cap, table, JSON.

A benchmark script declares its cells as `Cell(name, fn, params)` where `fn(**params) -> dict` does
the measuring and returns a flat dict of numbers/strings. The script ends with

    if __name__ == "__main__":
        harness.main(cells, results=RESULTS_DIR, title="...", columns=[...])

Run without arguments it is the parent: every cell that has no JSON yet under the results folder
is run as `python script.py --cell NAME --json PATH` in its own process, so the child's peak RSS
(`ru_maxrss` never falls inside one process) belongs to that cell alone; the parent reads it with
`os.wait4`. Cells already done are skipped (resume), `--cap SECONDS` stops launching new cells once
the budget is spent (a partial run still counts; `--cap -1` only rebuilds the table from the cell
JSONs), `--only SUBSTR` picks cells, `--redo` reruns.
Finally all cell JSONs are combined into `<results>/<prefix>.json` and `<prefix>.md`, and printed.

Helpers for cell functions: `time_fn` (median wall time of repeated calls after warm-up),
`set_threads`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CellFn = Callable[..., dict[str, Any]]


@dataclass(frozen=True)
class Cell:
    """One measurement, run in its own process. `group` rows share a table section."""

    name: str
    fn: CellFn
    params: dict[str, Any] = field(default_factory=dict)
    group: str = ""
    timeout_s: float = 600.0


def set_threads(n: int = 2) -> None:
    import torch

    torch.set_num_threads(n)


def time_fn(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5, min_time_s: float = 0.0,
            max_time_s: float = 60.0, stat: str = "min") -> float:
    """Wall seconds of `fn()` over `repeats` runs after `warmup` runs: the minimum by default (on a
    shared machine other load only ever adds time), or the median (`stat="median"`).

    Stops early once `max_time_s` of timed runs is spent (at least one timed run always happens);
    runs more than `repeats` while their total is under `min_time_s` (for very fast calls).
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        spent = time.perf_counter() - start
        if spent >= max_time_s:
            break
        if len(times) >= repeats and spent >= min_time_s:
            break
    return min(times) if stat == "min" else statistics.median(times)


# --------------------------------------------------------------------------------------- child side
def _run_child(cells: dict[str, Cell], name: str, out: Path) -> None:
    import resource

    cell = cells[name]
    t0 = time.perf_counter()
    row: dict[str, Any] = {"cell": name, "group": cell.group, **cell.params}
    try:
        row.update(cell.fn(**cell.params))
        row["status"] = "ok"
    except Exception as exc:  # a failing cell is a result (e.g. "FlexAttention cannot run here")
        row["status"] = "error"
        row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    row["cell_wall_s"] = round(time.perf_counter() - t0, 3)
    row["child_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out.write_text(json.dumps(row, indent=1, default=str))


# -------------------------------------------------------------------------------------- parent side
def run_cell_subprocess(script: Path, cell: Cell, out: Path) -> dict[str, Any]:
    """Run one cell in a fresh interpreter; return its JSON row with `peak_rss_mib` from wait4."""
    cmd = [sys.executable, str(script), "--cell", cell.name, "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(script.resolve().parent.parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.monotonic() + cell.timeout_s
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            row = {"cell": cell.name, "group": cell.group, **cell.params, "status": "timeout",
                   "error": f"exceeded {cell.timeout_s:.0f} s"}
            out.write_text(json.dumps(row, indent=1, default=str))
            break
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if out.exists():
        row = json.loads(out.read_text())
    else:
        row = {"cell": cell.name, "group": cell.group, **cell.params, "status": "crashed",
               "error": f"exit code {proc.returncode}"}
    row["peak_rss_mib"] = round(usage.ru_maxrss / 1024, 1)  # Linux: KiB
    out.write_text(json.dumps(row, indent=1, default=str))
    return row


def run_cells(script: Path, cells: Sequence[Cell], results: Path, *, cap_s: float = 900.0,
              only: str | None = None, redo: bool = False) -> list[dict[str, Any]]:
    """Run every selected cell not yet done; stop launching once `cap_s` seconds are spent."""
    cell_dir = results / "cells"
    cell_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    for cell in cells:
        if only and only not in cell.name:
            continue
        out = cell_dir / f"{cell.name}.json"
        if out.exists() and not redo:
            continue
        if time.monotonic() - start > cap_s:
            print(f"[harness] time cap {cap_s:.0f} s reached; {cell.name} and later cells left for a resume")
            break
        out.unlink(missing_ok=True)
        row = run_cell_subprocess(script, cell, out)
        print(f"[harness] {cell.name}: {row.get('status')} ({row.get('cell_wall_s', '?')} s, "
              f"peak {row.get('peak_rss_mib')} MiB)", flush=True)
    return load_rows(results, [c.name for c in cells])


def load_rows(results: Path, names: Iterable[str]) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        path = results / "cells" / f"{name}.json"
        if path.exists():
            rows.append(json.loads(path.read_text()))
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def _md_cell(value: Any) -> str:
    """A value as one markdown table cell: pipes escaped, line breaks shown as spaces."""
    return " ".join(_fmt(value).split()).replace("|", "\\|")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_md_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for row in rows:
        table.add_row(*(_fmt(row.get(c)) for c in columns))
    Console(width=200).print(table)


def write_combined(rows: Sequence[dict[str, Any]], results: Path, prefix: str, columns: Sequence[str],
                   title: str, meta: dict[str, Any] | None = None) -> None:
    """Write `<prefix>.json` (all rows + meta) and `<prefix>.md` (the table) under `results`."""
    payload = {"title": title, "meta": meta or {}, "rows": list(rows)}
    (results / f"{prefix}.json").write_text(json.dumps(payload, indent=1, default=str))
    notes = [f"- {r['cell']}: {r['status']}: {r.get('error', '')}" for r in rows if r.get("status") != "ok"]
    md = f"# {title}\n\n" + markdown_table(rows, columns) + "\n"
    if notes:
        md += "\n## Cells that did not produce numbers\n\n" + "\n".join(notes) + "\n"
    (results / f"{prefix}.md").write_text(md)


def machine_meta() -> dict[str, Any]:
    import platform

    import torch

    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "machine": platform.machine()}


def main(cells: Sequence[Cell], *, results: Path, prefix: str, title: str, columns: Sequence[str],
         postprocess: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None,
         combined_dir: Path | None = None, argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Entry point of a benchmark script: child mode with `--cell`, otherwise run/resume all cells.

    Cell JSONs go to `<results>/cells/`, the combined `<prefix>.json`/`.md` to `combined_dir`
    (default `results`). `postprocess` derives columns that compare cells (e.g. ratio vs the peer).
    """
    parser = argparse.ArgumentParser(description=title)
    parser.add_argument("--cell", help="(child) run this one cell")
    parser.add_argument("--json", type=Path, help="(child) where to write the cell's row")
    parser.add_argument("--cap", type=float, default=900.0, help="total time cap in seconds")
    parser.add_argument("--only", help="run only cells whose name contains this")
    parser.add_argument("--redo", action="store_true", help="rerun cells that already have results")
    args = parser.parse_args(argv)
    by_name = {c.name: c for c in cells}
    if len(by_name) != len(cells):
        raise ValueError("cell names must be unique")
    if args.cell:
        _run_child(by_name, args.cell, args.json)
        return []
    script = Path(sys.argv[0]).resolve()
    rows = run_cells(script, cells, results, cap_s=args.cap, only=args.only, redo=args.redo)
    if postprocess:
        rows = postprocess(rows)
    print_table(rows, columns, title)
    write_combined(rows, combined_dir or results, prefix, columns, title, machine_meta())
    return rows
