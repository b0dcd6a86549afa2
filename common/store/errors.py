"""The prefix store's refusals: one StoreError subclass per reason, each naming the user.

``reason`` is a short machine-readable word (the HTTP layer and the CLI report it); the
message says which user's prefix and what is wrong.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

from ..errors import FedPrefixError, FingerprintMismatchError

__all__ = [
    "BadKeyError",
    "BadUserIdError",
    "CorruptError",
    "NonFiniteError",
    "PartsMismatchError",
    "RollbackError",
    "RollbackStateError",
    "StoreBusyError",
    "StoreError",
    "StoreIOError",
    "TamperedError",
    "TruncatedError",
    "UnknownUserError",
    "UnknownVersionError",
    "WrongBaseError",
    "WrongKeyError",
    "WrongUserError",
    "about",
    "naming_io_errors",
]


class StoreError(FedPrefixError):
    """Any refusal or failure of the prefix store; ``reason`` says which (subclasses)."""

    reason: str = "store_error"

    def __init__(self, message: str, user_id: str | None = None) -> None:
        super().__init__(message)
        self.user_id = user_id


class WrongKeyError(StoreError):
    """The key does not unwrap the user's data key (wrong key, or a damaged key block)."""

    reason = "wrong_key"


class TamperedError(StoreError):
    """The key is right but the payload fails authentication."""

    reason = "tampered"


class TruncatedError(StoreError):
    """The file ends early."""

    reason = "truncated"


class CorruptError(StoreError):
    """The file (or the store's state file) is malformed."""

    reason = "corrupt"


class WrongUserError(StoreError):
    """The file belongs to another user (copied or renamed)."""

    reason = "wrong_user"


class WrongBaseError(StoreError, FingerprintMismatchError):
    """The stored prefix belongs to another base model."""

    reason = "wrong_base"


class RollbackError(StoreError):
    """The file is older than one this store already wrote or read."""

    reason = "rollback"


class RollbackStateError(RollbackError):
    """The user's rollback record is missing, damaged or not theirs: loads stay refused until reset."""

    reason = "rollback_state"


class PartsMismatchError(RollbackStateError):
    """The user's files list other parts than are stored: one deleted, or put back, outside the store."""

    reason = "parts_mismatch"


class NonFiniteError(StoreError, ValueError):
    """A tensor to be saved holds NaN or Inf (nothing is written)."""

    reason = "non_finite"


class UnknownVersionError(StoreError):
    """The file has a format version this code does not know."""

    reason = "unknown_format_version"


class UnknownUserError(StoreError):
    """No prefix is stored for this user."""

    reason = "unknown_user"

    @classmethod
    def of(cls, user_id: str) -> UnknownUserError:
        return cls(about(user_id, "no prefix is stored for this user"), user_id)


class BadUserIdError(StoreError, ValueError):
    """The user id is not a valid store name."""

    reason = "bad_user_id"


class BadKeyError(StoreError, ValueError):
    """The key is neither a non-empty passphrase nor 32 raw bytes."""

    reason = "bad_key"


class StoreBusyError(StoreError):
    """Another process held the user's lock for too long."""

    reason = "busy"


class StoreIOError(StoreError, OSError):
    """The filesystem failed a read or write of the store (a full disk, a read-only or unreadable
    folder, a disk error); the message names the user, and the file where the OS named it. A
    write that failed before it was decided changed nothing stored; one that failed after
    says that the user's next lock completes it (locking.py). Also an OSError with the original
    errno, for callers that catch those (kept when pickled, as Ray and multiprocessing do)."""

    reason = "io_error"

    def __reduce__(self):
        return _io_error, (str(self), self.user_id, self.errno)

    @classmethod
    def of(cls, user_id: str | None, exc: OSError, problem: str | None = None) -> StoreIOError:
        """`exc` about `user_id`'s prefix (None: the store's); `problem` replaces the default wording."""
        where = f" at {exc.filename}" if exc.filename else ""
        return _io_error(
            about(user_id, problem or f"the filesystem failed{where}: {exc.strerror or exc}"), user_id, exc.errno
        )


def _io_error(message: str, user_id: str | None, errno: int | None) -> StoreIOError:
    """A StoreIOError carrying `errno` (OSError's own argument parsing is off: StoreError has an __init__)."""
    error = StoreIOError(message, user_id)
    error.errno = errno
    return error


Method = TypeVar("Method", bound=Callable)
# OSErrors, but not about files: a time limit's handler, a signal, a socket, a child process
NOT_FILESYSTEM = (
    TimeoutError,
    InterruptedError,
    ConnectionError,
    BlockingIOError,
    ChildProcessError,
    ProcessLookupError,
)


def naming_io_errors(method: Method) -> Method:
    """`method(self, user_id, ...)` with the OSErrors of the filesystem below it raised as
    StoreIOError, which names the user (a raw OSError names only a file)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except OSError as exc:
            if isinstance(exc, (StoreError, *NOT_FILESYSTEM)) or exc.errno is None:
                raise  # ours, or not the filesystem's (a time limit's handler raising TimeoutError)
            user_id = args[0] if args else kwargs.get("user_id")
            raise StoreIOError.of(user_id, exc) from exc

    return wrapper  # type: ignore[return-value]


def about(user_id: str | None, problem: str) -> str:
    """An error message that names whose prefix `problem` concerns (or the store, for None)."""
    return f"prefix of user {user_id!r}: {problem}" if user_id is not None else f"prefix store: {problem}"
