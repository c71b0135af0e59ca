"""Errors that the user can fix.

A `RouteLensError` carries a one-line message that says what is wrong and how to fix it;
the command line prints it without a traceback and exits with code 2. Anything else that
escapes is a bug and keeps its traceback.
"""


class RouteLensError(Exception):
    """Bad input or an unsupported setting, explained in one line."""


class OverrideNotApplied(RuntimeError):
    """A route override was requested but the router hook never fired or replaced fewer
    rows than asked: the result would silently be the natural route, so we refuse."""
