"""Where the CLI writes: results to stdout, diagnostics and progress to stderr (rich)."""

from __future__ import annotations

from rich.console import Console

# rich resolves sys.stdout/sys.stderr at write time, so redirection and pytest capture work.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def error_line(message: str) -> None:
    """Print one `error: ...` line to stderr, markup-free (messages may hold brackets)."""
    err.print(f"[bold red]error:[/] ", end="")
    err.print(message, markup=False)
