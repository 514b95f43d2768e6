"""Errors a user can cause, one base class for all of them.

Every error that bad *input* can trigger (a prompt, a config value, a tree
spec, a checkpoint, an acceptance file, ...) derives from `UserError`. Entry
points (`launch/*.py`) print such an error as one `error: ...` line and exit
with status 1; any other exception is a bug and keeps its traceback.

`UserError` derives from `ValueError` so that `except ValueError` in user
code keeps working; the converse does not hold: a bare `ValueError` raised by
seqdec's internals is not a `UserError`. This module is a leaf: every package
(kernels and parallel included) may import it.
"""

from __future__ import annotations


class UserError(ValueError):
  """Bad input: reported as one line, exit status 1, no traceback."""


class ConfigError(UserError):
  """An unknown config key or option, or a value of the wrong type."""


class TreeError(UserError):
  """An invalid token tree or tree spec (bad parent pointers, duplicate
  paths, too deep for the context, ...)."""


# Errors of the file system that are the user's (a path that does not exist,
# a directory where a file was expected, no permission).
USER_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError,
                  PermissionError)

# What an entry point reports as one line.
USER_ERRORS = (UserError,) + USER_OS_ERRORS
