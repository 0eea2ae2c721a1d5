"""The one base class of errors caused by the user's input (a missing file, a wrong setting, an unknown class).

Entry points catch ``UserError`` (and ``OSError``) and print ``error: <message>`` on one line with exit code 2
instead of a traceback (``pipelines.cli.user_errors_exit``; ``IBQ_DEBUG=1`` shows the traceback). A new
user-facing error subclasses it, nothing else to register. This module imports nothing from the project, so
every package (``tokenizer/`` included) may import it.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix from the message alone; subclasses also derive from the builtin that fits."""


class ConfigError(UserError, ValueError):
    """A configuration key or value the code does not accept (unknown key, out-of-range option)."""


class MissingCheckpointError(UserError, FileNotFoundError):
    """A checkpoint directory or one of its files is absent."""


class CorruptFileError(UserError, ValueError):
    """A file that exists but cannot be read back (truncated, damaged, fails its checksum); names the file."""


class RunDirError(UserError, RuntimeError):
    """A run or output directory that may not be used as asked (it holds work that would be overwritten)."""


class DirectoryLockedError(UserError, RuntimeError):
    """Another live process owns the directory (its lock names the pid, host and start time)."""


class WriteError(UserError, OSError):
    """A file could not be written (disk full, read-only, permission denied); the previous version is intact.
    ``errno`` and ``filename`` are the original error's; the message is the one line to show."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
