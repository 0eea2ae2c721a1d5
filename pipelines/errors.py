"""The one base class of errors caused by the user's input (a missing file, a wrong setting, an unknown class).

Entry points catch ``UserError`` and print ``error: <message>`` on one line with exit code 2 instead of a
traceback (``pipelines.cli.user_errors_exit``). A new user-facing error subclasses it, nothing else to register.
This module imports nothing from the project, so every package (``tokenizer/`` included) may import it.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix from the message alone; subclasses also derive from the builtin that fits."""


class ConfigError(UserError, ValueError):
    """A configuration key or value the code does not accept (unknown key, unknown quantizer argument)."""


class MissingCheckpointError(UserError, FileNotFoundError):
    """A checkpoint directory or one of its files is absent."""
