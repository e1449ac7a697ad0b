"""What `submit` sends to the Ray Jobs API."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from streamctx.cli.errors import EXIT_FAILURE, EXIT_OK, CLIError
from streamctx.cli.jobs import build_submission, exit_code_for


def test_entrypoint_runs_the_spec_relative_to_its_folder(tmp_path: Path) -> None:
    spec = tmp_path / "jobs" / "my job.yaml"
    spec.parent.mkdir()
    spec.write_text("name: x\n")
    sub = build_submission(spec)
    assert sub.runtime_env == {"working_dir": str(spec.parent.resolve())}
    assert shlex.split(sub.entrypoint) == ["python", "-m", "streamctx", "run", "my job.yaml", "--runner", "ray"]


def test_working_dir_above_the_spec_and_out(tmp_path: Path) -> None:
    spec = tmp_path / "jobs" / "a.yaml"
    spec.parent.mkdir()
    spec.write_text("name: x\n")
    sub = build_submission(spec, working_dir=tmp_path, out="/shared/run 1")
    assert sub.runtime_env == {"working_dir": str(tmp_path.resolve())}
    assert shlex.split(sub.entrypoint)[4:] == ["jobs/a.yaml", "--runner", "ray", "--out", "/shared/run 1"]


def test_spec_outside_working_dir(tmp_path: Path) -> None:
    spec = tmp_path / "a.yaml"
    spec.write_text("name: x\n")
    (tmp_path / "sub").mkdir()
    with pytest.raises(CLIError, match="not inside the working dir"):
        build_submission(spec, working_dir=tmp_path / "sub")
    with pytest.raises(CLIError, match="job spec not found"):
        build_submission(tmp_path / "b.yaml")


def test_exit_codes_of_terminal_states() -> None:
    assert exit_code_for("SUCCEEDED") == EXIT_OK
    assert exit_code_for("FAILED") == EXIT_FAILURE
    assert exit_code_for("STOPPED") == EXIT_FAILURE
