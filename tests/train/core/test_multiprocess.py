"""Issue 18: multi-process runs for real, two ``python -m train.glue`` / ``train.instruct``
processes on this machine (loopback coordinator on a free port, one CPU device each, gloo
collectives), against a single-process run with the same global batch and seed.

Each multi-process run must equal the single-process one within float tolerance (the data
parallel gradient is reduced in another order): every step's loss, the final metrics, the
SIFT delta (indices exactly) and the merged export, each written once by process 0; and a run
whose two processes are both SIGKILLed after a checkpoint resumes (both processes,
``--resume_from_checkpoint latest``) to the same result. Every process is bounded by a
deadline and killed in ``finally``.
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
import pytest
from flax import nnx

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


def _env(**extra: str) -> dict[str, str]:
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


def _free_port() -> int:
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
        launch.start(job, argv, _env(), name="single")
        launch.wait(time.monotonic() + TIMEOUT)


def run_two(job, argv, logs, *, via="env", hold=False) -> Launch:
    """Two processes of one run on a loopback coordinator, identified by the ``JAX_*``
    variables (``via="env"``) or by the flags (``via="flags"``). With ``hold``, both run
    under :data:`HOLD_AFTER_CHECKPOINT`: waits until both held after step ``HOLD_AT``'s
    checkpoint, then SIGKILLs both."""
    patch = HOLD_AFTER_CHECKPOINT if hold else None
    addr = f"127.0.0.1:{_free_port()}"
    deadline = time.monotonic() + TIMEOUT
    with launched(logs) as launch:
        for i in range(2):
            if via == "env":
                env = _env(
                    JAX_COORDINATOR_ADDRESS=addr, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)
                )
                flags = []
            else:
                env = _env()
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


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "train_log.jsonl").read_text().splitlines()]


def _tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def _timing(key: str) -> bool:
    return any(t in key for t in ("seconds", "per_second", "runtime", "wall_time"))


def _close(a, b, what: str) -> None:
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
        _close(got[key], want[key], key)
    for key in ("train_steps", "trainable_params", "all_params"):
        assert got[key] == want[key], key
    evals = [json.loads((d / "eval_results.json").read_text()) for d in (run_dir, reference)]
    assert evals[0].keys() == evals[1].keys()
    for key in evals[1]:
        _close(evals[0][key], evals[1][key], f"eval_results.json: {key}")
    # The log: one line per step and evaluation (written by process 0 only), equal numbers.
    lines, ref_lines = _log(run_dir), _log(reference)
    assert [sorted(r) for r in lines] == [sorted(r) for r in ref_lines]
    for r, s in zip(lines, ref_lines, strict=True):
        for key in (k for k in r if not _timing(k)):
            _close(r[key], s[key], f"train_log.jsonl step {s['step']}: {key}")
    for rel in ("sift_delta.safetensors", "model/model.safetensors"):
        a, b = _tensors(run_dir / rel), _tensors(reference / rel)
        assert sorted(a) == sorted(b), rel
        for k in a:
            if np.issubdtype(b[k].dtype, np.integer):  # SIFT's indices: the same selection
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{rel}: {k}")
            else:
                _close(a[k], b[k], f"{rel}: {k}")
    sift_jax.load_delta(run_dir / "sift_delta.safetensors")  # its checksums verify
    ckpts = run_dir / "checkpoints"
    assert (ckpts / str(STEPS) / CHECKSUMS).is_file()
    assert not [p.name for p in ckpts.iterdir() if "tmp" in p.name]


def assert_primary_only_wrote(launch: Launch) -> None:
    """Process 0 logs the run and its outputs; process 1 says nothing of them."""
    first, second = launch.text(0), launch.text(1)
    assert "Saved" in first and "Fine-tuning" in first, first
    assert "Saved" not in second and "Fine-tuning" not in second, second


# ------------------------------------------------------------------------------------------
# train.glue: a tiny random BERT, an STS-B-style regression set written here (pearson and
# spearman see every gathered prediction in its place; 21 validation rows pad the last batch)


@pytest.fixture(scope="module")
def glue_setup(tmp_path_factory):
    """``(tiny BERT regression HF dir, {"train", "dev"} JSONL paths, root directory)``."""
    from train.data import assets
    from train.models.encoder import EncoderConfig, EncoderForSequenceClassification
    from train.models.pretrained import export_model
    from train.models.weights import load_tokenizer

    root = tmp_path_factory.mktemp("glue_mp")
    tok = load_tokenizer(assets.minilm_dir())
    # (a wide init: predictions that vary across examples, so pearson is well conditioned)
    cfg = EncoderConfig.tiny(
        vocab_size=tok.vocab_size, max_position_embeddings=64, num_labels=1, initializer_range=0.2
    )
    model = EncoderForSequenceClassification(cfg, rngs=nnx.Rngs(0))
    bert = str(export_model(model, root / "tiny_bert", tok))
    texts = _sentences()
    rng = np.random.default_rng(0)

    def write(name, n):
        rows = []
        for i in range(n):
            a, b = texts[i % len(texts)], texts[(3 * i + 1) % len(texts)]
            rows.append({"sentence1": a, "sentence2": b, "label": float(rng.uniform(0, 5))})
        path = root / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    data = {"train": write("train.jsonl", 64), "dev": write("dev.jsonl", 21)}
    return bert, data, root


def _sentences() -> list[str]:
    import csv

    with open(FIX / "e2e" / "sst2_train.csv") as f:
        return [row["sentence"] for row in csv.DictReader(f)]


def glue_argv(setup, out: Path, per_device: int, mesh: str, *extra: str) -> list[str]:
    bert, data, _ = setup
    return [
        "--model_name_or_path", bert,
        "--task_name", "stsb",
        "--train_file", data["train"],
        "--validation_file", data["dev"],
        "--output_dir", str(out),
        "--per_device_train_batch_size", str(per_device),
        "--per_device_eval_batch_size", str(2 * per_device),
        "--max_seq_length", "32",
        "--max_steps", str(STEPS),
        "--eval_strategy", "steps",
        "--eval_steps", "3",
        "--learning_rate", "1e-2",
        "--sparse_rate", "0.05",
        # not the key biases: their gradient is 0 in exact arithmetic (softmax ignores a
        # constant per query), so their top-k is float noise, ordered differently by another
        # reduction order
        "--sparse_module", "attention/(query|value|output)/", "attention/key/kernel",
        "--logging_steps", "1",
        "--disable_tqdm",
        "--mesh", mesh,
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def glue_reference(glue_setup):
    """The single-process run: global batch 8 on one device."""
    out = glue_setup[2] / "single"
    run_single("train.glue", glue_argv(glue_setup, out, 8, "data=1"), glue_setup[2])
    return out


GLUE_METRICS = ("eval_pearson", "eval_spearmanr")


@pytest.mark.slow
def test_glue_two_processes_equal_one(glue_setup, glue_reference):
    out = glue_setup[2] / "two"
    # an older run's outputs there: process 0 clears them before any process writes
    (out / "checkpoints" / "99").mkdir(parents=True)
    (out / "checkpoints" / "99" / "stale").write_text("old")
    (out / "train_log.jsonl").write_text('{"step": 99, "loss": 1.0}\n')
    (out.parent / "two-logs").mkdir()
    argv = glue_argv(glue_setup, out, 4, "data=2", "--overwrite_output_dir")
    launch = run_two("train.glue", argv, out.parent / "two-logs")
    assert_same_as(out, glue_reference, GLUE_METRICS)
    assert not (out / "checkpoints" / "99").exists()
    assert_primary_only_wrote(launch)


@pytest.mark.slow
def test_glue_two_processes_killed_after_a_checkpoint_resume_to_the_same_result(
    glue_setup, glue_reference
):
    out = glue_setup[2] / "killed"
    # fsdp across the processes: each writes its shards of every checkpoint (orbax's
    # multi-process save) and restores them
    argv = glue_argv(glue_setup, out, 4, "fsdp=2", "--save_steps", "1")
    logs = out.parent / "killed-logs"
    kill_after_checkpoint("train.glue", argv, logs)
    assert read_run_state(out)["status"] == "running"
    held = out / "checkpoints" / str(HOLD_AT)
    assert (held / CHECKSUMS).is_file()
    assert sorted(p.name for p in (held / "state").glob("ocdbt.process_*")) == [
        "ocdbt.process_0",
        "ocdbt.process_1",
    ]
    resume_latest("train.glue", argv, logs, via="flags")
    assert_same_as(out, glue_reference, GLUE_METRICS)


# ------------------------------------------------------------------------------------------
# the output-dir barrier, in-process (the two-process runs above exercise the real one)


def test_a_refused_primary_tells_the_other_processes_why(tmp_path):
    from train.core.outputs import OutputDir, OutputDirError, OutputDirNotEmpty

    (tmp_path / "train_log.jsonl").write_text("")
    told = []
    with pytest.raises(OutputDirNotEmpty):
        OutputDir(tmp_path, share_outcome=lambda e: told.append(e) or e).acquire()
    assert len(told) == 1 and "is not empty" in told[0]
    # another process waits for that outcome before it looks at the directory at all
    with pytest.raises(OutputDirError, match="process 0 could not take --output_dir: .*not empty"):
        OutputDir(tmp_path / "never", is_primary=False, share_outcome=lambda e: told[0]).acquire()
    told.clear()
    with OutputDir(tmp_path, overwrite=True, share_outcome=lambda e: told.append(e)) as out:
        assert told == [None] and out.locked  # published only once it had cleared the dir
        assert [p.name for p in tmp_path.iterdir()] == [".lock"]
    with OutputDir(tmp_path, is_primary=False, share_outcome=lambda e: None) as other:
        assert not other.locked


# ------------------------------------------------------------------------------------------
# train.instruct: the tiny random LLaMA with the fixture tokenizer, an Alpaca JSONL written here


@pytest.fixture(scope="module")
def instruct_setup(tmp_path_factory):
    """``(tiny LLaMA HF dir, Alpaca JSONL path, root directory)``."""
    from transformers import AutoTokenizer

    from train.models.decoder import LlamaConfig, LlamaForCausalLM
    from train.models.pretrained import export_model

    root = tmp_path_factory.mktemp("instruct_mp")
    tok = AutoTokenizer.from_pretrained(FIX / "instruct" / "tokenizer")
    cfg = LlamaConfig.tiny(vocab_size=512, max_position_embeddings=256, initializer_range=0.2)
    llama = str(export_model(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)), root / "tiny_llama", tok))
    rng = np.random.default_rng(0)
    words = ["good", "bad", "fine", "dull", "great", "awful", "movie", "film"]
    rows = []
    for i in range(48):
        w = [str(x) for x in rng.choice(words, 3)]
        rows.append({"instruction": "Repeat the words.", "input": " ".join(w), "output": w[i % 3]})
    data = root / "alpaca.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return llama, str(data), root


def instruct_argv(setup, out: Path, per_device: int, mesh: str, *extra: str) -> list[str]:
    llama, data, _ = setup
    return [
        "--model_name_or_path", llama,
        "--data_path", data,
        "--val_set_size", "16",
        "--model_max_length", "48",
        "--output_dir", str(out),
        "--per_device_train_batch_size", str(per_device),
        "--per_device_eval_batch_size", str(per_device),
        "--max_steps", str(STEPS),
        "--eval_strategy", "steps",
        "--eval_steps", "3",
        "--learning_rate", "1e-2",
        "--warmup_ratio", "0",
        "--sparse_rate", "0.05",
        "--logging_steps", "1",
        "--disable_tqdm",
        "--mesh", mesh,
        # MMLU before and after tuning (the job's own evaluation of the gathered weights)
        "--mmlu_dir", str(FIX / "mmlu"),
        "--mmlu_max_questions_per_subject", "4",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def instruct_reference(instruct_setup):
    """The single-process run: global batch 8 on one device (32 training rows: 4 steps an
    epoch, so the 6 steps cross an epoch)."""
    out = instruct_setup[2] / "single"
    run_single("train.instruct", instruct_argv(instruct_setup, out, 8, "data=1"), out.parent)
    return out


INSTRUCT_METRICS = ("eval_loss", "eval_perplexity")


def assert_same_instruct_results(run_dir: Path, reference: Path) -> None:
    got, want = (
        json.loads((d / "instruct_results.json").read_text()) for d in (run_dir, reference)
    )
    assert got["before"].keys() == want["before"].keys() and "mmlu_average" in want["before"]
    assert got["after"].keys() == want["after"].keys()
    for when in ("before", "after"):
        for key, value in want[when].items():
            if isinstance(value, float) and not _timing(key):
                _close(got[when][key], value, f"instruct_results.json {when}: {key}")
    assert got["delta"] == str(run_dir / "sift_delta.safetensors")


@pytest.mark.slow
def test_instruct_two_processes_equal_one(instruct_setup, instruct_reference):
    out = instruct_setup[2] / "two"
    logs = out.parent / "two-logs"
    logs.mkdir()
    # fsdp across the processes: weights and optimizer state sharded over both, gathered for
    # the delta, the export and MMLU
    argv = instruct_argv(instruct_setup, out, 4, "fsdp=2")
    launch = run_two("train.instruct", argv, logs, via="flags")
    assert_same_as(out, instruct_reference, INSTRUCT_METRICS)
    assert_same_instruct_results(out, instruct_reference)
    assert_primary_only_wrote(launch)


@pytest.mark.slow
def test_instruct_two_processes_killed_after_a_checkpoint_resume_to_the_same_result(
    instruct_setup, instruct_reference
):
    out = instruct_setup[2] / "killed"
    argv = instruct_argv(instruct_setup, out, 4, "data=2", "--save_steps", "1")
    logs = out.parent / "killed-logs"
    kill_after_checkpoint("train.instruct", argv, logs)
    assert (out / "checkpoints" / str(HOLD_AT) / CHECKSUMS).is_file()
    assert not is_complete(out)
    resume_latest("train.instruct", argv, logs)
    assert_same_as(out, instruct_reference, INSTRUCT_METRICS)
    assert_same_instruct_results(out, instruct_reference)


# ------------------------------------------------------------------------------------------
# placement and gathering on two processes of two devices each, for every kind of mesh


PLACEMENT = """
import sys
import numpy as np
from train.core import mesh as mesh_lib

if len(sys.argv) > 1:  # by flags
    assert mesh_lib.initialize(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
else:  # by the JAX_* variables
    assert mesh_lib.initialize()
import jax
from jax.experimental import multihost_utils

assert jax.process_count() == 2 and jax.local_device_count() == 2 and jax.device_count() == 4
me = jax.process_index()
batch = {"x": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "y": np.arange(8)}
try:  # a mesh that leaves a process without devices is refused
    mesh_lib.parse_mesh("fsdp=2")
    raise AssertionError("fsdp=2 of 4 devices accepted")
except ValueError as e:
    assert "all 4 devices" in str(e), e
for spec in ("data=4", "fsdp=4", "data=2,fsdp=2", "data=2,tensor=2", "tensor=4", "fsdp=-1"):
    mesh = mesh_lib.parse_mesh(spec)
    dev = mesh_lib.put_batch(batch, mesh)
    host = mesh_lib.to_host(dev)
    for k in batch:
        assert host[k].shape == batch[k].shape and np.array_equal(host[k], batch[k]), (spec, k)
    # what this process fed is what its devices hold
    rows = mesh_lib.process_rows(mesh, 8)
    for shard in dev["y"].addressable_shards:
        assert set(np.asarray(shard.data).tolist()) <= set(rows.tolist()), spec
    everyone = multihost_utils.process_allgather(np.isin(np.arange(8), rows))
    assert everyone.any(0).all(), spec  # the processes' rows cover the batch
    # a computation on it, gathered as evaluate does
    out = jax.jit(lambda b: b["x"].sum(-1) + b["y"])(dev)
    got = np.asarray(multihost_utils.process_allgather(out, tiled=True))
    assert np.array_equal(got, batch["x"].sum(-1) + batch["y"]), spec
    # accumulation shapes: [accum, per_step, ...] split on dim 1
    acc = {"x": batch["x"].reshape(2, 4, 3)}
    assert np.array_equal(mesh_lib.to_host(mesh_lib.put_batch(acc, mesh, leading=1))["x"], acc["x"])
    # replicas built process by process; a one-device array moved onto the mesh
    r = mesh_lib.replicate({"k": np.full(3, 7.0)}, mesh)["k"]
    assert r.sharding.is_fully_replicated and not r.is_fully_addressable
    key = mesh_lib.onto_mesh(jax.random.key(3), mesh)
    assert len(key.sharding.device_set) == 4
    want = np.asarray(jax.random.key_data(jax.random.key(3)))
    assert np.array_equal(mesh_lib.to_host(jax.random.key_data(key)), want)
# the outcome of process 0, told to the other
told = mesh_lib.share_outcome(None if me else "nope")
assert told == "nope", told
assert mesh_lib.share_outcome(None) is None
print("PLACEMENT OK", me, flush=True)
"""


@pytest.mark.slow
def test_two_processes_feed_exactly_the_global_batch_on_every_mesh(tmp_path):
    addr = f"127.0.0.1:{_free_port()}"
    two_devices = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    with launched(tmp_path) as launch:
        for i in range(2):
            args = [addr, "2", str(i)] if i else []  # process 1 by flags, process 0 by env
            env = _env(**two_devices)
            if not i:
                env.update(JAX_COORDINATOR_ADDRESS=addr, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="0")
            launch.start_cmd([sys.executable, "-c", PLACEMENT, *args], env)
        launch.wait(time.monotonic() + 120)
    assert all(f"PLACEMENT OK {i}" in launch.text(i) for i in range(2)), launch.report()


@pytest.mark.slow
def test_a_refused_output_dir_stops_both_processes_with_its_reason(glue_setup, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "train_log.jsonl").write_text("")  # another run's: not empty, no --overwrite
    addr = f"127.0.0.1:{_free_port()}"
    t = time.monotonic()
    with launched(tmp_path) as launch:
        for i in range(2):
            env = _env(JAX_COORDINATOR_ADDRESS=addr, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
            launch.start("train.glue", glue_argv(glue_setup, out, 4, "data=2"), env)
        for proc, _ in launch.procs:
            proc.wait(timeout=TIMEOUT)
    assert [p.returncode for p, _ in launch.procs] == [2, 2], launch.report()
    assert "is not empty" in launch.text(0)
    assert "process 0 could not take --output_dir" in launch.text(1), launch.report()
    assert "is not empty" in launch.text(1)
    assert time.monotonic() - t < 60  # neither waited for a timeout
    assert sorted(p.name for p in out.iterdir()) == ["train_log.jsonl"]
