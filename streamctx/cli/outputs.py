"""`--out DIR`: send a job's outputs somewhere other than its spec folder.

A spec's outputs must stay inside its own folder (contract of `streamctx.spec`), which is wrong on
a cluster: a submitted job's folder is a temporary copy on the head node, and a spec mounted from
a ConfigMap is read-only. Redirecting re-anchors the spec at the output's parent folder after
making its input paths absolute, so inputs still resolve where they did.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from streamctx.cli.errors import CLIError

if TYPE_CHECKING:
    from streamctx.spec import JobSpec

FILE_SINKS = ("parquet", "jsonl")


def with_output_dir(spec: JobSpec, out: str | Path) -> JobSpec:
    """A copy of `spec` whose file sink writes into `out` (created by the sink)."""
    if spec.sink.type not in FILE_SINKS:
        raise CLIError(f"--out needs a parquet or jsonl sink; this spec's sink.type is {spec.sink.type!r}")
    out = Path(out).expanduser().resolve()
    if out.parent == out:
        raise CLIError(f"--out cannot be the file-system root: {out}")
    update: dict[str, object] = {
        "sink": spec.sink.model_copy(update={"path": out.name}),
        "base_dir": str(out.parent),
    }
    if spec.source.path:
        update["source"] = spec.source.model_copy(update={"path": str(spec.resolve_input(spec.source.path))})
    if spec.model is not None and spec.model.path:
        update["model"] = spec.model.model_copy(update={"path": str(spec.resolve_input(spec.model.path))})
    if spec.checkpoint.path:
        update["checkpoint"] = spec.checkpoint.model_copy(
            update={"path": str(spec.resolve_input(spec.checkpoint.path))}
        )
    return spec.model_copy(update=update)
