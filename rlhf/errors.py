"""The project's own exceptions: what a user can fix, said where and how.

The CLI prints these without a traceback; anything else is our bug and keeps its traceback.
"""


class RLHFError(Exception):
    """Base class for errors a user can act on."""


class ConfigError(RLHFError):
    """A config field is unknown, mistyped or inconsistent with another field."""


class DataError(RLHFError):
    """A data file is missing, malformed or holds a record that breaks the format."""


class ModelError(RLHFError):
    """A model directory or adapter cannot be loaded or does not fit the request."""
