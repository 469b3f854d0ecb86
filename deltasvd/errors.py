"""Errors the core raises. Every message names the file (and the tensor where there is one)."""


class DeltaError(Exception):
    """A failure the user can act on: bad input, a refused operation, an unwritable output."""

    def __init__(self, message, path=None, tensor=None):
        self.path = str(path) if path is not None else None
        self.tensor = tensor
        self.message = message
        where = []
        if self.path:
            where.append(self.path)
        if tensor:
            where.append(f"tensor '{tensor}'")
        prefix = (": ".join(where) + ": ") if where else ""
        super().__init__(prefix + message)


class UsageError(DeltaError):
    """A call that cannot mean anything (bad option values); the CLI exits 2 on it."""


class Cancelled(Exception):
    """Raised by a progress callback to stop work; nothing is written."""
