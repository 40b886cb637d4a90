"""Errors a user can cause. The CLI prints them on one line and exits with code 2."""


class UserError(Exception):
    """Bad input the user can fix (a wrong path, a malformed file, an invalid setting)."""

    exit_code = 2


class DatasetError(UserError):
    """A dataset on disk is missing, malformed or unreadable."""


class MissingDependencyError(UserError):
    """An optional tool or file the requested action needs is not available."""
