"""One exception type for user-facing failures and a wrapper that turns it into a one-line error."""
from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class KeeprError(Exception):
    """A failure caused by the user's input or environment (bad file, missing weights, ...).

    Command-line scripts print its message on one line and exit with status 1; library callers can catch it.
    """


class MissingWeightsError(KeeprError, FileNotFoundError):
    """A weight file is not where the user said it is. ``where`` names its source (a release page, a URL, or the
    command that trains it), so the message reads "get it from: <where>"."""

    def __init__(self, path: str, what: str, where: str):
        super().__init__(f"missing weights: {path} ({what}) not found; get it from: {where}")


def cli_main(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorate a script's ``main``: a KeeprError becomes ``error: <message>`` on stderr and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeeprError as exc:
            msg = " ".join(str(exc).split())
            print(f"error: {msg}", file=sys.stderr)
            raise SystemExit(1) from None

    return wrapper
