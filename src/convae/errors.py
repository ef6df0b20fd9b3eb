"""Errors a user can cause. The CLI turns each into a one-line message and exit code 2."""

from __future__ import annotations


class ConvaeError(Exception):
    """Base class: the message is meant for the user, as one line."""


class DataError(ConvaeError):
    """A dataset spec, file or folder that cannot be used as given."""


class ConfigError(ConvaeError):
    """An option or config.json value that is invalid."""


class RunDirError(ConvaeError):
    """A run directory that is missing, incomplete or inconsistent."""


class StorageError(ConvaeError, OSError):
    """A file convae writes could not be written (a full disk, a read-only folder).

    Also an OSError (with the original ``errno``), so code that catches OSError still does.
    The file being replaced, if any, is left as it was.
    """

    def __init__(self, message: str, errno: int | None = None, filename: str | None = None):
        super().__init__(message)
        self.errno = errno
        self.filename = filename

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class SkippedFileWarning(UserWarning):
    """An input file was skipped (unreadable, truncated, not an image)."""
