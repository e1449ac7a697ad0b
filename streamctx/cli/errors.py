"""User-facing errors and exit codes of the `streamctx` command.

A `CLIError` is printed as one line (no traceback unless `--debug`) and turns into the exit code
it carries. Anything else that escapes a command is a bug and keeps its traceback under `--debug`.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # the job, the spec or a local file is at fault
EXIT_USAGE = 2  # bad command line (argparse's own convention)
EXIT_UNAVAILABLE = 3  # the cluster cannot be reached or refused the credentials


class CLIError(Exception):
    """An error the user can act on: one line of text and an exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message
