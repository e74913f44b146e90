"""Errors the toolkit raises on purpose.

Every error a user can cause derives from :class:`PaliGemmaEdgeError`; the CLI turns these
into one line on stderr and the error's ``exit_code``. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class PaliGemmaEdgeError(Exception):
    """Base class: a known failure with a message meant for the user."""

    exit_code = 1


class InputError(PaliGemmaEdgeError):
    """Bad usage or input: a missing file, an unreadable image, an out-of-range option."""

    exit_code = 2


class BundleError(InputError):
    """A bundle that is missing, incomplete, corrupt or of an unsupported schema."""


class BackendUnavailableError(InputError):
    """A runtime backend whose packages are not installed."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type name), for one-line error reports."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
