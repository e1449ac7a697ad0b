"""Ray token authentication for the Jobs API client.

Ray (2.52+) authenticates HTTP requests to the dashboard with `Authorization: Bearer <token>`.
`JobSubmissionClient` only adds that header by itself when the *client* process runs with
`RAY_AUTH_MODE=token`; we resolve the token ourselves and pass the header explicitly, so a laptop
talking to a secured cluster needs nothing but the token. Precedence follows Ray's own loader:
an explicit `--token-file`, then `RAY_AUTH_TOKEN`, then `RAY_AUTH_TOKEN_PATH`, then Ray's default
token file (`~/.ray/auth_token`) when it exists.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from streamctx.cli.errors import CLIError

AUTHORIZATION_HEADER = "Authorization"
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")


def _read_token_file(path: Path, origin: str) -> str:
    try:
        token = path.expanduser().read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise CLIError(f"cannot read the Ray auth token from {origin} {path}: {exc.strerror}") from exc
    if not token:
        raise CLIError(f"the Ray auth token file {path} ({origin}) is empty")
    return token


def resolve_token(token_file: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """The Ray auth token to send, or None to send no credentials."""
    env = os.environ if env is None else env
    if token_file:
        return _read_token_file(Path(token_file), "--token-file")
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return env["RAY_AUTH_TOKEN"].strip()
    if env.get("RAY_AUTH_TOKEN_PATH"):
        return _read_token_file(Path(env["RAY_AUTH_TOKEN_PATH"]), "RAY_AUTH_TOKEN_PATH")
    default = DEFAULT_TOKEN_FILE.expanduser()
    if default.is_file():
        return _read_token_file(default, "the default token file")
    return None


def auth_headers(token: str | None) -> dict[str, str]:
    """HTTP headers carrying `token` (empty without one)."""
    return {AUTHORIZATION_HEADER: f"Bearer {token}"} if token else {}
