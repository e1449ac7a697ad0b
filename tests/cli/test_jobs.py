"""What `submit` sends to the Ray Jobs API."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamctx.cli.errors import EXIT_FAILURE, EXIT_OK, CLIError
from streamctx.cli.jobs import build_submission, exit_code_for
from streamctx.cli.parser import build_parser


def test_entrypoint_runs_the_spec_relative_to_its_folder(tmp_path: Path) -> None:
    spec = tmp_path / "jobs" / "my job.yaml"
    spec.parent.mkdir()
    spec.write_text("name: x\n")
    sub = build_submission(spec)
    assert sub.runtime_env == {"working_dir": str(spec.parent.resolve())}
    assert shlex.split(sub.entrypoint) == ["python", "-m", "streamctx", "run", "--runner", "ray", "--", "my job.yaml"]


def test_working_dir_above_the_spec_and_out(tmp_path: Path) -> None:
    spec = tmp_path / "jobs" / "a.yaml"
    spec.parent.mkdir()
    spec.write_text("name: x\n")
    sub = build_submission(spec, working_dir=tmp_path, out="/shared/run 1")
    assert sub.runtime_env == {"working_dir": str(tmp_path.resolve())}
    assert shlex.split(sub.entrypoint)[4:] == ["--runner", "ray", "--out=/shared/run 1", "--", "jobs/a.yaml"]


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


_NAME = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\0"), min_size=1, max_size=40
).filter(lambda s: s not in (".", ".."))


@given(name=_NAME, out=st.one_of(st.none(), st.text(min_size=1, max_size=40).filter(lambda s: "\0" not in s)))
def test_entrypoint_survives_any_file_name(tmp_path_factory: pytest.TempPathFactory, name: str, out: str | None) -> None:
    """The cluster's shell and our parser see exactly the spec name and --out value, whatever their
    characters (spaces, quotes, `;`, `$(...)`, a leading `-`)."""
    folder = tmp_path_factory.mktemp("spec")
    spec = folder / name
    try:
        spec.write_text("name: x\n")
    except OSError:  # a name this file system refuses (e.g. too long in bytes)
        return
    argv = shlex.split(build_submission(spec, out=out).entrypoint)
    assert argv[:4] == ["python", "-m", "streamctx", "run"]
    args = build_parser().parse_args(argv[3:])
    assert (args.command, args.spec, args.runner, args.out) == ("run", name, "ray", out)


def test_connect_sends_the_token_and_the_explicit_address_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray.job_submission

    from streamctx.cli import jobs

    seen = {}

    class FakeClient:
        def __init__(self, address: str, headers: dict[str, str]) -> None:
            seen.update(address=address, headers=headers, env=os.environ.get("RAY_ADDRESS"))

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeClient)
    monkeypatch.setenv("RAY_ADDRESS", "http://elsewhere:8265")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok")
    jobs.connect("http://head:8265", None)
    # Ray would let RAY_ADDRESS override the address while the client is built: it is hidden then.
    assert seen == {"address": "http://head:8265", "headers": {"Authorization": "Bearer tok"}, "env": None}
    assert os.environ["RAY_ADDRESS"] == "http://elsewhere:8265"
    assert jobs.default_address() == "http://elsewhere:8265"


# --- run --resume (local verbs, here because they share the job-lifecycle flags) -------------------


def _checkpointed_job(folder: Path, *, enabled: bool = True) -> Path:
    import json

    import yaml

    folder.mkdir(parents=True)
    recs = [{"session_id": f"s{i % 3}", "turn": i // 3, "role": "user", "text": f"t{i}"} for i in range(30)]
    (folder / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    spec = {"name": "cli-resume", "source": {"type": "jsonl", "path": "in.jsonl"}, "model": None,
            "runner": {"type": "local", "batch_size": 4},
            "stages": [{"name": "p", "cls": "tests.dataflow.stages:PassThrough"}],
            "sink": {"type": "parquet", "path": "out", "rows_per_file": 5},
            "checkpoint": {"enabled": enabled, "interval_records": 8}}
    (folder / "job.yaml").write_text(yaml.safe_dump(spec))
    return folder / "job.yaml"


def test_run_resume_needs_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from streamctx.cli import main
    from streamctx.cli.errors import EXIT_USAGE

    job = _checkpointed_job(tmp_path / "j", enabled=False)
    assert main(["run", str(job), "--resume"]) == EXIT_USAGE
    assert "error: --resume needs checkpoints: set checkpoint.enabled: true" in capsys.readouterr().err


def test_run_resume_of_a_finished_job_adds_no_rows(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from streamctx.cli import main

    job = _checkpointed_job(tmp_path / "j")
    assert main(["run", str(job)]) == EXIT_OK
    parts = lambda: sorted((job.parent / "out").glob("part-*.parquet"))  # noqa: E731
    first = [pq.read_table(p) for p in parts()]
    assert sum(t.num_rows for t in first) == 30
    assert (job.parent / "checkpoints" / "cli-resume").is_dir()
    # The replay from the last checkpoint meets rows already committed: every one is skipped.
    assert main(["run", str(job), "--resume"]) == EXIT_OK
    assert [pq.read_table(p) for p in parts()] == first
