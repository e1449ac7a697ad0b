"""Handlers for the cluster verbs: submit, status, logs, stop."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from streamctx.cli import jobs
from streamctx.cli.console import err, out
from streamctx.cli.errors import EXIT_OK, EXIT_USAGE, CLIError


def _client(args: argparse.Namespace) -> jobs.JobSubmissionClient:
    address = args.address or jobs.default_address()
    if not address:
        raise CLIError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS", EXIT_USAGE)
    return jobs.connect(address, args.token_file)


def submit(args: argparse.Namespace) -> int:
    spec = Path(args.spec)
    working_dir = Path(args.working_dir) if args.working_dir else None
    jobs.build_submission(spec, working_dir=working_dir)  # fail on a bad path before connecting
    client = _client(args)
    job_id = jobs.submit(client, spec, working_dir=working_dir, job_id=args.job_id, out=args.out)
    out.print(job_id, markup=False)
    if not args.wait:
        err.print(f"submitted; follow with: streamctx logs {job_id} --follow", markup=False)
        return EXIT_OK
    jobs.follow_logs(client, job_id, _write_raw)
    status, message = jobs.wait(client, job_id)
    err.print(f"job {job_id}: {status}" + (f" ({message})" if message else ""), markup=False)
    return jobs.exit_code_for(status)


def status(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.wait:
        state, message = jobs.wait(client, args.job_id, timeout_s=args.timeout)
    else:
        state, message = jobs.job_status(client, args.job_id)
    out.print(state, markup=False)
    if message:
        err.print(message, markup=False)
    return jobs.exit_code_for(state) if args.wait else EXIT_OK


def logs(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.follow:
        jobs.follow_logs(client, args.job_id, _write_raw)
    else:
        _write_raw(jobs.logs(client, args.job_id))
    return EXIT_OK


def stop(args: argparse.Namespace) -> int:
    client = _client(args)
    was_running = jobs.stop(client, args.job_id)
    out.print(f"{args.job_id}: {'stop requested' if was_running else 'not running'}", markup=False)
    return EXIT_OK


def _write_raw(text: str) -> None:
    # Job logs go through untouched: no rich markup or wrapping.
    sys.stdout.write(text)
    sys.stdout.flush()
