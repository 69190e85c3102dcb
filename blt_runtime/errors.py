"""Typed exceptions at the runtime's edge.

Each one carries a message a user can act on. The server maps them to HTTP status codes in one
place; the command-line tools print them as one line and exit non-zero.
"""


class BltError(Exception):
    """Base class of every error the runtime raises on purpose."""


class ConfigError(BltError):
    """A config.json the runtime cannot serve faithfully: unknown type, unsupported option."""


class WeightsError(BltError):
    """A weights file that is unreadable, or whose tensors do not match the config."""


class ConversionError(BltError):
    """A Meta checkpoint that cannot be converted to the native layout."""


class GuideError(BltError, ValueError):
    """A pattern, choices or JSON schema that cannot guide a completion (guide.py; HTTP 400)."""
