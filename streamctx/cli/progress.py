"""A rich progress bar fed by `run_job`'s `on_progress` callback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from streamctx.cli.console import err

if TYPE_CHECKING:
    from streamctx.dataflow import Progress as JobProgress
    from streamctx.spec import JobSpec


def expected_records(spec: JobSpec) -> int | None:
    """Records the source will deliver, when that is cheap to know (a finite JSONL file)."""
    src = spec.source
    if src.type != "jsonl" or src.follow or not src.path:
        return None
    path = spec.resolve_input(src.path)
    try:
        with Path(path).open("rb") as f:
            lines = sum(1 for line in f if line.strip())
    except OSError:
        return None
    return max(lines - src.start_offset, 0)


@contextmanager
def job_progress(description: str, total: int | None) -> Iterator[Callable[[JobProgress], None]]:
    """Yields the `on_progress` callback; the bar counts records that reached the sink or the
    dead-letter output."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("records  {task.fields[dead]} dead letters"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=False, disable=not err.is_terminal) as bar:
        task = bar.add_task(description, total=total, dead=0)

        def update(p: JobProgress) -> None:
            bar.update(task, completed=p.records_out + p.dead_letters, dead=p.dead_letters)

        yield update
