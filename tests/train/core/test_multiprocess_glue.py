"""Issue 18: ``train.glue`` as two real processes, SIGKILLed past a checkpoint and resumed,
equals one process (a tiny random BERT on an STS-B-style regression set); a refused output
directory stops both with its reason. The machinery is in
``tests/train/core/multiprocess.py``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from tests.train.core.multiprocess import (
    FIX,
    HOLD_AT,
    STEPS,
    TIMEOUT,
    assert_primary_only_wrote,
    assert_same_as,
    child_env,
    free_port,
    kill_after_checkpoint,
    launched,
    resume_latest,
    run_single,
)
from train.core.checkpoint import CHECKSUMS
from train.core.outputs import read_run_state

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
def test_glue_two_processes_killed_after_a_checkpoint_resume_to_the_same_result(
    glue_setup, glue_reference
):
    """Two processes (a data-parallel mesh over them, identified by the ``JAX_*`` variables)
    clear an older run's outputs, are SIGKILLed right after step 3's checkpoint, resume from
    it (identified by the flags) and end equal to the single process. (One run covers both
    "two equal one" and "killed, resumed": the fsdp mesh across processes and its sharded
    checkpoints are the instruct test's.)"""
    out = glue_setup[2] / "killed"
    # an older run's outputs there: process 0 clears them before any process writes
    (out / "checkpoints" / "99").mkdir(parents=True)
    (out / "checkpoints" / "99" / "stale").write_text("old")
    (out / "train_log.jsonl").write_text('{"step": 99, "loss": 1.0}\n')
    argv = glue_argv(glue_setup, out, 4, "data=2", "--save_steps", "1")
    logs = out.parent / "killed-logs"
    kill_after_checkpoint("train.glue", [*argv, "--overwrite_output_dir"], logs)
    assert read_run_state(out)["status"] == "running"
    assert not (out / "checkpoints" / "99").exists()
    assert (out / "checkpoints" / str(HOLD_AT) / CHECKSUMS).is_file()
    launch = resume_latest("train.glue", argv, logs, via="flags")
    assert_same_as(out, glue_reference, GLUE_METRICS)
    assert_primary_only_wrote(launch)


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


@pytest.mark.slow
def test_a_refused_output_dir_stops_both_processes_with_its_reason(glue_setup, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "train_log.jsonl").write_text("")  # another run's: not empty, no --overwrite
    addr = f"127.0.0.1:{free_port()}"
    t = time.monotonic()
    with launched(tmp_path) as launch:
        for i in range(2):
            env = child_env(
                JAX_COORDINATOR_ADDRESS=addr, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)
            )
            launch.start("train.glue", glue_argv(glue_setup, out, 4, "data=2"), env)
        for proc, _ in launch.procs:
            proc.wait(timeout=TIMEOUT)
    assert [p.returncode for p, _ in launch.procs] == [2, 2], launch.report()
    assert "is not empty" in launch.text(0)
    assert "process 0 could not take --output_dir" in launch.text(1), launch.report()
    assert "is not empty" in launch.text(1)
    assert time.monotonic() - t < 60  # neither waited for a timeout
    assert sorted(p.name for p in out.iterdir()) == ["train_log.jsonl"]
