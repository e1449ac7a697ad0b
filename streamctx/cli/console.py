"""Where the CLI writes: results to stdout, diagnostics and progress to stderr (rich)."""

from __future__ import annotations

import sys

from rich.console import Console


LOG_WIDTH = 160


def _width(stream: object) -> int | None:
    """The terminal's width on a terminal; a wide fixed width in logs and pipes (rich would use
    80 columns there and fold the paths in the summary table)."""
    isatty = getattr(stream, "isatty", None)
    if callable(isatty) and isatty():
        return None
    return LOG_WIDTH


# rich resolves sys.stdout/sys.stderr at write time, so redirection and pytest capture work.
out = Console(highlight=False, soft_wrap=True, width=_width(sys.stdout))
err = Console(stderr=True, highlight=False, soft_wrap=True, width=_width(sys.stderr))


def error_line(message: str) -> None:
    """Print one `error: ...` line to stderr, markup-free (messages may hold brackets)."""
    err.print("[bold red]error:[/] ", end="")
    err.print(message, markup=False)
