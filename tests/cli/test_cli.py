"""The `streamctx` command line: parsing, exit codes, one-line errors, validate and run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streamctx.cli import main
from streamctx.cli.errors import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE


def _write_job(folder: Path, records: list[dict], **overrides: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "conv.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = {
        "name": "t",
        "source": {"type": "jsonl", "path": "conv.jsonl"},
        "model": None,  # no model stage: the dataflow alone, fast
        "runner": {"type": "local", "batch_size": 2},
        "sink": {"type": "parquet", "path": "out"},
        **overrides,
    }
    path = folder / "job.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


def _rows(folder: Path) -> pa.Table:
    """The part files of one output folder (not its dead_letter/ subfolder)."""
    return pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("part-*.parquet"))])


RECORDS = [
    {"session_id": "a", "turn": 1, "role": "user", "text": "hi"},
    {"session_id": "b", "turn": 1, "role": "user", "text": "hello"},
    {"session_id": "a", "turn": 2, "role": "user", "text": "more", "end": True},
    {"session_id": "b", "turn": "two", "role": "user", "text": "bad turn"},
]


def _errors(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == EXIT_USAGE
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == EXIT_USAGE
    with pytest.raises(SystemExit) as exc:
        main(["run", "job.yaml", "--runner", "spark"])
    assert exc.value.code == EXIT_USAGE
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--max-new-tokens", "0"])
    assert exc.value.code == EXIT_USAGE
    assert "positive integer" in capsys.readouterr().err


def test_validate_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = _write_job(tmp_path, RECORDS)
    assert main(["validate", str(job)]) == EXIT_OK
    assert capsys.readouterr().out.strip() == f"{job}: ok"


def test_validate_prints_every_error_with_its_field_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = _write_job(
        tmp_path,
        RECORDS,
        source={"type": "jsonl", "path": "missing.jsonl"},
        runner={"type": "local", "batch_size": 0, "colour": "red"},
        sink={"type": "parquet", "path": "../escape"},
    )
    assert main(["validate", str(job)]) == EXIT_FAILURE
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    fields = {line.removeprefix(f"{job}: ").split(":", 1)[0] for line in lines}
    assert {"runner.batch_size", "runner.colour", "source.path", "sink.path"} <= fields
    assert all(line.startswith(f"{job}: ") for line in lines)
    assert "errors in" in captured.err


def test_run_local_writes_rows_and_dead_letters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = _write_job(tmp_path, RECORDS)
    assert main(["run", str(job)]) == EXIT_OK
    captured = capsys.readouterr()
    table = _rows(tmp_path / "out")
    assert sorted(zip(table["session_id"].to_pylist(), table["turn"].to_pylist())) == [("a", 1), ("a", 2), ("b", 1)]
    dead = _rows(tmp_path / "out" / "dead_letter")
    assert dead.num_rows == 1 and "turn" in dead["reason"][0].as_py()
    assert "3 out of 4 records in" in captured.out
    assert "dead letters" in captured.out and "1 record(s) went to the dead-letter output" in captured.err


def test_run_out_redirects_outputs_and_keeps_inputs(tmp_path: Path) -> None:
    job = _write_job(tmp_path / "spec", RECORDS[:3])
    out = tmp_path / "elsewhere" / "results"
    assert main(["run", str(job), "--out", str(out)]) == EXIT_OK
    assert _rows(out).num_rows == 3
    assert not (tmp_path / "spec" / "out").exists()


def test_run_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tmp_path / "nope.yaml")]) == EXIT_FAILURE
    lines = _errors(capsys)
    assert lines[-1].startswith("error: invalid job spec") and "Traceback" not in "\n".join(lines)

    bad = _write_job(tmp_path / "bad", RECORDS, runner={"type": "local", "batch_size": -1})
    assert main(["run", str(bad)]) == EXIT_FAILURE
    lines = _errors(capsys)
    assert any("runner.batch_size" in line for line in lines)
    assert lines[-1].startswith("error: ") and len([x for x in lines if x.startswith("error:")]) == 1

    good = _write_job(tmp_path / "good", RECORDS)
    assert main(["run", str(good), "--resume"]) == EXIT_USAGE
    (line,) = _errors(capsys)
    assert line.startswith("error: --resume needs checkpoints")


def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--debug", "run", str(tmp_path / "nope.yaml")]) == EXIT_FAILURE
    assert "Traceback" in capsys.readouterr().err


def test_out_needs_a_file_sink(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = _write_job(tmp_path, RECORDS, sink={"type": "memory"})
    assert main(["run", str(job), "--out", str(tmp_path / "o")]) == EXIT_FAILURE
    (line,) = _errors(capsys)
    assert "--out needs a parquet or jsonl sink" in line


def test_cluster_commands_need_an_address(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert main(["status", "raysubmit_x"]) == EXIT_USAGE
    (line,) = _errors(capsys)
    assert line == "error: no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS"


def test_submit_checks_the_spec_before_connecting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", str(tmp_path / "nope.yaml"), "--address", "http://127.0.0.1:9"]) == EXIT_FAILURE
    (line,) = _errors(capsys)
    assert line.startswith("error: job spec not found")


def test_unreachable_cluster_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str], unused_port: int) -> None:
    assert main(["status", "raysubmit_x", "--address", f"http://127.0.0.1:{unused_port}"]) == EXIT_UNAVAILABLE
    (line,) = _errors(capsys)
    assert line.startswith(f"error: cannot reach the Ray dashboard at http://127.0.0.1:{unused_port}")


def test_python_dash_m_streamctx() -> None:
    proc = subprocess.run([sys.executable, "-m", "streamctx", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "streamctx 0.1.0"
    proc = subprocess.run([sys.executable, "-m", "streamctx", "validate"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_USAGE and "JOB.yaml" in proc.stderr


def test_failures_deep_in_the_job_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    job = _write_job(tmp_path / "j", RECORDS[:1], model={"path": str(not_a_model)})
    assert main(["run", str(job)]) == EXIT_FAILURE
    (line,) = _errors(capsys)
    # A model folder the user got wrong: named, no traceback, no hint to debug.
    assert line.startswith("error: ModelLoadError: ") and "no config.json" in line
    assert "--debug" not in line


def test_unexpected_errors_hint_at_debug(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from streamctx.cli import local_commands

    def boom(args: object) -> int:
        raise KeyError("internal")

    monkeypatch.setattr(local_commands, "validate", boom)
    assert main(["validate", "x.yaml"]) == EXIT_FAILURE
    (line,) = _errors(capsys)
    assert line == "error: KeyError: 'internal' (rerun with --debug for the traceback)"
