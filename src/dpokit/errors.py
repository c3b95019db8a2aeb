"""The kinds of user error and the exit code of each (``dpokit`` prints them as one line).

Every error a user can cause and fix belongs to one kind; the CLI prints its message without a
traceback and exits with the kind's code (``--debug`` or ``DPOKIT_DEBUG=1`` shows the traceback).
This module imports nothing heavy, so the CLI can classify an error without loading torch or
``datasets``.

=====  =================================================================================
code   kind
=====  =================================================================================
0      success
1      an unexpected error (a bug): the traceback is printed
2      usage or configuration (`dpokit.config.ConfigError`, a bad flag)
3      input data (`dpokit.data.DataError`: names the file and the line or row)
4      model, files and I/O (`ModelError`, `PathError`, any `OSError`)
5      non-finite numbers stopped the run (`NonFiniteError`: training, reference log-probs)
6      out of memory (the message names the micro-batch and what helps)
130    interrupted (Ctrl-C)
=====  =================================================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BUG = 1
EXIT_CONFIG = 2
EXIT_DATA = 3
EXIT_FILES = 4
EXIT_NONFINITE = 5
EXIT_OUT_OF_MEMORY = 6
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """An error the user caused and can fix; ``exit_code`` is the CLI's exit status for it."""

    exit_code = EXIT_BUG


class ModelError(UserError, ValueError):
    """A model or tokenizer that cannot be used: missing locally while offline, no EOS token."""

    exit_code = EXIT_FILES


class PathError(UserError, OSError):
    """A path that cannot be used: an output directory that is a file, under a file, or not
    writable; a file that cannot be read or decoded."""

    exit_code = EXIT_FILES


class NonFiniteError(UserError, RuntimeError):
    """NaN/inf where numbers must be finite: the training loss or gradient, or the reference
    log-probs (NaN/inf weights). The message names the rows."""

    exit_code = EXIT_NONFINITE


def exit_code(error: BaseException) -> int | None:
    """The exit code of a user error (see the table above); None for a bug (show the traceback).

    Besides `UserError`: any `OSError` (a file that cannot be read or written, a download that
    failed) and a `UnicodeDecodeError` (a file that is not UTF-8) are file errors.
    """
    if isinstance(error, UserError):
        return error.exit_code
    if isinstance(error, (OSError, UnicodeDecodeError)):
        return EXIT_FILES
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return None


def one_line(error: BaseException) -> str:
    """The message to print for a user error: ours whole (their first line says it all, later
    lines list choices); a library's `OSError` as its first line, with the file it names."""
    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    if isinstance(error, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({error.reason} at byte {error.start})"
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}"
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


class ConfigError(UserError, ValueError):
    """A run configuration that cannot work; raised before anything is loaded (exit code 2)."""

    exit_code = EXIT_CONFIG
