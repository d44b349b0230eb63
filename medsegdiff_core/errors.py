"""User-facing errors.

Every error a user can cause (a bad file, a bad config key, a checkpoint that does not fit) is
raised as a :class:`MedSegDiffError` whose message is one line naming the file or key. The CLI
prints that line and exits non-zero without a traceback; library users can catch the base class.
"""


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
