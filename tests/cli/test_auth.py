"""Ray auth token resolution for the Jobs API client."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamctx.cli.auth import auth_headers, resolve_token
from streamctx.cli.errors import CLIError


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def _file(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_precedence(tmp_path: Path, home: Path) -> None:
    flag = _file(tmp_path / "flag", "from-flag\n")
    path_env = _file(tmp_path / "env-path", "  from-path-env  ")
    _file(home / ".ray" / "auth_token", "from-default")
    env = {"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(path_env)}
    assert resolve_token(str(flag), env) == "from-flag"
    assert resolve_token(None, env) == "from-env"
    assert resolve_token(None, {"RAY_AUTH_TOKEN": "  ", "RAY_AUTH_TOKEN_PATH": str(path_env)}) == "from-path-env"
    assert resolve_token(None, {}) == "from-default"


def test_no_token_anywhere(home: Path) -> None:
    assert resolve_token(None, {}) is None
    assert auth_headers(None) == {}


def test_unreadable_or_empty_token_files_are_errors(tmp_path: Path, home: Path) -> None:
    with pytest.raises(CLIError, match="cannot read the Ray auth token from --token-file"):
        resolve_token(str(tmp_path / "missing"), {})
    with pytest.raises(CLIError, match="RAY_AUTH_TOKEN_PATH"):
        resolve_token(None, {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})
    with pytest.raises(CLIError, match="is empty"):
        resolve_token(str(_file(tmp_path / "empty", "\n")), {})


def test_bearer_header() -> None:
    assert auth_headers("abc") == {"Authorization": "Bearer abc"}
