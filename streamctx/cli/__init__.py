"""The `streamctx` command: demo, run, validate, and submit/status/logs/stop on a Ray cluster.

`main(argv)` returns the exit code (0 ok, 1 failure, 2 usage, 3 cluster unreachable); user errors
are one line on stderr, with the traceback only under `--debug`.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence

from streamctx.cli.console import error_line
from streamctx.cli.errors import EXIT_FAILURE, CLIError
from streamctx.cli.parser import build_parser

__all__ = ["main"]


def _handler(command: str) -> Callable[[argparse.Namespace], int]:
    # Imported per command so that `streamctx status` does not import torch and the model.
    if command in ("submit", "status", "logs", "stop"):
        from streamctx.cli import cluster_commands

        return getattr(cluster_commands, command)
    from streamctx.cli import local_commands

    return getattr(local_commands, command)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _handler(args.command)(args)
    except CLIError as exc:
        if args.debug:
            traceback.print_exc()
        error_line(exc.message)
        return exc.exit_code
    except KeyboardInterrupt:
        error_line("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence of a CLI
        if args.debug:
            traceback.print_exc()
        first = (f"{type(exc).__name__}: {exc}".strip().splitlines() or [type(exc).__name__])[0]
        hint = not args.debug and not _is_user_error(exc)
        error_line(f"{first} (rerun with --debug for the traceback)" if hint else first)
        return EXIT_FAILURE


def _is_user_error(exc: BaseException) -> bool:
    """streamctx raises ValueError subclasses (a bad model folder, a bad spec) for things the user
    can fix (DESIGN contract 6); those need no traceback hint."""
    return isinstance(exc, ValueError) and type(exc).__module__.startswith("streamctx.")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
