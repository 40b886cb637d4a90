"""Errors a user can cause. The CLI prints them on one line and exits with code 2."""


class UserError(ValueError):
    """Bad input the user can fix (a wrong path, a malformed file, an invalid setting).

    A ``ValueError``: a library caller who guards a call with ``except ValueError`` (the usual
    exception for a bad argument) catches these too.
    """

    exit_code = 2


class DatasetError(UserError):
    """A dataset on disk is missing, malformed or unreadable."""


class MissingDependencyError(UserError):
    """An optional tool or file the requested action needs is not available."""


def require(condition: bool, message: str) -> None:
    """Raise ``UserError(message)`` unless ``condition``: one line per check of a setting."""
    if not condition:
        raise UserError(message)
