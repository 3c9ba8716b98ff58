"""The output directory of a run: a lock, atomic files, and a completion marker.

Nothing here imports the rest of ``train/`` (only the standard library), so a trainer can take
the output directory, and fail on a busy, non-empty or read-only one, before it loads a model.

* :class:`OutputDir` takes an advisory lock on ``<dir>/.lock`` for the whole run, then checks
  the directory (empty, or ``overwrite`` / ``resume``) and clears it for ``overwrite``.
* :func:`write_text_atomic`, :func:`write_json_atomic`, :func:`write_bytes_atomic` and
  :func:`atomic_path` make each file appear whole or not at all.
* :func:`mark_running` / :func:`mark_complete` write ``run_state.json``; :func:`is_complete`
  says whether a directory holds a finished run (the marker says so *and* every output it
  lists exists). ``mark_complete`` is written last, after every output.
* :func:`check_writable` fails at once on a directory the run cannot write.

Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     with OutputDir(Path(tmp) / "run") as out:
    ...         _ = mark_running(out.path, step=0)
    ...         _ = write_json_atomic(out.path / "all_results.json", {"eval_accuracy": 0.9})
    ...         _ = mark_complete(out.path, outputs=["all_results.json"], step=10)
    ...     is_complete(Path(tmp) / "run")
    True
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "ERROR_LOG",
    "LOCK_NAME",
    "RUN_STATE",
    "OutputDir",
    "OutputDirError",
    "OutputDirLocked",
    "OutputDirNotEmpty",
    "OutputDirNotWritable",
    "IncompleteRunError",
    "atomic_path",
    "check_writable",
    "is_complete",
    "mark_complete",
    "mark_running",
    "missing_outputs",
    "read_run_state",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]

LOCK_NAME = ".lock"
RUN_STATE = "run_state.json"
# Where a run's tracebacks go (train.core.cli.set_error_log). A directory holding only this
# file (a run that failed before writing anything) still counts as empty.
ERROR_LOG = "error.log"

# Entries that mark a directory as a run's output directory: ``overwrite`` clears only such a
# directory (``--overwrite_output_dir`` must not wipe a home directory given by mistake).
RUN_ENTRIES = (
    RUN_STATE,
    "train_config.json",
    "train_log.jsonl",
    "all_results.json",
    "eval_results.json",
    "sift_delta.safetensors",
    "checkpoints",
    "model",
    ERROR_LOG,
)

# Subdirectories a resumed run writes into: checked for writability when the dir is taken.
WRITTEN_SUBDIRS = ("checkpoints", "model")

# check_writable's probe files: another process may be probing while the primary looks at the
# directory, so they never count as contents (nor are they cleared).
_PROBE = ".write-test"

_FIX = "pass --overwrite_output_dir to replace it or --resume_from_checkpoint latest to continue it"


class OutputDirError(ValueError):
    """A problem with the output directory that the user can fix (a ``ValueError``, so the
    CLI reports it as a usage error, without a traceback)."""


class OutputDirLocked(OutputDirError):
    """Another live run holds the directory's lock."""


class OutputDirNotEmpty(OutputDirError):
    """The directory holds a previous run and neither ``overwrite`` nor ``resume`` was given."""


class OutputDirNotWritable(OutputDirError):
    """The directory cannot be written (permissions, read-only filesystem, no space)."""


class IncompleteRunError(OutputDirError):
    """:func:`mark_complete` was asked to mark a run whose outputs are not all there."""


# ------------------------------------------------------------------------------------------
# Atomic files


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def _create_temp(path: Path) -> tuple[int, Path]:
    """Creates a new temporary file next to ``path``, mode ``0o666`` less the umask (unlike
    ``tempfile.mkstemp``, which makes ``0o600`` files)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        return fd, tmp
    raise FileExistsError(f"Could not create a temporary file next to {path}.")


def _umask_mode() -> int:
    """``0o666`` less the process umask, read without changing it (``os.umask`` would, for
    every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # fallback (no /proc): briefly sets it, restores it at once
    os.umask(mask)
    return 0o666 & ~mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``path`` so that ``path`` is always either the old file or the whole
    new one: a temporary file in the same directory, ``fsync``, then ``os.replace``.

    The file gets the usual mode for new files (``0o666`` less the umask). If anything fails
    (or the process is interrupted in Python) the temporary file is removed.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     p = write_bytes_atomic(Path(tmp) / "x.bin", b"abc")
        ...     p.read_bytes(), sorted(f.name for f in Path(tmp).iterdir())
        (b'abc', ['x.bin'])
    """
    path = Path(path)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """:func:`write_bytes_atomic` for text.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     write_text_atomic(Path(tmp) / "a.txt", "hello\\n").read_text()
        'hello\\n'
    """
    return write_bytes_atomic(path, text.encode(encoding))


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):  # numpy / jax scalars and arrays, without importing them
        return o.tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    if isinstance(o, set | frozenset):
        return sorted(o)
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


def write_json_atomic(
    path: str | os.PathLike, data: Any, *, indent: int | None = 2, sort_keys: bool = True
) -> Path:
    """Writes ``data`` as JSON (plus a newline) with :func:`write_bytes_atomic`. numpy / jax
    scalars and arrays are written as numbers and lists, paths as strings.

    The JSON is built before the file is touched, so an unserializable value leaves the old
    file as it was.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     p = write_json_atomic(Path(tmp) / "r.json", {"b": 1, "a": [0.5]})
        ...     json.loads(p.read_text())
        {'a': [0.5], 'b': 1}
    """
    text = json.dumps(data, indent=indent, sort_keys=sort_keys, default=_json_default) + "\n"
    return write_text_atomic(path, text)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to ``path`` for a writer that takes a file name (e.g.
    ``safetensors.numpy.save_file``); when the block ends without an error the file is given
    the umask's mode (some writers make ``0o600`` files), ``fsync``-ed and moved onto
    ``path``. On an error it is removed and ``path`` is left as it was.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     with atomic_path(Path(tmp) / "w.bin") as p:
        ...         _ = p.write_bytes(b"w")
        ...     sorted(f.name for f in Path(tmp).iterdir())
        ['w.bin']
    """
    path = Path(path)
    fd, tmp = _create_temp(path)
    os.close(fd)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"The writer for {path} did not write {tmp}.")
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fchmod(fd, _umask_mode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


# ------------------------------------------------------------------------------------------
# Completion marker


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def read_run_state(out_dir: str | os.PathLike) -> dict | None:
    """The contents of ``<out_dir>/run_state.json``, or ``None`` if it is missing or not a
    JSON object (a run that never wrote it, or a damaged file).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     before = read_run_state(tmp)
        ...     _ = mark_running(tmp, step=3)
        ...     before, read_run_state(tmp)["status"], read_run_state(tmp)["step"]
        (None, 'running', 3)
    """
    try:
        state = json.loads((Path(out_dir) / RUN_STATE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _check_names(outputs: Iterable[str | os.PathLike]) -> list[str]:
    names = []
    for o in outputs:
        name = os.fspath(o)
        p = Path(name)
        if not name or p.is_absolute() or ".." in p.parts:
            raise ValueError(f"Output {name!r} must be a relative path inside the directory.")
        names.append(p.as_posix())
    return names


def _present(p: Path) -> bool:
    """A file, or a directory with something in it (an empty ``model/`` is not an output)."""
    if p.is_dir():
        return any(p.iterdir())
    return p.is_file()


def missing_outputs(out_dir: str | os.PathLike, outputs: Iterable[str | os.PathLike]) -> list[str]:
    """The names in ``outputs`` that are not in ``out_dir``: a file must exist, a directory
    must exist and not be empty.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = write_text_atomic(Path(tmp) / "a.json", "{}")
        ...     (Path(tmp) / "model").mkdir()
        ...     missing_outputs(tmp, ["a.json", "model", "b.safetensors"])
        ['model', 'b.safetensors']
    """
    d = Path(out_dir)
    return [n for n in _check_names(outputs) if not _present(d / n)]


def _write_state(out_dir: Path, status: str, outputs: list[str], step, info: Mapping) -> Path:
    state = read_run_state(out_dir) or {}
    started = state.get("started") if state.get("status") in ("running", "complete") else None
    state = {
        **{k: v for k, v in state.items() if k not in ("finished",)},
        **dict(info),
        "status": status,
        "outputs": outputs,
        "step": step,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": started or _now(),
        "updated": _now(),
    }
    if status == "complete":
        state["finished"] = state["updated"]
    return write_json_atomic(out_dir / RUN_STATE, state)


def mark_running(
    out_dir: str | os.PathLike,
    *,
    step: int = 0,
    outputs: Iterable[str] = (),
    **info: Any,
) -> Path:
    """Writes ``run_state.json`` with ``"status": "running"``: call it when the run starts
    (after :class:`OutputDir` is entered, and again on resume), and before rewriting the
    outputs of a finished run, so that a run killed meanwhile does not look complete.

    ``outputs`` (optional) names what the run will write; ``info`` is stored as is (e.g.
    ``total_steps=...``). Returns the marker's path.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = mark_running(tmp, step=0, total_steps=100)
        ...     s = read_run_state(tmp)
        ...     s["status"], s["total_steps"], is_complete(tmp)
        ('running', 100, False)
    """
    return _write_state(Path(out_dir), "running", _check_names(outputs), step, info)


def mark_complete(
    out_dir: str | os.PathLike,
    outputs: Iterable[str | os.PathLike],
    *,
    step: int | None = None,
    **info: Any,
) -> Path:
    """Writes ``run_state.json`` with ``"status": "complete"`` and the list of ``outputs``
    (names relative to ``out_dir``): call it last, after every output is written. Raises
    :class:`IncompleteRunError` (and leaves the marker as it was) if one of them is missing:
    a file must exist, a directory must not be empty.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = write_json_atomic(Path(tmp) / "all_results.json", {})
        ...     try:
        ...         mark_complete(tmp, ["all_results.json", "sift_delta.safetensors"])
        ...     except IncompleteRunError as e:
        ...         print(str(e).replace(tmp, "<tmp>"))
        Cannot mark the run in <tmp> complete: missing sift_delta.safetensors.
    """
    d = Path(out_dir)
    names = _check_names(outputs)
    missing = missing_outputs(d, names)
    if missing:
        raise IncompleteRunError(
            f"Cannot mark the run in {d} complete: missing {', '.join(missing)}."
        )
    if step is None:
        step = (read_run_state(d) or {}).get("step")
    return _write_state(d, "complete", names, step, info)


def is_complete(out_dir: str | os.PathLike) -> bool:
    """Whether ``out_dir`` holds a finished run: ``run_state.json`` says ``complete`` and every
    output it lists is there. A directory with ``all_results.json`` but no marker is not.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = write_json_atomic(Path(tmp) / "all_results.json", {})
        ...     no_marker = is_complete(tmp)
        ...     _ = mark_complete(tmp, ["all_results.json"])
        ...     no_marker, is_complete(tmp)
        (False, True)
    """
    state = read_run_state(out_dir)
    if not state or state.get("status") != "complete":
        return False
    outputs = state.get("outputs")
    if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
        return False
    try:
        return not missing_outputs(out_dir, outputs)
    except ValueError:
        return False


# ------------------------------------------------------------------------------------------
# Writability


def check_writable(path: str | os.PathLike, *, what: str = "--output_dir") -> Path:
    """Raises :class:`OutputDirNotWritable` at once if a file cannot be created, written and
    removed in the directory ``path`` (instead of a writer hanging or failing late). ``what``
    names the directory in the message.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     check_writable(tmp) == Path(tmp)
        True
        >>> try:
        ...     check_writable("/nonexistent/dir")
        ... except OutputDirNotWritable as e:
        ...     print(e)
        --output_dir /nonexistent/dir does not exist.
    """
    p = Path(path)
    if not p.exists():
        raise OutputDirNotWritable(f"{what} {p} does not exist.")
    if not p.is_dir():
        raise OutputDirNotWritable(f"{what} {p} is not a directory.")
    tmp = None
    try:
        fd, tmp = _create_temp(p / _PROBE)
        try:
            os.write(fd, b"x")
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    except OSError as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise OutputDirNotWritable(f"{what} {p} is not writable: {_oserror(e)}") from e
    return p


def _oserror(e: OSError) -> str:
    if e.errno is not None:
        return f"{os.strerror(e.errno)} (errno {errno.errorcode.get(e.errno, e.errno)})"
    return str(e)


# ------------------------------------------------------------------------------------------
# The lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _describe_holder(info: dict | None) -> str:
    if not info or "pid" not in info:
        return "another process (it has not recorded its PID yet)"
    pid, host = info.get("pid"), info.get("host", "?")
    text = f"PID {pid} on host {host}"
    if info.get("started"):
        text += f", started {info['started']}"
    if host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
        text += (
            f"; PID {pid} is no longer running, so the lock is held by a process it started "
            "(e.g. a data-loader worker): stop that process"
        )
    return text


class OutputDir:
    """The output directory of a run, locked for the run's duration (a context manager).

    On entry (``is_primary=True``, i.e. ``jax.process_index() == 0``):

    1. creates ``path`` (and its parents) and checks that it is writable;
    2. takes an exclusive ``fcntl.flock`` on ``<path>/.lock``, without waiting: if another live
       run holds it, raises :class:`OutputDirLocked` naming the directory and the holder's
       PID / host. The kernel drops a lock when its holder dies, so the lock file left by a
       crashed (even ``SIGKILL``-ed) run does not block;
    3. only then checks the contents (the lock file and :data:`ERROR_LOG` aside, so that a
       run that failed before writing anything does not block the next): a non-empty
       directory needs ``overwrite`` (clears every entry but the lock, ``run_state.json``
       first, so a half-cleared directory never looks complete) or ``resume`` (keeps
       everything), else :class:`OutputDirNotEmpty`. ``overwrite`` clears only a directory
       that looks like a run's (one of :data:`RUN_ENTRIES` in it), and never ``/``, the home
       directory or one that holds the working directory;
    4. checks that the subdirectories a resumed run writes into (:data:`WRITTEN_SUBDIRS`,
       e.g. ``checkpoints/``) are writable too.

    Other processes (``is_primary=False``) never lock nor clear: they wait (at most
    ``wait_timeout`` seconds) for the directory to exist and check that they can write it.
    With ``share_outcome`` (a multi-process run: :func:`train.core.mesh.share_outcome`) entering
    is a barrier: the primary publishes whether it took and cleared the directory (``None``, or
    its error message), every other process waits for that first, so none writes into the
    directory before the primary has cleared it, and each fails with the primary's reason when
    the primary was refused (instead of training on until a collective hangs).

    On exit the lock is released and its file removed (also when the block raises).

    Attributes:
        path: the directory.
        locked: whether this object holds the lock now.
        previous_holder: what the lock file said before this run took it (e.g. a crashed
            run's PID), or ``None``; informational only.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     with OutputDir(tmp) as out:
        ...         busy = out.locked
        ...         _ = write_text_atomic(out.path / "train_log.jsonl", "")
        ...     try:
        ...         OutputDir(tmp).__enter__()
        ...     except OutputDirNotEmpty as e:
        ...         print(str(e).split(";")[0].replace(tmp, "<tmp>"))
        ...     with OutputDir(tmp, overwrite=True) as out:
        ...         left = sorted(p.name for p in out.path.iterdir())
        ...     busy, left
        --output_dir <tmp> is not empty (1 entry: train_log.jsonl)
        (True, ['.lock'])
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        overwrite: bool = False,
        resume: bool = False,
        is_primary: bool = True,
        wait_timeout: float = 120.0,
        what: str = "--output_dir",
        share_outcome: Callable[[str | None], str | None] | None = None,
    ):
        if overwrite and resume:
            raise OutputDirError(
                "Pass either --overwrite_output_dir (start over) or --resume_from_checkpoint "
                "(continue), not both: overwriting would delete the checkpoints to resume from."
            )
        self.path = Path(path).expanduser()
        self.overwrite = overwrite
        self.resume = resume
        self.is_primary = is_primary
        self.wait_timeout = wait_timeout
        self.what = what
        self.share_outcome = share_outcome
        self.previous_holder: dict | None = None
        self._fd: int | None = None

    @property
    def locked(self) -> bool:
        return self._fd is not None

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_NAME

    def __repr__(self) -> str:
        return f"OutputDir({str(self.path)!r}, locked={self.locked})"

    # -- entry / exit

    def __enter__(self) -> OutputDir:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> OutputDir:
        """What entering the context does (see the class); returns ``self``."""
        if self.locked:
            return self
        if not self.is_primary:
            if self.share_outcome is not None:
                refused = self.share_outcome(None)  # waits for the primary's outcome
                if refused is not None:
                    raise OutputDirError(f"process 0 could not take {self.what}: {refused}")
            self._wait_for_dir()
            check_writable(self.path, what=self.what)  # every process writes checkpoint shards
            return self
        try:
            self._make_dir()
            check_writable(self.path, what=self.what)
            self._lock()
            try:
                self._check_contents()
                self._check_subdirs()
            except BaseException:
                self.release()
                raise
        except BaseException as e:
            if self.share_outcome is not None:
                self.share_outcome(str(e) or type(e).__name__)
            raise
        if self.share_outcome is not None:
            self.share_outcome(None)
        return self

    def release(self) -> None:
        """Removes the lock file and releases the lock (nothing if not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            # Unlink while still holding the lock: a process that opened the old file before
            # finds it replaced (see _lock) and does not lock a removed file.
            with contextlib.suppress(OSError):
                if os.path.samestat(os.fstat(fd), os.stat(self.lock_path)):
                    os.unlink(self.lock_path)
        finally:
            os.close(fd)  # releases the flock

    # -- steps

    def _make_dir(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise OutputDirError(f"{self.what} {self.path} exists and is not a directory.")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputDirNotWritable(
                f"{self.what} {self.path} cannot be created: {_oserror(e)}"
            ) from e

    def _wait_for_dir(self) -> None:
        deadline = time.monotonic() + self.wait_timeout
        while not self.path.is_dir():
            if time.monotonic() > deadline:
                raise OutputDirError(
                    f"{self.what} {self.path} was not created by the primary process (process "
                    f"0) within {self.wait_timeout:g} s; it must be on a filesystem that every "
                    "host sees, and process 0 must be running."
                )
            time.sleep(0.1)

    def _lock(self) -> None:
        for _ in range(100):
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as e:
                raise OutputDirNotWritable(
                    f"{self.what} {self.path}: cannot create the lock file {self.lock_path}: "
                    f"{_oserror(e)}"
                ) from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = self._read_info(fd)
                deadline = time.monotonic() + 1.0
                while (not info or "pid" not in info) and time.monotonic() < deadline:
                    time.sleep(0.02)  # the holder took the lock a moment ago: let it write
                    info = self._read_info(fd)
                os.close(fd)
                raise OutputDirLocked(
                    f"{self.what} {self.path} is in use by another run: {_describe_holder(info)} "
                    f"(lock file {self.lock_path}). Wait for that run to finish or stop it, or "
                    f"choose another {self.what}."
                ) from None
            except OSError as e:  # a filesystem without flock (some NFS / Lustre mounts)
                os.close(fd)
                warnings.warn(
                    f"{self.what} {self.path}: cannot lock {self.lock_path} ({_oserror(e)}); "
                    "continuing without a lock, so make sure no other run writes there.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.lock_path))
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed this file as we locked it: retry
                os.close(fd)
                continue
            self.previous_holder = self._read_info(fd)
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": _now(),
                "argv": list(sys.argv),
            }
            data = (json.dumps(info) + "\n").encode()
            with contextlib.suppress(OSError):  # informational: the flock is what counts
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
                os.fsync(fd)
            self._fd = fd
            return
        raise OutputDirLocked(f"{self.what} {self.path}: could not take {self.lock_path}.")

    @staticmethod
    def _read_info(fd: int) -> dict | None:
        try:
            info = json.loads(os.pread(fd, 65536, 0).decode() or "null")
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def _entries(self) -> list[Path]:
        return sorted(
            p
            for p in self.path.iterdir()
            if p.name != LOCK_NAME and not p.name.startswith(f".{_PROBE}.")
        )

    def _check_contents(self) -> None:
        entries = self._entries()
        if all(p.name == ERROR_LOG for p in entries) or self.resume:
            return
        names = [p.name + ("/" if p.is_dir() and not p.is_symlink() else "") for p in entries]
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        n = f"{len(names)} entr{'y' if len(names) == 1 else 'ies'}: {shown}"
        if not self.overwrite:
            state = read_run_state(self.path)
            if is_complete(self.path):
                held = "; it holds a complete run"
            elif state and state.get("status") == "running":
                held = f"; it holds an unfinished run (last marked at step {state.get('step')})"
            else:
                held = ""
            raise OutputDirNotEmpty(f"{self.what} {self.path} is not empty ({n}){held}; {_FIX}.")
        self._refuse_dangerous(n)
        self._clear(entries)

    def _check_subdirs(self) -> None:
        """A resumed run writes into its existing ``checkpoints/`` (and ``model/``): a
        read-only one fails here, at once, not after the model is loaded (orbax would wait
        minutes for a save that cannot happen)."""
        for name in WRITTEN_SUBDIRS:
            sub = self.path / name
            if sub.is_dir():  # a symlink to a directory elsewhere included
                check_writable(sub, what=f"{self.what}'s {name}/ directory")

    def _refuse_dangerous(self, n: str) -> None:
        real = self.path.resolve()
        cwd = Path.cwd().resolve()
        try:
            home = Path.home().resolve()
        except (KeyError, RuntimeError):  # no HOME and no passwd entry
            home = Path(real.anchor)
        why = None
        if real == Path(real.anchor) or real == home:
            why = "it is the filesystem root or the home directory"
        elif cwd == real or real in cwd.parents:
            why = "it holds the current working directory"
        elif not any((self.path / e).exists() for e in RUN_ENTRIES):
            known = ", ".join(RUN_ENTRIES)
            why = f"it does not look like a run's output directory (none of {known})"
        if why:
            raise OutputDirError(
                f"--overwrite_output_dir would delete everything in {self.what} {self.path} "
                f"({n}), and {why}: remove those files yourself or choose another {self.what}."
            )

    def _clear(self, entries: list[Path]) -> None:
        # The marker first: a run killed while this clears never looks complete.
        entries = sorted(entries, key=lambda p: p.name != RUN_STATE)
        for p in entries:
            try:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                raise OutputDirNotWritable(
                    f"--overwrite_output_dir: cannot remove {p} from {self.what} {self.path}: "
                    f"{_oserror(e)}"
                ) from e
