"""The library's one exception for a request it cannot carry out as asked (a bad recipe file, an unknown gate
metric, a folder that is not a run...). The CLI turns it, and only it, into "Error: <message>" and its exit
code (cli.py, `translate_errors`); anything else is a bug and keeps its traceback."""

from __future__ import annotations

from contract.exits import Exit


class UserError(Exception):
    """Bad input or an impossible request: the message says what is wrong and what to do."""

    exit_code: int = Exit.USAGE

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
