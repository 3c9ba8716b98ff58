"""Entry points that report a user's mistake in one line, not a traceback.

An entry point ends with ``sys.exit(run_main(main))``. :func:`run_main` runs ``main(argv)``:

* an expected user error (``ValueError`` and its subclasses, such as the project's
  ``DataError`` or :class:`UsageError`; ``FileNotFoundError``, ``FileExistsError``,
  ``IsADirectoryError``, ``NotADirectoryError``, ``PermissionError``; a full disk or a
  read-only filesystem; a ``KeyError`` raised with a message) prints ``error: <message>`` on
  stderr and exits with 2;
* ``KeyboardInterrupt`` prints ``interrupted`` and exits with 130;
* anything else is a bug: the full traceback, exit code 1.

``--debug`` on the command line (removed before ``main`` sees it) or ``SIFT_JAX_DEBUG=1`` in
the environment shows the traceback of user errors too. A run that has an output directory
can call :func:`set_error_log` (e.g. with ``<output_dir>/error.log``): every error's traceback
is then appended there, and the message says so. :func:`errors_logged_to` does it for a block
(the jobs use it once their output directory is locked), without leaving the registration
behind when the job is called directly rather than through :func:`run_main`.

Nothing here imports the rest of ``train/``.

Example:
    >>> def main(argv):
    ...     raise UsageError(f"--num_train_epochs must be >= 1, got {argv[1]}.")
    >>> import contextlib, io
    >>> err = io.StringIO()
    >>> with contextlib.redirect_stderr(err):
    ...     code = run_main(main, ["--num_train_epochs", "0"])
    >>> code, err.getvalue()
    (2, 'error: --num_train_epochs must be >= 1, got 0.\\n')
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DEBUG_ENV",
    "EXIT_BUG",
    "EXIT_INTERRUPTED",
    "EXIT_USAGE",
    "UsageError",
    "error_log",
    "errors_logged_to",
    "is_user_error",
    "run_main",
    "set_error_log",
]

DEBUG_ENV = "SIFT_JAX_DEBUG"
EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_USER_OSERRORS = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)
# OSErrors the user fixes in the environment, whatever raised them.
_USER_ERRNOS = {errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)}

# A ValueError raised inside these packages is a bug in how the project called them (a shape
# mismatch, say), not the user's: it keeps its traceback.
_LIBRARY_PACKAGES = frozenset(
    {"jax", "jaxlib", "numpy", "flax", "optax", "orbax", "chex", "ml_dtypes", "einops"}
)

_error_log: Path | None = None


class UsageError(ValueError):
    """A mistake in the command line or the configuration: reported as ``error: <message>``
    with exit code 2 (a ``ValueError``, so code that catches those catches it too)."""


def set_error_log(path: str | os.PathLike | None) -> Path | None:
    """Registers a file (e.g. ``<output_dir>/error.log``) to which :func:`run_main` appends
    the traceback of any error, user error or bug; ``None`` unregisters it. Returns the file
    registered before. A registration made during a :func:`run_main` call ends with it.

    Example:
        >>> previous = set_error_log("/tmp/run/error.log")
        >>> error_log()
        PosixPath('/tmp/run/error.log')
        >>> _ = set_error_log(previous)
    """
    global _error_log
    before = _error_log
    _error_log = None if path is None else Path(path)
    return before


_LOG_ATTR = "_sift_jax_error_log"


@contextlib.contextmanager
def errors_logged_to(path: str | os.PathLike) -> Iterator[Path]:
    """Registers ``path`` with :func:`set_error_log` for the block. An error leaving the
    block carries ``path`` with it, so :func:`run_main` still appends its traceback there;
    the registration itself ends with the block (a job called directly, e.g. by a test,
    leaves no error log registered behind).

    Example:
        >>> import contextlib, io, tempfile
        >>> def main(argv):
        ...     with errors_logged_to(Path(argv[0]) / "error.log"):
        ...         raise UsageError("--learning_rate must be > 0, got 0.")
        >>> with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()):
        ...     code = run_main(main, [tmp])
        ...     logged = "UsageError" in (Path(tmp) / "error.log").read_text()
        >>> code, logged, error_log() is None
        (2, True, True)
    """
    path = Path(path)
    previous = set_error_log(path)
    try:
        yield path
    except BaseException as e:
        with contextlib.suppress(AttributeError, TypeError):
            setattr(e, _LOG_ATTR, getattr(e, _LOG_ATTR, None) or path)
        raise
    finally:
        set_error_log(previous)


def error_log() -> Path | None:
    """The file registered with :func:`set_error_log`, or ``None``.

    Example:
        >>> error_log() is None
        True
    """
    return _error_log


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a mistake the user can fix from its message alone (see the module).

    A ``KeyError`` counts only when raised with a message (a string with a space in it):
    ``d["key"]`` failing is a bug. So is an error raised inside jax, numpy, flax, optax or
    orbax (see ``_LIBRARY_PACKAGES``): the project passed them something wrong.

    Example:
        >>> is_user_error(ValueError("bad")), is_user_error(KeyError("Unknown task 'x'."))
        (True, True)
        >>> is_user_error(KeyError("x")), is_user_error(ZeroDivisionError())
        (False, False)
    """
    if isinstance(exc, UsageError):
        return True
    if isinstance(exc, KeyError):
        user = len(exc.args) == 1 and isinstance(exc.args[0], str) and " " in exc.args[0]
    else:
        user = isinstance(exc, (ValueError, *_USER_OSERRORS)) or (
            isinstance(exc, OSError) and exc.errno in _USER_ERRNOS
        )
    return user and _raised_in(exc) not in _LIBRARY_PACKAGES


def _raised_in(exc: BaseException) -> str | None:
    """The top-level package of the innermost Python frame of ``exc``'s traceback."""
    tb = exc.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    name = tb.tb_frame.f_globals.get("__name__") or ""
    return name.split(".")[0] or None


def _message(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])  # str(KeyError) would quote it
    else:
        text = str(exc)
    text = text.strip() or type(exc).__name__
    notes = getattr(exc, "__notes__", None) or []
    return "\n".join([text, *(str(n) for n in notes)])


def _debug_requested(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug`` (only before a ``--`` separator) and whether it was there."""
    end = argv.index("--") if "--" in argv else len(argv)
    head = [a for a in argv[:end] if a != "--debug"]
    flag = len(head) != end
    env = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return head + argv[end:], flag or env


def _append_log(path: Path, exc: BaseException, argv: Sequence[str]) -> str | None:
    """Appends the traceback to ``path``; returns an error message if it could not."""
    text = "".join(traceback.format_exception(exc))
    header = f"=== {time.strftime('%Y-%m-%dT%H:%M:%S%z')} pid {os.getpid()}: {list(argv)}\n"
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(header + text + "\n")
    except OSError as e:
        return str(e)
    return None


def run_main(
    main: Callable[[list[str]], Any],
    argv: Sequence[str] | None = None,
    *,
    prog: str | None = None,
) -> int:
    """Runs ``main(argv)`` (``argv`` defaults to ``sys.argv[1:]``, less ``--debug``) and
    returns the process's exit code: ``main``'s own if it returns an ``int`` (or calls
    ``sys.exit``), else 0; 2 for a user error, 130 for ``KeyboardInterrupt``, 1 for a bug.
    ``prog`` prefixes the messages (``prog: error: ...``).

    Example:
        >>> import contextlib, io
        >>> def buggy(argv):
        ...     return 1 / 0
        >>> err = io.StringIO()
        >>> with contextlib.redirect_stderr(err):
        ...     code = run_main(buggy, [], prog="train.glue")
        >>> code, "Traceback" in err.getvalue(), err.getvalue().splitlines()[-1]
        (1, True, 'ZeroDivisionError: division by zero')
        >>> run_main(lambda argv: {"eval_accuracy": 1.0}, [])
        0
    """
    args, debug = _debug_requested(list(sys.argv[1:] if argv is None else argv))
    prefix = f"{prog}: " if prog else ""
    saved_log = _error_log
    try:
        result = main(args)
    except SystemExit as e:
        code = e.code
        if code is None or isinstance(code, int):
            return int(code or 0)
        print(code, file=sys.stderr)
        return EXIT_BUG
    except KeyboardInterrupt as e:
        where = _log_note(e, args)
        if debug:
            traceback.print_exception(e, file=sys.stderr)
        print(f"{prefix}interrupted{where and f' ({where})'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        where = _log_note(e, args)
        user = is_user_error(e)
        if debug or not user:
            traceback.print_exception(e, file=sys.stderr)
        if user:
            print(f"{prefix}error: {_message(e)}{where and f' ({where})'}", file=sys.stderr)
            return EXIT_USAGE
        if where:
            print(f"{prefix}({where})", file=sys.stderr)
        return EXIT_BUG
    finally:
        set_error_log(saved_log)
    if isinstance(result, int) and not isinstance(result, bool):
        return result
    return 0


def _log_note(exc: BaseException, argv: Sequence[str]) -> str:
    """Appends ``exc``'s traceback to the registered error log; says where (or why not)."""
    log = getattr(exc, _LOG_ATTR, None) or _error_log
    if log is None:
        return ""
    failed = _append_log(log, exc, argv)
    if failed:
        return f"could not write the traceback to {log}: {failed}"
    return f"traceback in {log}"
