"""The one base class of every error a user can fix (bad input, bad config, a run dir in the way, ...).

The CLI turns any ``UserError`` into one line on stderr and exit code 2 (``launch/errors.py``); everything else is
a bug and keeps its traceback. Dependency-free on purpose: every layer raises subclasses of it.
"""
from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message says what and where (file, row, key) and how."""
