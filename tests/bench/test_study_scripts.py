"""The study's run lists and the Table-2 script produce configurations the trainer accepts."""

import json

import pytest

from bench import sweep, table2
from train.core.config import parse_args
from train.glue import GlueConfig


def test_sift_budgets_hit_their_counts_and_lora_matches():
    assert sweep.sift_count(0.008) == 28_416  # the default recipe's 24 kernels + 24 biases
    for b in sweep.BUDGETS:
        assert abs(sweep.sift_count(sweep.rate_for(b)) - b) <= max(10, b // 100)
    # LoRA on query/value kernels of 6 layers: 2 tensors x 6 layers x (384 + 384) per rank.
    assert sweep.lora_overrides(101_376)["lora_rank"] * 9_216 == 101_376


def test_every_sweep_run_is_a_valid_train_glue_config():
    runs = [r for make in sweep.SWEEPS.values() for r in make()]
    assert len({r.label for r in runs}) == len(runs)
    for r in runs:
        cfg = sweep.glue_config(r, seed=1)
        assert isinstance(cfg, GlueConfig) and cfg.seed == 1 and cfg.max_train_samples == 3000
    budget = [r for r in runs if r.sweep == "budget"]
    assert len(budget) == 4 * len(sweep.BUDGETS) + 2  # 3 SIFT selections + LoRA, full, head


def test_table2_commands_parse_and_collect_reads_results(tmp_path):
    ns = table2.argparse.Namespace(
        model="roberta-large", glue_dir="/data/glue", output_root=str(tmp_path),
        extra=["--max_eval_samples", "100"], per_device_batch=8,
    )  # fmt: skip
    for method in table2.METHODS:
        for task in table2.PAPER:
            argv = table2.command(method, task, ns)[3:]
            cfg = parse_args(argv, GlueConfig)
            assert cfg.task_name == task and cfg.finetuning_type == method
            assert cfg.per_device_train_batch_size == 8 and cfg.max_eval_samples == 100
            assert cfg.bf16 and cfg.max_seq_length == 512
    out = tmp_path / "sift" / "rte"
    out.mkdir(parents=True)
    (out / "eval_results.json").write_text(json.dumps({"eval_accuracy": 0.8589}))
    table = table2.collect(str(tmp_path))
    assert "| rte | 85.9 | 85.9 | 85.2 | 86.6 |" in table
    assert "| avg | – |" in table  # 7 tasks missing: no average


def test_table2_dry_run_prints_without_running(capsys):
    assert table2.main(["run", "--tasks", "rte", "--dry_run"]) == 0
    assert "--task_name rte" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["run", "--tasks", "wnli"], ["run", "--methods", "adapter"]])
def test_table2_rejects_unknown_tasks_and_methods(bad):
    with pytest.raises(SystemExit):
        table2.main(bad)


@pytest.mark.parametrize("module", [sweep, table2])
def test_docstring_examples(module):
    import doctest

    assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0
