"""bench.glue_small: the recorded runs make the tables (mean ± std, paired gaps), resumably."""

import json
from pathlib import Path

import pytest

from bench import glue_small


def record(task, method, seed, score, f1=None, params=1000, loss=0.5):
    metrics = {"eval_" + glue_small.METRIC[task]: score}
    if f1 is not None:
        metrics["eval_f1"] = f1
    return {
        "task": task,
        "method": method,
        "seed": seed,
        "metrics": metrics,
        "trainable_params": params,
        "train_steps": 10,
        "train_loss": loss,
        "wall_s": 60.0,
        "flags": {},
    }


def four_tasks(method, seed, score, **kw):
    """One record per GLUE task at the same score (MRPC also with an F1 of 0.8)."""
    return [
        record(t, method, seed, score, 0.8 if t == "mrpc" else None, **kw) for t in glue_small.TASKS
    ]


def report_of(tmp_path, recs):
    """The report of ``recs`` written as a runs file."""
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return glue_small.report(path)


def gap_head_and_row(tmp_path, recs, row):
    """The 4-task gap table's header and its row that starts with ``row``."""
    table = report_of(tmp_path, recs).splitlines()
    head = next(ln for ln in table if ln.startswith("| SIFT variant | avg |"))
    return head, next(ln for ln in table if ln.startswith(row))


def test_report_gives_mean_std_over_seeds_and_paired_gaps(tmp_path):
    recs = []
    for seed, (s, lo) in enumerate([(0.70, 0.68), (0.72, 0.69), (0.74, 0.70)]):
        recs += four_tasks("sift", seed, s, params=29186)
        recs += four_tasks("lora-matched", seed, lo, params=28418)
    table = report_of(tmp_path, recs)
    sift_row = next(ln for ln in table.splitlines() if ln.startswith("| sift |"))
    # mean 72.0, sample std 2.0 on every task; average 72.0; MRPC also shows F1
    assert sift_row.count("72.0 ± 2.0") == 4 and "(F1 80.0)" in sift_row
    assert sift_row.endswith("| 72.0 |") and "29,186" in sift_row
    gap = next(ln for ln in table.splitlines() if ln.startswith("| sift | 72.0 |"))
    # paired per seed: +2, +3, +4 -> mean +3.0, std 1.0; no full-FT runs -> no gap to full
    assert "+3.0 ± 1.0" in gap and gap.endswith("| – |")
    assert "Paper (RoBERTa-large" in table


def test_report_gives_mean_train_loss_per_task(tmp_path):
    recs = [record("cola", "sift", seed, 0.1, loss=loss) for seed, loss in ((0, 0.58), (1, 0.60))]
    recs.append(record("rte", "full", 0, 0.5, loss=0.51))
    lines = report_of(tmp_path, recs).splitlines()
    head = lines.index("| mean train loss | COLA | SST2 | MRPC | RTE |")
    # mean over seeds (0.59) where the method ran the task, a dash where it did not
    assert lines[head + 2] == "| sift | 0.5900 | – | – | – |"
    assert lines[head + 3] == "| full | – | – | – | 0.5100 |"


def test_done_runs_are_skipped(tmp_path, monkeypatch):
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps(record("rte", "sift", 0, 0.6)) + "\n")
    ran = []

    def fake_run_one(task, method, seed, glue_dir):
        ran.append((task, method, seed))
        return record(task, method, seed, 0.5)

    monkeypatch.setattr(glue_small, "run_one", fake_run_one)
    glue_small.run(["rte"], ["sift", "full"], [0], "unused", results=path)
    assert ran == [("rte", "full", 0)]
    assert len(path.read_text().splitlines()) == 2


def test_a_run_without_its_metric_is_an_error_not_a_record(monkeypatch):
    import bench.sweep

    monkeypatch.setattr(bench.sweep, "train_once", lambda flags: ({"train_loss": 0.1}, 1.0))
    with pytest.raises(RuntimeError, match="no eval_accuracy"):
        glue_small.run_one("rte", "sift", 0, "unused")


def test_a_dense_head_variant_is_paired_with_the_lora_that_has_the_same_head(tmp_path):
    recs = four_tasks("sift-head", 0, 0.70) + four_tasks("lora-matched-head", 0, 0.66)
    recs += four_tasks("lora-matched", 0, 0.50)
    table = report_of(tmp_path, recs).splitlines()
    gap = next(ln for ln in table if ln.startswith("| sift-head | 70.0 |"))
    assert "+4.0 (1 seed)" in gap  # against lora-matched-head, not lora-matched (+20)
    f = glue_small.flags("rte", "sift-head", 0)
    assert f["sparse_exception"] == ["classifier", "pooler"] and f["sparse_rate"] == 0.008


def test_a_variant_is_also_compared_with_the_best_matched_lora_row(tmp_path):
    # the 6-epoch twin is worse for LoRA than LoRA's 3-epoch row: beating the twin alone is
    # not beating LoRA, so the report pairs every variant with the best lora-matched* row too
    recs = []
    for seed, (s6, l6, l3) in enumerate([(0.70, 0.60, 0.72), (0.68, 0.62, 0.71)]):
        recs += four_tasks("sift-head-lr-6ep", seed, s6)
        recs += four_tasks("lora-matched-head-lr-6ep", seed, l6)
        recs += four_tasks("lora-matched-head-lr", seed, l3)
    head, gap = gap_head_and_row(tmp_path, recs, "| sift-head-lr-6ep | 69.0 |")
    assert "vs the best matched LoRA on seeds 0, 1, lora-matched-head-lr (paired)" in head
    # vs its twin: +10, +6 -> +8.0 ± 2.8; vs the best row: -2, -3 -> -2.5 ± 0.7; no full runs
    assert gap == "| sift-head-lr-6ep | 69.0 | +8.0 ± 2.8 | -2.5 ± 0.7 | – | – |"


def test_the_best_matched_lora_row_is_ranked_on_the_seeds_all_rows_share(tmp_path):
    # lora-matched-head has only a lucky seed 0 (66) and would win on its own mean (66 vs 65);
    # on seed 0, which both rows have, lora-matched is ahead (70 vs 66), so it is the reference
    recs = four_tasks("lora-matched", 0, 0.70) + four_tasks("lora-matched", 1, 0.60)
    recs += four_tasks("lora-matched-head", 0, 0.66)
    recs += four_tasks("sift", 0, 0.72) + four_tasks("sift", 1, 0.62)
    head, gap = gap_head_and_row(tmp_path, recs, "| sift | 67.0 |")
    assert "vs the best matched LoRA on seed 0, lora-matched (paired)" in head
    assert gap == "| sift | 67.0 | +2.0 ± 0.0 | +2.0 ± 0.0 | – | – |"


def test_a_variant_is_also_compared_with_the_best_full_row(tmp_path):
    # full fine-tuning gains from more epochs too: beating its 3-epoch row alone is not being
    # within reach of full fine-tuning, so the report pairs every variant with the best full*
    # row, ranked on the seed both full rows have (seed 0: full-6ep 66 > full 62)
    recs = four_tasks("full", 0, 0.62) + four_tasks("full", 1, 0.70)
    recs += four_tasks("full-6ep", 0, 0.66)
    recs += four_tasks("sift", 0, 0.65) + four_tasks("sift", 1, 0.69)
    head, gap = gap_head_and_row(tmp_path, recs, "| sift | 67.0 |")
    assert head.endswith("| vs full (paired) | vs the best full on seed 0, full-6ep (paired) |")
    # vs full: +3, -1 -> +1.0 ± 2.8; vs full-6ep: seed 0 only, -1
    assert gap == "| sift | 67.0 | – | – | +1.0 ± 2.8 | -1.0 (1 seed) |"


def test_gradient_vs_random_selection_is_compared_task_by_task(tmp_path):
    recs = [record("rte", "sift-10k", 0, 0.60), record("rte", "random-10k", 0, 0.55)]
    recs += [record("cola", "sift-10k", 0, 0.10)]  # no random run on CoLA: no cell
    row = next(ln for ln in report_of(tmp_path, recs).splitlines() if "sift-10k − random" in ln)
    assert row == "| sift-10k − random-10k | – | – | – | +5.0 (1 seed) |"
    f = glue_small.flags("rte", "random-10k", 0)
    assert f["selection"] == "random" and f["sparse_rate"] == 0.0028


def test_a_variant_may_set_its_own_learning_rate(monkeypatch):
    spec = {**glue_small.SIFT, "learning_rate": 4e-3, "dense_learning_rate": 2e-4}
    monkeypatch.setitem(glue_small.VARIANTS, "sift-lr4", spec)
    f = glue_small.flags("cola", "sift-lr4", 0)
    assert (f["learning_rate"], f["dense_learning_rate"]) == (4e-3, 2e-4)
    assert glue_small.flags("cola", "sift", 0)["learning_rate"] == glue_small.LR["sift"]


def test_a_variant_screened_on_one_task_is_listed_but_not_averaged_over(tmp_path):
    recs = four_tasks("sift", 0, 0.70) + four_tasks("lora-matched", 0, 0.66)
    recs += [r for r in four_tasks("sift-global", 0, 0.60) if r["task"] != "sst2"]
    recs.append(record("cola", "sift-head-5e-3", 0, 0.0))
    lines = report_of(tmp_path, recs).splitlines()
    # the common average is over the three tasks sift-global has, not shrunk to CoLA
    assert lines[0].endswith("| avg | avg (COLA, MRPC, RTE) |")
    row = next(ln for ln in lines if ln.startswith("| sift-head-5e-3 |"))
    assert row.endswith("| 0.0 | – | – | – | – | – |")


REPO = Path(__file__).resolve().parents[2]


def test_docs_glue_tables_are_those_of_the_recorded_runs():
    # docs/glue.md's tables must be what `report` makes of docs/glue/runs.jsonl: a run recorded
    # without regenerating the doc (or a hand edit of a table) fails here
    doc = REPO / "docs" / "glue.md"
    assert glue_small.write_report(doc, REPO / glue_small.RESULTS, check=True), (
        "docs/glue.md is stale: python -m bench.glue_small report --write docs/glue.md"
    )


def test_report_write_splices_between_markers_and_check_detects_staleness(tmp_path):
    runs = tmp_path / "runs.jsonl"
    runs.write_text("".join(json.dumps(r) + "\n" for r in four_tasks("sift", 0, 0.7)))
    doc = tmp_path / "glue.md"
    prose = "# title\n\nprose before\n"
    doc.write_text(f"{prose}{glue_small.BEGIN}\nold table\n{glue_small.END}\nprose after\n")
    assert not glue_small.write_report(doc, runs, check=True)  # stale: check says so ...
    assert "old table" in doc.read_text()  # ... and writes nothing
    assert not glue_small.write_report(doc, runs)  # regenerated
    text = doc.read_text()
    assert text.startswith(prose) and text.endswith(f"{glue_small.END}\nprose after\n")
    assert glue_small.report(runs) in text and "old table" not in text
    assert glue_small.write_report(doc, runs, check=True)  # now current
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was renamed into place
    # one more run recorded: the doc is stale again
    with runs.open("a") as f:
        f.write(json.dumps(record("rte", "full", 0, 0.6)) + "\n")
    assert not glue_small.write_report(doc, runs, check=True)


def test_report_write_refuses_a_doc_without_markers(tmp_path):
    runs = tmp_path / "runs.jsonl"
    runs.write_text("".join(json.dumps(r) + "\n" for r in four_tasks("sift", 0, 0.7)))
    doc = tmp_path / "glue.md"
    doc.write_text("no markers here\n")
    with pytest.raises(ValueError, match="exactly one"):
        glue_small.write_report(doc, runs)
    assert doc.read_text() == "no markers here\n"  # untouched
