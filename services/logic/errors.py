"""Domain errors of logic. servicer.py maps each to one gRPC status code; the
message goes to the caller unchanged, so it says what to fix."""

from __future__ import annotations


class LogicError(Exception):
    """Base of the errors below."""


class InvalidArgument(LogicError):
    """The request itself is wrong (ids, sizes, limits); retrying cannot help."""


class NotFound(LogicError):
    """The conversation does not exist (an unknown group)."""


class PermissionDenied(LogicError):
    """The caller may not do this (not a member, not the owner, not in the pair)."""


class FailedPrecondition(LogicError):
    """The request is valid but the state refuses it (e.g. the group is full)."""


class Unavailable(LogicError):
    """PostgreSQL or seqsvc cannot be reached. Nothing was committed; retrying is
    safe (sends are idempotent on client_msg_id)."""


class DependencyFailed(LogicError):
    """A dependency answered in a way that is neither success nor unavailability
    (e.g. seqsvc returned INTERNAL). Nothing was committed."""


class SequenceRegression(LogicError):
    """seqsvc handed out a value that is not above the last committed one for its
    key (invariants I1/I5). The transaction was rolled back; nothing was written."""
