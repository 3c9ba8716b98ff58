"""train.core.outputs: the output-directory lock (with real processes), atomic files, the
completion marker and the writability check."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from train.core import outputs
from train.core.outputs import (
    LOCK_NAME,
    RUN_STATE,
    IncompleteRunError,
    OutputDir,
    OutputDirError,
    OutputDirLocked,
    OutputDirNotEmpty,
    OutputDirNotWritable,
    atomic_path,
    check_writable,
    is_complete,
    mark_complete,
    mark_running,
    missing_outputs,
    read_run_state,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)

REPO = Path(__file__).resolve().parents[3]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

# Takes the lock on argv[1] once argv[2] exists (so that several start together), writes a
# file, prints LOCKED <pid> and holds the lock until argv[3] exists. Prints ERROR <type> <msg>
# and exits 3 if the directory is refused. argv[4:] may hold "overwrite" / "resume" / "fork".
HOLDER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from train.core.outputs import OutputDir, OutputDirError

    d, go, release = map(Path, sys.argv[1:4])
    flags = sys.argv[4:]
    deadline = time.time() + 30
    while not go.exists() and time.time() < deadline:
        time.sleep(0.002)
    try:
        out = OutputDir(d, overwrite="overwrite" in flags, resume="resume" in flags).acquire()
    except OutputDirError as e:
        print("ERROR", type(e).__name__, str(e).replace("\\n", " "), flush=True)
        sys.exit(3)
    if "fork" in flags:  # a worker that inherits the lock, then the parent dies
        child = os.fork()
        if child == 0:
            time.sleep(60)
            os._exit(0)
        print("FORKED", os.getpid(), child, flush=True)
        os._exit(0)
    (d / f"written_by_{os.getpid()}.txt").write_text("mine")
    print("LOCKED", os.getpid(), flush=True)
    while not release.exists() and time.time() < deadline + 30:
        time.sleep(0.01)
    out.release()
    print("RELEASED", flush=True)
    """
)


def _start(d: Path, go: Path, release: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(d), str(go), str(release), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=REPO,
    )


def _readline(proc: subprocess.Popen, timeout: float = 30.0) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        proc.kill()
        raise AssertionError(f"no output within {timeout} s; stderr: {proc.stderr.read()}")
    line = proc.stdout.readline().strip()
    if not line:
        proc.wait(10)
        raise AssertionError(f"process ended without output; stderr: {proc.stderr.read()}")
    return line


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=30)
    return proc.returncode, out, err


@pytest.fixture
def run_dir(tmp_path):
    """(output dir, go file, release file); the release file is created at teardown so that
    no holder outlives the test."""
    d, go, release = tmp_path / "out", tmp_path / "go", tmp_path / "release"
    yield d, go, release
    release.touch()


def _tree(d: Path) -> dict[str, str]:
    return {
        p.relative_to(d).as_posix(): (p.read_text() if p.is_file() else "/")
        for p in sorted(d.rglob("*"))
    }


# ------------------------------------------------------------------------------------------
# The lock, with real processes


def test_two_runs_started_together_one_wins_and_the_other_is_told_why(run_dir):
    d, go, release = run_dir
    procs = [_start(d, go, release) for _ in range(3)]
    time.sleep(0.3)  # every process waits on the go file
    go.touch()
    lines = {p.pid: _readline(p) for p in procs}
    winners = [pid for pid, ln in lines.items() if ln.startswith("LOCKED")]
    assert len(winners) == 1, lines
    (winner,) = winners
    host = json.loads((d / LOCK_NAME).read_text())["host"]
    for p in procs:
        if p.pid == winner:
            continue
        code, _, err = _finish(p)
        line = lines[p.pid]
        assert code == 3, err
        assert line.startswith("ERROR OutputDirLocked"), line
        assert str(d) in line and f"PID {winner} on host {host}" in line, line
        assert "Wait for that run to finish or stop it, or choose another --output_dir" in line
    assert _tree(d) == {LOCK_NAME: (d / LOCK_NAME).read_text(), f"written_by_{winner}.txt": "mine"}
    release.touch()
    (w,) = [p for p in procs if p.pid == winner]
    code, out, err = _finish(w)
    assert code == 0 and "RELEASED" in out, err
    assert _tree(d) == {f"written_by_{winner}.txt": "mine"}  # its files survive; lock removed


def test_overwrite_is_refused_while_a_run_holds_the_dir_then_clears_a_stale_run(run_dir):
    d, go, release = run_dir
    go.touch()
    holder = _start(d, go, release)
    assert _readline(holder).startswith("LOCKED")
    (d / "model").mkdir()
    (d / "model" / "model.safetensors").write_text("weights")
    (d / "checkpoints" / "100").mkdir(parents=True)
    (d / "checkpoints" / "100" / "state").write_text("ckpt")
    (d / "all_results.json").write_text("{}")
    before = _tree(d)

    second = _start(d, go, release, "overwrite")
    line = _readline(second)
    assert _finish(second)[0] == 3
    assert line.startswith("ERROR OutputDirLocked") and f"PID {holder.pid}" in line, line
    assert _tree(d) == before  # nothing wiped

    release.touch()
    assert _finish(holder)[0] == 0
    release.unlink()
    third = _start(d, go, release, "overwrite")
    line = _readline(third)
    assert line.startswith("LOCKED"), line
    assert sorted(_tree(d)) == [LOCK_NAME, f"written_by_{third.pid}.txt"]  # model/, ... gone
    release.touch()
    assert _finish(third)[0] == 0
    assert sorted(_tree(d)) == [f"written_by_{third.pid}.txt"]


def test_a_lock_left_by_a_killed_run_does_not_block(run_dir, recwarn, capfd):
    d, go, release = run_dir
    go.touch()
    holder = _start(d, go, release)
    assert _readline(holder).startswith("LOCKED")
    (d / f"written_by_{holder.pid}.txt").unlink()  # the killed run left only its lock file
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    assert json.loads((d / LOCK_NAME).read_text())["pid"] == holder.pid  # stale file is there

    with OutputDir(d) as out:  # proceeds: the kernel dropped the dead run's flock
        assert out.locked
        assert out.previous_holder["pid"] == holder.pid
        assert json.loads((d / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (d / LOCK_NAME).exists()
    assert len(recwarn) == 0
    assert capfd.readouterr() == ("", "")  # reports nothing wrong


def test_a_killed_runs_outputs_still_need_resume_or_overwrite(run_dir):
    d, go, release = run_dir
    go.touch()
    holder = _start(d, go, release)
    assert _readline(holder).startswith("LOCKED")
    mark_running(d, step=40)
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    with pytest.raises(OutputDirNotEmpty, match="unfinished run .*step 40"):
        OutputDir(d).acquire()
    with OutputDir(d, resume=True):
        assert (d / RUN_STATE).exists()


def test_a_forked_worker_that_outlives_its_parent_is_named(run_dir):
    d, go, release = run_dir
    go.touch()
    holder = _start(d, go, release, "fork")
    _, parent, child = _readline(holder).split()
    holder.wait(10)
    try:
        with pytest.raises(OutputDirLocked) as e:
            OutputDir(d).acquire()
        assert f"PID {parent} is no longer running" in str(e.value)
        assert "data-loader worker" in str(e.value)
    finally:
        os.kill(int(child), signal.SIGKILL)
    deadline = time.time() + 10
    while time.time() < deadline:  # the kernel drops the lock once the worker is gone
        try:
            with OutputDir(d):
                break
        except OutputDirLocked:
            time.sleep(0.05)
    else:
        raise AssertionError("the lock outlived the worker")


def test_taking_the_dir_is_fast_and_imports_nothing_heavy(tmp_path):
    script = textwrap.dedent(
        """
        import sys, time
        t = time.perf_counter()
        from train.core.outputs import OutputDir, mark_running
        with OutputDir(sys.argv[1]) as out:
            mark_running(out.path)
        print(time.perf_counter() - t)
        print(sorted(m for m in sys.modules if m.split(".")[0] in
                     ("jax", "numpy", "flax", "optax", "orbax", "train", "sift_jax")))
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=REPO,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    seconds, modules = r.stdout.splitlines()
    assert float(seconds) < 0.5
    loaded = eval(modules)
    assert not [m for m in loaded if not m.startswith("train")], loaded  # no jax, numpy, ...
    assert set(loaded) <= {"train", "train.core", "train.core.outputs"}, loaded


# ------------------------------------------------------------------------------------------
# The lock, in this process


def test_a_non_empty_dir_needs_overwrite_or_resume(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    (d / "train_config.json").write_text("{}")
    with pytest.raises(OutputDirNotEmpty) as e:
        OutputDir(d).acquire()
    msg = str(e.value)
    assert str(d) in msg and "train_config.json" in msg
    assert "pass --overwrite_output_dir" in msg and "--resume_from_checkpoint latest" in msg
    assert not (d / LOCK_NAME).exists()  # the refused run let go of the lock
    with OutputDir(d, resume=True):
        assert (d / "train_config.json").exists()
    with pytest.raises(OutputDirError, match="not both"):
        OutputDir(d, overwrite=True, resume=True)
    (d / "all_results.json").write_text("{}")
    mark_complete(d, ["all_results.json"])
    with pytest.raises(OutputDirNotEmpty, match="holds a complete run"):
        OutputDir(d).acquire()


def test_another_processs_write_probe_is_not_contents(tmp_path):
    """Processes starting together probe the dir (check_writable) while the primary checks
    that it is empty: a probe must neither make it look taken nor be cleared under them."""
    d = tmp_path / "out"
    d.mkdir()
    probe = d / "..write-test.0123abcd.tmp"
    probe.write_text("x")
    with OutputDir(d):
        pass
    (d / "model").mkdir()
    with OutputDir(d, overwrite=True):
        assert sorted(p.name for p in d.iterdir()) == sorted([LOCK_NAME, probe.name])


def test_a_dir_with_only_the_error_log_of_a_failed_start_counts_as_empty(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    (d / outputs.ERROR_LOG).write_text("Traceback ...: model not found\n")
    with OutputDir(d):  # the user fixed the typo and runs again: no --overwrite needed
        pass
    assert (d / outputs.ERROR_LOG).exists()  # kept (appended to)
    (d / "train_log.jsonl").write_text("")
    with OutputDir(d, overwrite=True):
        assert not (d / outputs.ERROR_LOG).exists()  # a real overwrite clears it too


def test_overwrite_clears_only_what_looks_like_a_run(tmp_path, monkeypatch):
    d = tmp_path / "notes"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputDirError, match="does not look like a run's output directory"):
        OutputDir(d, overwrite=True).acquire()
    assert (d / "thesis.tex").read_text() == "years of work"

    run = tmp_path / "run"
    (run / "sub").mkdir(parents=True)
    (run / "train_log.jsonl").write_text("")
    monkeypatch.chdir(run / "sub")
    with pytest.raises(OutputDirError, match="current working directory"):
        OutputDir(run, overwrite=True).acquire()
    assert (run / "train_log.jsonl").exists()


def test_overwrite_removes_the_marker_first(tmp_path, monkeypatch):
    d = tmp_path / "out"
    d.mkdir()
    for name in ("all_results.json", "eval_results.json", RUN_STATE):
        (d / name).write_text("{}")
    order = []
    real_unlink = Path.unlink
    monkeypatch.setattr(Path, "unlink", lambda p, *a, **k: (order.append(p.name), real_unlink(p)))
    with OutputDir(d, overwrite=True):
        pass
    assert order[0] == RUN_STATE


def test_the_lock_is_released_when_the_run_raises(tmp_path):
    d = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with OutputDir(d) as out:
            assert (d / LOCK_NAME).exists()
            raise RuntimeError("boom")
    assert not out.locked and not (d / LOCK_NAME).exists()
    with OutputDir(d):
        pass


def test_a_second_writer_in_the_same_process_is_refused(tmp_path):
    with OutputDir(tmp_path / "out"):
        with pytest.raises(OutputDirLocked, match=f"PID {os.getpid()}"):
            OutputDir(tmp_path / "out").acquire()


def test_other_processes_wait_for_the_dir_and_never_lock_or_clear(tmp_path):
    d = tmp_path / "out"
    t = time.monotonic()
    with pytest.raises(OutputDirError, match="not created by the primary process"):
        OutputDir(d, is_primary=False, wait_timeout=0.3).acquire()
    assert time.monotonic() - t < 5

    def primary():
        time.sleep(0.3)
        d.mkdir()
        (d / "model").mkdir()

    th = threading.Thread(target=primary)
    th.start()
    with OutputDir(d, is_primary=False, overwrite=True, wait_timeout=10) as out:
        assert not out.locked
    th.join()
    assert sorted(p.name for p in d.iterdir()) == ["model"]  # not locked, not cleared


def test_a_file_in_the_way_is_reported(tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(OutputDirError, match="exists and is not a directory"):
        OutputDir(tmp_path / "out").acquire()


# ------------------------------------------------------------------------------------------
# Completion marker


def test_mark_complete_refuses_a_missing_output(tmp_path):
    write_json_atomic(tmp_path / "all_results.json", {"eval_accuracy": 0.5})
    (tmp_path / "model").mkdir()  # an empty model/ is not an output
    mark_running(tmp_path, step=7)
    with pytest.raises(IncompleteRunError, match="missing sift_delta.safetensors, model"):
        mark_complete(tmp_path, ["all_results.json", "sift_delta.safetensors", "model"])
    assert read_run_state(tmp_path)["status"] == "running"  # marker left as it was
    assert not is_complete(tmp_path)
    with pytest.raises(ValueError, match="relative path"):
        mark_complete(tmp_path, ["../elsewhere.json"])


def test_is_complete_needs_the_marker_and_every_output(tmp_path):
    write_json_atomic(tmp_path / "all_results.json", {})
    assert not is_complete(tmp_path)  # results but no marker: not finished
    write_bytes_atomic(tmp_path / "sift_delta.safetensors", b"delta")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    mark_running(tmp_path, step=0, total_steps=10)
    outs = ["all_results.json", "sift_delta.safetensors", "model"]
    mark_complete(tmp_path, outs, step=10)
    state = read_run_state(tmp_path)
    assert state["status"] == "complete" and state["outputs"] == outs
    assert state["step"] == 10 and state["total_steps"] == 10 and "finished" in state
    assert is_complete(tmp_path)
    (tmp_path / "sift_delta.safetensors").unlink()
    assert not is_complete(tmp_path)  # a listed output went missing
    assert missing_outputs(tmp_path, outs) == ["sift_delta.safetensors"]
    (tmp_path / RUN_STATE).write_text("{not json")
    assert not is_complete(tmp_path) and read_run_state(tmp_path) is None
    mark_running(tmp_path, step=10)  # rewriting outputs of a finished run: not complete
    assert not is_complete(tmp_path)


# ------------------------------------------------------------------------------------------
# Atomic files


def _names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    p = write_text_atomic(tmp_path / "eval_results.json", "old")

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs.os, "fsync", fail)  # after the data is written, before replace
    with pytest.raises(OSError, match="No space"):
        write_text_atomic(p, "new " * 1000)
    monkeypatch.undo()
    assert p.read_text() == "old" and _names(tmp_path) == ["eval_results.json"]

    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json_atomic(p, {"x": object()})
    assert p.read_text() == "old" and _names(tmp_path) == ["eval_results.json"]

    for exc in (RuntimeError("writer died"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with atomic_path(tmp_path / "sift_delta.safetensors") as tmp:
                tmp.write_bytes(b"half")
                raise exc
        assert _names(tmp_path) == ["eval_results.json"]


def test_atomic_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        a = write_text_atomic(tmp_path / "a.txt", "a")
        b = write_json_atomic(tmp_path / "b.json", {"x": 1})
        with atomic_path(tmp_path / "c.safetensors") as tmp:
            tmp.write_bytes(b"c")
            os.chmod(tmp, 0o600)  # as safetensors' save_file does
        for p in (a, b, tmp_path / "c.safetensors"):
            assert p.stat().st_mode & 0o777 == 0o644, p
        os.umask(0o077)
        assert write_text_atomic(tmp_path / "d.txt", "d").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_json_of_numpy_values(tmp_path):
    np = pytest.importorskip("numpy")
    p = write_json_atomic(tmp_path / "r.json", {"acc": np.float32(0.5), "v": np.arange(2)})
    assert json.loads(p.read_text()) == {"acc": 0.5, "v": [0, 1]}


# ------------------------------------------------------------------------------------------
# Writability

CHECK = textwrap.dedent(
    """
    import os, sys, time
    from train.core.outputs import OutputDir, OutputDirNotWritable, check_writable
    if sys.argv[2] == "drop":
        os.setgid(65534)
        os.setuid(65534)  # nobody: root's permission bypass is gone
    t = time.perf_counter()
    for f in (lambda: check_writable(sys.argv[1]), lambda: OutputDir(sys.argv[1]).acquire()):
        try:
            f()
        except OutputDirNotWritable as e:
            print(f"{time.perf_counter() - t:.3f}", e, flush=True)
        else:
            print("WROTE")
    """
)


def _assert_refused(stdout: str, d: Path, reason: str) -> None:
    lines = stdout.splitlines()
    assert len(lines) == 2, stdout
    for line in lines:
        seconds, msg = line.split(" ", 1)
        assert float(seconds) < 1.0
        assert msg.startswith(f"--output_dir {d} is not writable: {reason}"), msg


def test_check_writable_on_a_read_only_dir_fails_at_once():
    with tempfile.TemporaryDirectory() as top:  # under /tmp: reachable by "nobody"
        os.chmod(top, 0o755)
        d = Path(top) / "ro"
        d.mkdir(mode=0o555)
        os.chmod(d, 0o555)
        try:
            if not os.access(d, os.W_OK):  # an ordinary user: test here
                t = time.perf_counter()
                with pytest.raises(OutputDirNotWritable, match="is not writable: Permission"):
                    check_writable(d)
                with pytest.raises(OutputDirNotWritable, match="is not writable"):
                    OutputDir(d).acquire()
                assert time.perf_counter() - t < 1.0
                return
            # root ignores permissions: check from a child that drops to "nobody"
            r = subprocess.run(
                [sys.executable, "-c", CHECK, str(d), "drop"],
                capture_output=True,
                text=True,
                env=ENV,
                cwd=REPO,
                timeout=60,
            )
            if r.returncode != 0 and "Operation not permitted" in r.stderr:
                pytest.skip("running as root without CAP_SETUID: cannot drop to an ordinary user")
            assert r.returncode == 0, r.stderr
            _assert_refused(r.stdout, d, "Permission denied")
        finally:
            os.chmod(d, 0o755)


def test_check_writable_on_a_read_only_filesystem_fails_at_once(tmp_path):
    """A read-only bind mount, in a private user + mount namespace (``unshare``)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1) to make a read-only bind mount")
    d = tmp_path / "ro"
    d.mkdir()
    probe = subprocess.run(
        [unshare, "--user", "--map-root-user", "--mount", "true"], capture_output=True
    )
    if probe.returncode != 0:
        pytest.skip(f"user namespaces unavailable: {probe.stderr.decode().strip()}")
    sh = (
        f'mount --bind "{d}" "{d}" && mount -o remount,bind,ro "{d}" && '
        f'exec "{sys.executable}" -c "$0" "{d}" keep'
    )
    r = subprocess.run(
        [unshare, "--user", "--map-root-user", "--mount", "sh", "-c", sh, CHECK],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=REPO,
        timeout=60,
    )
    if r.returncode != 0 and "mount" in r.stderr:
        pytest.skip(f"cannot make a read-only bind mount: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    _assert_refused(r.stdout, d, "Read-only file system")
    assert _names(d) == []


def test_check_writable_names_the_directory(tmp_path):
    assert check_writable(tmp_path) == tmp_path
    assert _names(tmp_path) == []  # the probe file is gone
    with pytest.raises(OutputDirNotWritable, match="checkpoints .* does not exist"):
        check_writable(tmp_path / "nope", what="checkpoints")
