"""User-facing errors.

Every error a user can cause (a bad file, a bad config key, a checkpoint that does not fit) is
raised as a :class:`MedSegDiffError` whose message is one line naming the file or key. The CLI
prints that line and exits non-zero without a traceback; library users can catch the base class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class MedSegDiffError(Exception):
    """Base class of errors caused by user input; the message names the offending file or key."""


class ConfigError(MedSegDiffError):
    """A configuration file or value is invalid."""


class DataError(MedSegDiffError):
    """An image, mask or data folder is missing, corrupt or inconsistent."""


class CheckpointError(MedSegDiffError):
    """A checkpoint or release is missing, corrupt, or built for another architecture."""


class DataWarning(UserWarning):
    """A data file was read, but something in it was repaired or looks wrong; the message starts
    with the file's path."""


def validation_message(source: str, errors: Sequence[Mapping[str, Any]]) -> str:
    """One line for pydantic's ``ValidationError.errors()``: ``<source>: <key>: <problem>`` for
    the first, and how many more there are (config files, hospital TOML, federation records)."""
    error = errors[0]
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    else:
        message = str(error["msg"]).removeprefix("Value error, ")
        given = error.get("input")
        if key and given is not None and not isinstance(given, dict):
            message += f" (got {given!r})"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{source}: {key + ': ' if key else ''}{message}{more}"
