"""`submit`, `status`, `logs`, `stop`: streamctx jobs on a Ray cluster through the Ray Jobs API.

A job is the spec's folder shipped as the runtime_env `working_dir` plus the entrypoint
`python -m streamctx run --runner ray -- <spec>`, executed by the cluster's job supervisor on the
head node. The cluster must have streamctx installed (see clusters/README.md).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamctx.cli.auth import auth_headers, resolve_token
from streamctx.cli.errors import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE, CLIError

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


@dataclass(frozen=True)
class Submission:
    """What `submit` sends: the entrypoint and the runtime environment."""

    entrypoint: str
    runtime_env: dict[str, Any]


def build_submission(spec_path: Path, *, working_dir: Path | None = None, out: str | None = None) -> Submission:
    """The entrypoint and runtime_env for running `spec_path` on the cluster.

    The spec is addressed relative to the working_dir (the spec's folder by default), which Ray
    uploads and makes the job's current directory.
    """
    spec_path = spec_path.resolve()
    if not spec_path.is_file():
        raise CLIError(f"job spec not found: {spec_path}")
    root = (working_dir or spec_path.parent).resolve()
    if not root.is_dir():
        raise CLIError(f"working dir not found: {root}")
    try:
        relative = spec_path.relative_to(root)
    except ValueError:
        raise CLIError(f"the job spec {spec_path} is not inside the working dir {root}") from None
    # Options first and `--` before the spec, so names starting with `-` stay positional.
    argv = ["python", "-m", "streamctx", "run", "--runner", "ray"]
    if out:
        argv.append(f"--out={out}")
    entrypoint = shlex.join([*argv, "--", relative.as_posix()])
    return Submission(entrypoint=entrypoint, runtime_env={"working_dir": str(root)})


# Ray lets these variables override the address passed to JobSubmissionClient; an explicit
# --address must win, so they are hidden while the client resolves its address.
_ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


def default_address() -> str | None:
    """The dashboard address from the environment, as Ray's own `ray job` CLI reads it."""
    for name in _ADDRESS_ENV:
        if os.environ.get(name):
            return os.environ[name]
    return None


@contextmanager
def _explicit_address() -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in _ADDRESS_ENV if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str, token_file: str | None) -> JobSubmissionClient:
    """A Jobs API client for the dashboard at `address`, authenticated when a token is found."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    headers = auth_headers(resolve_token(token_file))
    try:
        with _explicit_address():
            return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as exc:
        hint = "check RAY_AUTH_TOKEN or --token-file" if headers else "it needs a token: set RAY_AUTH_TOKEN or --token-file"
        raise CLIError(
            f"the Ray cluster at {address} refused the request: {_first_line(exc)} ({hint})", EXIT_UNAVAILABLE
        ) from exc
    except ConnectionError as exc:
        raise CLIError(f"cannot reach the Ray dashboard at {address}: {_first_line(exc)}", EXIT_UNAVAILABLE) from exc
    except RuntimeError as exc:
        raise CLIError(f"the Ray cluster at {address} refused the request: {_first_line(exc)}", EXIT_UNAVAILABLE) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _call(what: str, fn: Callable[[], Any]) -> Any:
    """Run one Jobs API request, turning Ray's errors into one-line CLI errors."""
    from ray.exceptions import AuthenticationError

    try:
        return fn()
    except AuthenticationError as exc:
        raise CLIError(f"{what}: the cluster refused the credentials: {_first_line(exc)}", EXIT_UNAVAILABLE) from exc
    except ConnectionError as exc:
        raise CLIError(f"{what}: cannot reach the cluster: {_first_line(exc)}", EXIT_UNAVAILABLE) from exc
    except RuntimeError as exc:
        raise CLIError(f"{what}: {_first_line(exc)}") from exc


def submit(
    client: JobSubmissionClient,
    spec_path: Path,
    *,
    working_dir: Path | None = None,
    job_id: str | None = None,
    out: str | None = None,
) -> str:
    """Submit the job; returns its submission id."""
    sub = build_submission(spec_path, working_dir=working_dir, out=out)
    return _call(
        "submit",
        lambda: client.submit_job(entrypoint=sub.entrypoint, runtime_env=sub.runtime_env, submission_id=job_id),
    )


def job_status(client: JobSubmissionClient, job_id: str) -> tuple[str, str]:
    """(status name, message) of a job."""
    info = _call(f"status of {job_id}", lambda: client.get_job_info(job_id))
    return str(info.status), info.message or ""


def wait(
    client: JobSubmissionClient, job_id: str, *, timeout_s: float | None = None, poll_s: float = 1.0
) -> tuple[str, str]:
    """Poll until the job reaches a terminal state; returns (status, message)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status, message = job_status(client, job_id)
        if status in TERMINAL_STATES:
            return status, message
        if deadline is not None and time.monotonic() > deadline:
            raise CLIError(f"job {job_id} still {status} after {timeout_s:g} s")
        time.sleep(poll_s)


def exit_code_for(status: str) -> int:
    """0 for a job that succeeded, 1 for one that failed or was stopped."""
    return EXIT_OK if status == "SUCCEEDED" else EXIT_FAILURE


def logs(client: JobSubmissionClient, job_id: str) -> str:
    """Everything the job's driver has printed so far."""
    return _call(f"logs of {job_id}", lambda: client.get_job_logs(job_id))


def follow_logs(client: JobSubmissionClient, job_id: str, write: Callable[[str], None]) -> None:
    """Stream the job's logs to `write` until the job ends."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    _call(f"logs of {job_id}", lambda: asyncio.run(tail()))


def stop(client: JobSubmissionClient, job_id: str) -> bool:
    """Ask the job to stop; True if it was running."""
    return bool(_call(f"stop {job_id}", lambda: client.stop_job(job_id)))
