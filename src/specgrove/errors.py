"""Errors a user can meet. Each message says what is wrong and what to do."""


class SpecgroveError(Exception):
    """Base class for every error specgrove raises on bad input or a bad environment."""


class ModelNotFoundError(SpecgroveError, FileNotFoundError):
    pass


class ChecksumMismatchError(SpecgroveError):
    pass


class IncompatibleModelsError(SpecgroveError):
    pass


class UnsupportedError(SpecgroveError):
    """A requested feature the engine cannot honour (never silently ignored)."""
