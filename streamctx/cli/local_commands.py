"""Handlers for the verbs that run here: demo, run, validate."""

from __future__ import annotations

import argparse
from pathlib import Path

from streamctx.cli.console import err, out
from streamctx.cli.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, CLIError
from streamctx.cli.outputs import with_output_dir


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
    from streamctx.cli.summary import run_with_progress

    try:
        return run_with_progress(spec, runner=args.runner, address=args.address, resume=True)
    except CheckpointError as exc:
        raise CLIError(f"cannot resume {args.spec}: {exc}") from None


def demo(args: argparse.Namespace) -> int:
    from streamctx.cli.demo import build_demo_spec
    from streamctx.cli.summary import run_with_progress

    spec = build_demo_spec(
        out=Path(args.out), runner=args.runner, model=args.model, max_new_tokens=args.max_new_tokens
    )
    return run_with_progress(spec, runner=args.runner, address=args.address, replies=4)

