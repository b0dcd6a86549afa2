"""The project's error types: library code raises these, only the CLI prints them.

Each subclasses ValueError where the cause is bad input, so callers that catch
ValueError (as PEFT users do) keep working.
"""

import difflib


class FedPrefixError(Exception):
    """Base class of every error fedprefix raises on purpose."""


class ConfigError(FedPrefixError, ValueError):
    """A setting, name or argument is invalid."""


class UnsupportedModelError(ConfigError):
    """The base model's architecture cannot take a prefix here."""


class ShapeError(FedPrefixError, ValueError):
    """A tensor does not have the shape a prefix spec requires."""


class FingerprintMismatchError(FedPrefixError, ValueError):
    """A prefix was trained on a different base model than the one given."""


class DataError(FedPrefixError, ValueError):
    """Local training data is missing, malformed or unreadable."""


def first_error(exc, default_field: str = "value") -> tuple[str, str]:
    """(dotted field path, message) of a pydantic ValidationError's first error: what our messages name."""
    first = exc.errors()[0]
    message = first["msg"].removeprefix("Value error, ")  # what pydantic puts before our validators' words
    return ".".join(str(part) for part in first["loc"]) or default_field, message


def did_you_mean(name: str, known) -> str:
    """ " (did you mean X?)" for the name of `known` closest to a misspelled `name`, or ""."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""
