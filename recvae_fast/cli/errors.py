"""The command line's expected failures, each reported in one line on stderr with exit code 2."""
from __future__ import annotations

from ..runfolder import RunFolderBusy


class UsageError(Exception):
    """Bad input from the command line: reported in one line, no traceback."""


# Bad input, I/O errors, corrupt or incompatible files (ValueError covers DataError and
# RunFolderError), a busy run folder. Anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (UsageError, ValueError, RunFolderBusy, OSError)


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
