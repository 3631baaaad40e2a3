"""One family for every error a user can cause (bad data, a bad flag, a run folder that holds a
run, S3 refusing): each derives from `DaliImagenetError`, and its message is one line that names
the file or the setting and says what is wrong.

The command-line tools catch this base alone and print that line; anything else is a bug and
keeps its traceback. `DALI_IMAGENET_DEBUG=1` shows the traceback of user errors too.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager


class DaliImagenetError(Exception):
    """A problem with the input or the environment, not with the code; the message is one line."""


class UsageError(DaliImagenetError):
    """An argument or combination of arguments that cannot work (the message says what would)."""


class Interrupted(Exception):
    """A stop request acted on outside a train step (validation, a replay, start-up): nothing
    changed since the last checkpoint, so the run leaves without writing another. Not an error."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def debug() -> bool:
    return os.environ.get("DALI_IMAGENET_DEBUG", "") not in ("", "0")


@contextmanager
def one_line_errors():
    """Inside it, a user error ends the program with `error: <message>` on stderr and exit code 1."""
    try:
        yield
    except DaliImagenetError as error:
        if debug():
            raise
        sys.exit(f"error: {error}")
