"""The worker's failure kinds (contract.messages.ERROR_KINDS): each failure says which part of the world was wrong."""

from __future__ import annotations


class WorkerError(Exception):
    """A failure the worker understands; `kind` is one of contract.messages.ERROR_KINDS."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
