"""Issue 18: ``train.instruct`` as two real processes, SIGKILLed past a checkpoint and resumed,
equals one process (the tiny random LLaMA, with MMLU before and after); and
placement/gathering of batches on two processes of two devices each, for every kind of mesh.
The machinery is in ``tests/train/core/multiprocess.py``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from tests.train.core.multiprocess import (
    FIX,
    HOLD_AT,
    STEPS,
    assert_close,
    assert_primary_only_wrote,
    assert_same_as,
    child_env,
    free_port,
    is_timing,
    kill_after_checkpoint,
    launched,
    resume_latest,
    run_single,
)
from train.core.checkpoint import CHECKSUMS
from train.core.outputs import is_complete

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
            if isinstance(value, float) and not is_timing(key):
                assert_close(got[when][key], value, f"instruct_results.json {when}: {key}")
    assert got["delta"] == str(run_dir / "sift_delta.safetensors")


@pytest.mark.slow
def test_instruct_two_processes_killed_after_a_checkpoint_resume_to_the_same_result(
    instruct_setup, instruct_reference
):
    """fsdp across the two processes (weights and optimizer state sharded over both, each
    writing its shards of every checkpoint and restoring them; gathered for the delta, the
    export and MMLU), SIGKILLed right after step 3's checkpoint, resumed (identified by the
    flags): equal to the single process, MMLU before and after included. (The data mesh
    across processes is the glue test's.)"""
    out = instruct_setup[2] / "killed"
    argv = instruct_argv(instruct_setup, out, 4, "fsdp=2", "--save_steps", "1")
    logs = out.parent / "killed-logs"
    kill_after_checkpoint("train.instruct", argv, logs)
    held = out / "checkpoints" / str(HOLD_AT)
    assert (held / CHECKSUMS).is_file()
    assert sorted(p.name for p in (held / "state").glob("ocdbt.process_*")) == [
        "ocdbt.process_0",
        "ocdbt.process_1",
    ]
    assert not is_complete(out)
    launch = resume_latest("train.instruct", argv, logs, via="flags")
    assert_same_as(out, instruct_reference, INSTRUCT_METRICS)
    assert_same_instruct_results(out, instruct_reference)
    assert_primary_only_wrote(launch)


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
    addr = f"127.0.0.1:{free_port()}"
    two_devices = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    with launched(tmp_path) as launch:
        for i in range(2):
            args = [addr, "2", str(i)] if i else []  # process 1 by flags, process 0 by env
            env = child_env(**two_devices)
            if not i:
                env.update(JAX_COORDINATOR_ADDRESS=addr, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="0")
            launch.start_cmd([sys.executable, "-c", PLACEMENT, *args], env)
        launch.wait(time.monotonic() + 120)
    assert all(f"PLACEMENT OK {i}" in launch.text(i) for i in range(2)), launch.report()
