"""Errors a user can cause. The CLI turns each into a one-line message and exit code 2."""


class ConvaeError(Exception):
    """Base class: the message is meant for the user, as one line."""


class DataError(ConvaeError):
    """A dataset spec, file or folder that cannot be used as given."""


class ConfigError(ConvaeError):
    """An option or config.json value that is invalid."""


class RunDirError(ConvaeError):
    """A run directory that is missing, incomplete or inconsistent."""


class SkippedFileWarning(UserWarning):
    """An input file was skipped (unreadable, truncated, not an image)."""
