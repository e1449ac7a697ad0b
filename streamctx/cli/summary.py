"""Run a job with a progress bar and print what it did: counts, throughput, sample replies."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from streamctx.cli.console import err, out
from streamctx.cli.errors import EXIT_OK
from streamctx.cli.progress import expected_records, job_progress

if TYPE_CHECKING:
    import pyarrow as pa

    from streamctx.dataflow import JobResult
    from streamctx.spec import JobSpec

# Output columns the summary knows how to show, in order of preference.
REPLY_COLUMNS = ("reply",)
TOKEN_COLUMNS = ("reply_tokens",)
CONTEXT_COLUMN = "n_context_tokens"
POLICY_COLUMN = "policy"


def run_with_progress(spec: JobSpec, *, runner: str | None, address: str | None, replies: int = 3,
                      resume: bool = False) -> int:
    """Run `spec` with a progress bar, then print the summary; `resume`: from its last checkpoint."""
    from streamctx.dataflow import run_job

    kind = runner or spec.runner.type
    title = f"{spec.name} ({kind}, resumed)" if resume else f"{spec.name} ({kind})"
    with job_progress(title, expected_records(spec)) as on_progress:
        result = run_job(spec, runner=runner, address=address, on_progress=on_progress, resume=resume)
    print_summary(spec, result, replies=replies)
    return EXIT_OK


def output_table(result: JobResult) -> pa.Table | None:
    """This run's output rows: the memory sink's table, or the part files it wrote (dead letters aside)."""
    import pyarrow as pa
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    if result.outputs is not None:
        return result.outputs
    parts = [Path(f) for f in result.sink_files if Path(f).parent.name != "dead_letter"]
    tables = [pq.read_table(p) if p.suffix == ".parquet" else pj.read_json(p) for p in parts]
    tables = [t for t in tables if t.num_rows]
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


def _first_column(table: pa.Table | None, names: tuple[str, ...]) -> str | None:
    if table is None:
        return None
    return next((n for n in names if n in table.column_names), None)


def summary_rows(spec: JobSpec, result: JobResult) -> list[tuple[str, str]]:
    """(label, value) pairs of the summary table."""
    table = output_table(result)
    rows: list[tuple[str, str]] = [("job", f"{result.name} on the {result.runner} runner")]
    if table is not None and "session_id" in table.column_names:
        ended = ", ".join(f"{v} {k}" for k, v in result.sessions.ended.items() if v)
        n_sessions = len(set(table.column("session_id").to_pylist()))
        rows.append(("sessions", f"{n_sessions}" + (f" (ended: {ended})" if ended else "")))
    rows.append(("turns", f"{result.records_out} out of {result.records_in} records in"))
    token_col = _first_column(table, TOKEN_COLUMNS)
    if token_col is not None:
        tokens = sum(v or 0 for v in table.column(token_col).to_pylist())
        rate = tokens / result.elapsed_s if result.elapsed_s > 0 else 0.0
        rows.append(("tokens generated", f"{tokens} ({rate:.1f} tokens/s over the whole run)"))
    if table is not None and CONTEXT_COLUMN in table.column_names:
        longest = max((v or 0 for v in table.column(CONTEXT_COLUMN).to_pylist()), default=0)
        policies = sorted({p for p in table.column(POLICY_COLUMN).to_pylist() if p}) if POLICY_COLUMN in table.column_names else []
        rows.append(("context", f"up to {longest} tokens per session" + (f" (policy: {', '.join(policies)})" if policies else "")))
    rows.append(("elapsed", f"{result.elapsed_s:.1f} s ({result.metrics.get('records_per_s', 0.0):.2f} records/s)"))
    rows.append(("dead letters", str(result.dead_letters)))
    if result.sessions.peak_live:
        rows.append(("peak live sessions", str(result.sessions.peak_live)))
    rows.append(("output", _output_place(spec, result)))
    return rows


def _output_place(spec: JobSpec, result: JobResult) -> str:
    if spec.sink.type in ("parquet", "jsonl") and spec.sink.path:
        files = [f for f in result.sink_files if Path(f).parent.name != "dead_letter"]
        return f"{spec.resolve_output(spec.sink.path)} ({len(files)} {spec.sink.type} file{'s' if len(files) != 1 else ''})"
    return f"{spec.sink.type} sink"


def sample_replies(spec: JobSpec, result: JobResult, n: int) -> list[dict[str, Any]]:
    """Up to `n` output rows that carry a reply, from different sessions, with their prompts."""
    table = output_table(result)
    col = _first_column(table, REPLY_COLUMNS)
    if table is None or col is None:
        return []
    seen: set[str] = set()
    picked: list[dict[str, Any]] = []
    for row in table.select([c for c in ("session_id", "turn", col) if c in table.column_names]).to_pylist():
        if row.get(col) and row.get("session_id") not in seen:
            seen.add(row.get("session_id"))
            picked.append({"session_id": row.get("session_id"), "turn": row.get("turn"), "reply": row[col]})
        if len(picked) == n:
            break
    prompts = _prompts(spec, {(r["session_id"], r["turn"]) for r in picked})
    for r in picked:
        r["prompt"] = prompts.get((r["session_id"], r["turn"]), "")
    return picked


def _prompts(spec: JobSpec, keys: set[tuple[Any, Any]]) -> dict[tuple[Any, Any], str]:
    """The input text of the given (session, turn) pairs, read back from a JSONL source."""
    import json

    if not keys or spec.source.type != "jsonl" or not spec.source.path:
        return {}
    found: dict[tuple[Any, Any], str] = {}
    try:
        with Path(spec.resolve_input(spec.source.path)).open(encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                key = (rec.get("session_id"), rec.get("turn")) if isinstance(rec, dict) else None
                if key in keys:
                    found[key] = str(rec.get("text", ""))
    except OSError:
        return {}
    return found


def print_summary(spec: JobSpec, result: JobResult, *, replies: int = 3) -> None:
    table = Table(title="streamctx job summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for label, value in summary_rows(spec, result):
        table.add_row(label, value)
    out.print(table)
    sample = sample_replies(spec, result, replies)
    if sample:
        t = Table(title="sample replies", title_justify="left")
        for name in ("session", "turn", "prompt", "reply"):
            t.add_column(name, overflow="fold")
        for r in sample:
            t.add_row(str(r["session_id"]), str(r["turn"]), str(r["prompt"]), str(r["reply"]).strip())
        out.print(t)
    if result.dead_letters:
        err.print(f"{result.dead_letters} record(s) went to the dead-letter output", markup=False)
