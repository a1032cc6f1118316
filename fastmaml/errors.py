"""Exceptions raised by fastmaml."""


class NonFiniteError(FloatingPointError):
    """A loss, gradient or meta-gradient became NaN or infinite.

    `where` names the phase ("support loss/gradient", "reverse sweep", "query loss", ...)
    and `step` the inner step at which it first appeared (None when not tied to a step).
    """

    def __init__(self, message, *, where=None, step=None):
        super().__init__(message)
        self.where = where
        self.step = step


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run an op (not built, no device, failed to load)."""
