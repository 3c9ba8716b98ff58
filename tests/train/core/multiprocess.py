"""Issue 18's machinery for multi-process runs on this machine: two ``python -m train.glue`` /
``train.instruct`` processes (loopback coordinator on a free port, one CPU device each, gloo
collectives) launched under a deadline and killed in ``finally``, and the comparison of a
multi-process run with the single-process run of the same global batch and seed (every
step's loss, the final metrics, the SIFT delta with its indices exactly, the merged export,
each written once by process 0). The tests are ``test_multiprocess_glue.py`` and
``test_multiprocess_instruct.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import sift_jax
from train.core import cli
from train.core.checkpoint import CHECKSUMS
from train.core.outputs import is_complete, read_run_state

REPO = Path(__file__).resolve().parents[3]
FIX = REPO / "tests" / "fixtures"
TIMEOUT = 240  # seconds any launch (all its processes) may take
STEPS = 6
HOLD_AT = 3  # the killed runs stop (and are killed) right after this step's checkpoint
DISTRIBUTED_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def child_env(**extra: str) -> dict[str, str]:
    """A child's environment: CPU, exactly one device (the suite's conftest asks for 8 in
    this process), offline, no distributed settings inherited."""
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_VARS}
    env.pop(cli.DEBUG_ENV, None)
    env.update(
        PYTHONPATH=str(REPO),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The entry point of ``python -m <job>`` (its ``cli()``), with {patch} applied first.
WRAPPER = """
import sys
{patch}
from {job}.task import cli
sys.exit(cli())
"""

# Both processes stop right after the checkpoint of step $HOLD_AT is complete (saved,
# checksummed, past the barrier) and wait there to be killed.
HOLD_AFTER_CHECKPOINT = """
import os, time
from train.core import checkpoint as _ckpt
_save = _ckpt.Checkpointer.save
def _held(self, step, *a, **k):
    out = _save(self, step, *a, **k)
    if step == int(os.environ["HOLD_AT"]):
        print("HELD", flush=True)
        while True:
            time.sleep(1)
    return out
_ckpt.Checkpointer.save = _held
"""


def _cmd(job: str, argv: list[str], patch: str | None) -> list[str]:
    if patch is None:
        return [sys.executable, "-m", job, *argv]
    return [sys.executable, "-c", WRAPPER.format(patch=patch, job=job), *argv]


class Launch:
    """Processes of one run, their output in files; all killed when the block ends."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def start(self, job, argv, env, *, patch=None, name="p") -> None:
        """``python -m job argv`` (or its ``cli()`` after ``patch``)."""
        self.start_cmd(_cmd(job, argv, patch), env, name=name)

    def start_cmd(self, cmd: list[str], env: dict, *, name="p") -> None:
        log = self.logs / f"{name}{len(self.procs)}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.procs.append((proc, log))

    def text(self, i: int) -> str:
        return self.procs[i][1].read_text()

    def report(self) -> str:
        return "\n".join(
            f"--- process {i} (exit {p.poll()}):\n{log.read_text()[-4000:]}"
            for i, (p, log) in enumerate(self.procs)
        )

    def wait(self, deadline: float) -> None:
        """Until every process ended; each must exit 0 (the first that does not fails the
        launch at once: the others would only wait for it)."""
        while True:
            codes = [p.poll() for p, _ in self.procs]
            if any(c not in (None, 0) for c in codes):
                raise AssertionError(f"a process failed\n{self.report()}")
            if all(c == 0 for c in codes):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"a process ran past the deadline\n{self.report()}")
            time.sleep(0.1)

    def wait_for(self, marker: str, deadline: float) -> None:
        """Until every process printed ``marker`` (none may exit first)."""
        while not all(marker in self.text(i) for i in range(len(self.procs))):
            if any(p.poll() is not None for p, _ in self.procs):
                raise AssertionError(f"a process ended before {marker!r}\n{self.report()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {marker!r} before the deadline\n{self.report()}")
            time.sleep(0.1)

    def kill(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc, _ in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)


@contextlib.contextmanager
def launched(logs: Path):
    launch = Launch(logs)
    try:
        yield launch
    finally:
        launch.kill()


def run_single(job: str, argv: list[str], logs: Path) -> None:
    """One process, one device: the reference."""
    with launched(logs) as launch:
        launch.start(job, argv, child_env(), name="single")
        launch.wait(time.monotonic() + TIMEOUT)


def run_two(job, argv, logs, *, via="env", hold=False) -> Launch:
    """Two processes of one run on a loopback coordinator, identified by the ``JAX_*``
    variables (``via="env"``) or by the flags (``via="flags"``). With ``hold``, both run
    under :data:`HOLD_AFTER_CHECKPOINT`: waits until both held after step ``HOLD_AT``'s
    checkpoint, then SIGKILLs both."""
    patch = HOLD_AFTER_CHECKPOINT if hold else None
    addr = f"127.0.0.1:{free_port()}"
    deadline = time.monotonic() + TIMEOUT
    with launched(logs) as launch:
        for i in range(2):
            if via == "env":
                env = child_env(
                    JAX_COORDINATOR_ADDRESS=addr, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)
                )
                flags = []
            else:
                env = child_env()
                flags = ["--coordinator_address", addr, "--num_processes", "2"]
                flags += ["--process_id", str(i)]
            if hold:
                env["HOLD_AT"] = str(HOLD_AT)
            launch.start(job, [*argv, *flags], env, patch=patch, name=logs.name + "-")
        if hold:
            launch.wait_for("HELD", deadline)
            launch.kill()
        else:
            launch.wait(deadline)
    return launch


def kill_after_checkpoint(job, argv, logs) -> None:
    """Both processes of a run killed right after step ``HOLD_AT``'s checkpoint."""
    logs.mkdir()
    run_two(job, argv, logs, hold=True)


def resume_latest(job, argv, logs, **kw) -> Launch:
    """The killed run of :func:`kill_after_checkpoint` resumed from its latest checkpoint
    (logs in ``logs/resume``), asserting that it resumed at ``HOLD_AT``."""
    (logs / "resume").mkdir()
    launch = run_two(job, [*argv, "--resume_from_checkpoint", "latest"], logs / "resume", **kw)
    assert f"Resumed from checkpoint step {HOLD_AT}" in launch.text(0)
    return launch


# ------------------------------------------------------------------------------------------
# comparisons


def train_log(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "train_log.jsonl").read_text().splitlines()]


def tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def is_timing(key: str) -> bool:
    return any(t in key for t in ("seconds", "per_second", "runtime", "wall_time"))


def assert_close(a, b, what: str) -> None:
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=what)


def assert_same_as(run_dir: Path, reference: Path, metrics: tuple[str, ...]) -> None:
    """``run_dir`` (a multi-process run) finished and equals the single-process ``reference``
    within float tolerance: every log line, the final metrics, the delta (indices exactly)
    and the merged model; every file written once (by process 0)."""
    state = read_run_state(run_dir)
    assert state["status"] == "complete" and is_complete(run_dir), state
    assert {"sift_delta.safetensors", "model", "all_results.json"} <= set(state["outputs"])
    got, want = (json.loads((d / "all_results.json").read_text()) for d in (run_dir, reference))
    for key in (*metrics, "train_loss", "epoch"):
        assert_close(got[key], want[key], key)
    for key in ("train_steps", "trainable_params", "all_params"):
        assert got[key] == want[key], key
    evals = [json.loads((d / "eval_results.json").read_text()) for d in (run_dir, reference)]
    assert evals[0].keys() == evals[1].keys()
    for key in evals[1]:
        assert_close(evals[0][key], evals[1][key], f"eval_results.json: {key}")
    # The log: one line per step and evaluation (written by process 0 only), equal numbers.
    lines, ref_lines = train_log(run_dir), train_log(reference)
    assert [sorted(r) for r in lines] == [sorted(r) for r in ref_lines]
    for r, s in zip(lines, ref_lines, strict=True):
        for key in (k for k in r if not is_timing(k)):
            assert_close(r[key], s[key], f"train_log.jsonl step {s['step']}: {key}")
    for rel in ("sift_delta.safetensors", "model/model.safetensors"):
        a, b = tensors(run_dir / rel), tensors(reference / rel)
        assert sorted(a) == sorted(b), rel
        for k in a:
            if np.issubdtype(b[k].dtype, np.integer):  # SIFT's indices: the same selection
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{rel}: {k}")
            else:
                assert_close(a[k], b[k], f"{rel}: {k}")
    sift_jax.load_delta(run_dir / "sift_delta.safetensors")  # its checksums verify
    ckpts = run_dir / "checkpoints"
    assert (ckpts / str(STEPS) / CHECKSUMS).is_file()
    assert not [p.name for p in ckpts.iterdir() if "tmp" in p.name]


def assert_primary_only_wrote(launch: Launch) -> None:
    """Process 0 logs the run and its outputs; process 1 says nothing of them."""
    first, second = launch.text(0), launch.text(1)
    assert "Saved" in first and "Fine-tuning" in first, first
    assert "Saved" not in second and "Fine-tuning" not in second, second
