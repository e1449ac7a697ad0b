"""Handlers for the verbs that run here: demo, run, validate."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from streamctx.cli.console import err, out
from streamctx.cli.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, CLIError
from streamctx.cli.outputs import with_output_dir

if TYPE_CHECKING:
    from streamctx.spec import JobSpec


def validate(args: argparse.Namespace) -> int:
    from streamctx.spec import validate as validate_spec

    errors = validate_spec(args.spec)
    for e in errors:
        out.print(f"{args.spec}: {e}", markup=False)
    if errors:
        err.print(f"{len(errors)} error{'s' if len(errors) > 1 else ''} in {args.spec}", markup=False)
        return EXIT_FAILURE
    out.print(f"{args.spec}: ok", markup=False)
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    from streamctx.dataflow.checkpoint import CheckpointError
    from streamctx.spec import JobSpec, SpecError

    try:
        spec = JobSpec.from_file(args.spec)
    except SpecError as exc:
        for e in exc.errors:
            err.print(f"{args.spec}: {e}", markup=False)
        raise CLIError(f"invalid job spec {args.spec} ({len(exc.errors)} errors); see `streamctx validate`") from None
    if args.out:
        spec = with_output_dir(spec, args.out)
    if not args.resume:
        from streamctx.cli.summary import run_with_progress

        return run_with_progress(spec, runner=args.runner, address=args.address)
    if not spec.checkpoint.enabled:
        raise CLIError(f"--resume needs checkpoints: set checkpoint.enabled: true in {args.spec} "
                       "(a job without them can restart from source.start_offset = JobResult.last_offset)",
                       EXIT_USAGE)
    try:
        return _run_resumed(spec, runner=args.runner, address=args.address)
    except CheckpointError as exc:
        raise CLIError(f"cannot resume {args.spec}: {exc}") from None


def _run_resumed(spec: "JobSpec", *, runner: str | None, address: str | None) -> int:
    """`run --resume`: like `run_with_progress`, continuing from the job's last checkpoint."""
    from streamctx.cli.progress import expected_records, job_progress
    from streamctx.cli.summary import print_summary
    from streamctx.dataflow import run_job

    kind = runner or spec.runner.type
    with job_progress(f"{spec.name} ({kind}, resumed)", expected_records(spec)) as on_progress:
        result = run_job(spec, runner=runner, address=address, on_progress=on_progress, resume=True)
    print_summary(spec, result, replies=3)
    return EXIT_OK


def demo(args: argparse.Namespace) -> int:
    from streamctx.cli.demo import build_demo_spec
    from streamctx.cli.summary import run_with_progress

    spec = build_demo_spec(
        out=Path(args.out), runner=args.runner, model=args.model, max_new_tokens=args.max_new_tokens
    )
    return run_with_progress(spec, runner=args.runner, address=args.address, replies=4)

