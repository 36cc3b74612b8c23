"""Domain errors. The API maps each class to one HTTP status in a single exception handler."""

from __future__ import annotations


class OblivioError(Exception):
    """Base of every error the domain raises on purpose; the message is shown to the caller."""


class NotFound(OblivioError):
    """The thing asked for does not exist (or the caller may not know that it does)."""


class Conflict(OblivioError):
    """The request is valid but clashes with the current state (e.g. cancel a running ticket)."""


class InvalidRequest(OblivioError):
    """The request breaks a business rule that a schema cannot express."""


class Forbidden(OblivioError):
    """The caller is known but not allowed to do this."""


class Unavailable(OblivioError):
    """A part the request needs (object store, Ray, database) cannot be reached now."""
