"""The root of every error a user can cause.

``storage`` is the bottom of the house (it imports nothing of ours), so the one root class lives
here and every package's user-facing errors derive from it: bad flags, files, rows, a store or
server that does not fit. ``aligndistil``'s entry point catches :class:`UserError` once and prints
its message as one line with exit status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message says what and where, in one line."""


class ConfigError(UserError, ValueError):
    """Options that do not make a valid run; the message names the flag (or config key)."""
