"""GLUE registry, loaders (TSV dir, csv/json files, offline hub) and metrics of train.data.glue."""

import time
from pathlib import Path

import numpy as np
import pytest

from train.data import glue
from train.data.glue import DataError

FIX = Path(__file__).parent / "fixtures"
GLUE_DIR = FIX / "glue"


def test_registry_has_all_nine_glue_tasks_and_mr():
    assert set(glue.GLUE_TASKS) == {
        "cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"
    }  # fmt: skip
    assert {"mr", "mr-reg"} <= set(glue.TASKS)
    assert glue.get_task("stsb").num_labels == 1 and glue.get_task("stsb").is_regression
    assert glue.get_task("mnli").num_labels == 3
    assert glue.get_task("qqp").text_keys == ("question1", "question2")
    assert glue.get_task("qnli").text_keys == ("question", "sentence")
    assert glue.get_task("mnli").text_keys == ("premise", "hypothesis")
    assert glue.get_task("SST-2").name == "sst2"


def test_unknown_task_lists_valid_names():
    with pytest.raises(DataError, match="unknown task 'glue9'.*cola, sst2, mrpc"):
        glue.get_task("glue9")


def test_cola_headerless_tsv():
    d = glue.load_glue_dir("cola", GLUE_DIR)
    assert d.train.num_rows == 5
    assert d.train["label"] == [1, 1, 0, 1, 0]
    assert d.train[2]["sentence"] == "They drank the pub."
    assert d.eval["validation"]["label"] == [1, 0, 1]
    assert d.train.features["label"].names == ["unacceptable", "acceptable"]


def test_mnli_has_matched_and_mismatched_dev_with_hf_label_ids():
    d = glue.load_glue_dir("mnli", GLUE_DIR)
    assert list(d.eval) == ["validation_matched", "validation_mismatched"]
    assert d.train.num_rows == 7
    assert d.train["label"] == [1, 0, 0, 0, 1, 0, 2]  # neutral, entailment..., contradiction
    assert d.eval["validation_matched"]["label"] == [1, 2]
    assert d.eval["validation_mismatched"]["label"] == [2, 2, 0]
    assert d.train[0]["premise"].startswith("Conceptually cream skimming")
    assert d.train[0]["hypothesis"].startswith("Product and geography")


def test_stsb_float_labels_and_rte_string_labels():
    s = glue.load_glue_dir("stsb", GLUE_DIR)
    np.testing.assert_allclose(s.train["label"], [5.0, 3.8, 3.8], rtol=1e-6)
    r = glue.load_glue_dir("rte", GLUE_DIR)
    assert r.train["label"] == [1, 0, 0, 1]  # not_entailment = 1 as in HF


def test_load_files_csv_and_jsonl_and_json():
    d = glue.load_task(
        "rte",
        train_file=FIX / "files" / "rte_train.csv",
        validation_file=FIX / "files" / "rte_dev.jsonl",
    )
    assert d.train["label"] == [0, 1, 0]  # names and ids mixed
    assert d.eval["validation"]["label"] == [1, 0]
    j = glue.load_files("sst2", FIX / "files" / "sst2.json", FIX / "files" / "sst2.json")
    assert j.train["sentence"] == ["a charming, funny film", "dull and overlong"]


def test_max_samples_cut_every_split():
    d = glue.load_task("mnli", glue_dir=GLUE_DIR, max_train_samples=2, max_eval_samples=1)
    assert d.train.num_rows == 2
    assert {k: v.num_rows for k, v in d.eval.items()} == {
        "validation_matched": 1,
        "validation_mismatched": 1,
    }


# ----------------------------------------------------------------------------- error paths


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_missing_file_is_named(tmp_path):
    ok = FIX / "files" / "rte_dev.jsonl"
    with pytest.raises(DataError, match="missing file .*nope.csv"):
        glue.load_task("rte", train_file=tmp_path / "nope.csv", validation_file=ok)


def test_missing_task_folder_in_glue_dir(tmp_path):
    with pytest.raises(DataError, match="no QNLI/train.tsv under --glue_dir"):
        glue.load_task("qnli", glue_dir=tmp_path)


def test_missing_dev_file_in_glue_dir(tmp_path):
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "train.tsv").write_bytes((GLUE_DIR / "RTE" / "train.tsv").read_bytes())
    with pytest.raises(DataError, match=r"missing file .*RTE/dev.tsv"):
        glue.load_glue_dir("rte", tmp_path)


def test_missing_text_column_names_file_and_columns(tmp_path):
    f = _write(tmp_path / "t.csv", "premise,label\nA,0\n")
    with pytest.raises(
        DataError, match=r"t.csv: missing text column.*\['sentence1', 'sentence2'\]"
    ):
        glue.load_files("rte", f, f)


def test_empty_text_names_file_and_row(tmp_path):
    f = _write(tmp_path / "t.csv", "sentence1,sentence2,label\nA,B,0\nC,,1\n")
    with pytest.raises(DataError, match=r"t.csv, row 2 \(line 3\): empty .* 'sentence2'"):
        glue.load_files("rte", f, f)


def test_label_outside_classes_names_file_row_and_value(tmp_path):
    f = _write(
        tmp_path / "t.jsonl", '{"sentence": "x", "label": 1}\n{"sentence": "y", "label": 2}\n'
    )
    with pytest.raises(DataError, match=r"t.jsonl, row 2 \(line 2\): label 2 is not a class"):
        glue.load_files("sst2", f, f)
    g = _write(tmp_path / "g.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    (tmp_path / "RTE").mkdir()
    g.rename(tmp_path / "RTE" / "train.tsv")
    with pytest.raises(DataError, match=r"RTE/train.tsv, line 2: label 'maybe' is not a class"):
        glue.load_glue_dir("rte", tmp_path)


def test_regression_label_must_be_a_number(tmp_path):
    f = _write(tmp_path / "s.csv", "sentence1,sentence2,label\na,b,high\n")
    with pytest.raises(DataError, match=r"s.csv, row 1 \(line 2\): label 'high' is not a number"):
        glue.load_files("stsb", f, f)


def test_tsv_wrong_field_count_and_missing_header_column(tmp_path):
    (tmp_path / "RTE").mkdir()
    _write(tmp_path / "RTE" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\n")
    with pytest.raises(
        DataError, match=r"train.tsv, line 2: expected 4 tab-separated fields, got 3"
    ):
        glue.load_glue_dir("rte", tmp_path)
    _write(tmp_path / "RTE" / "train.tsv", "index\ts1\tsentence2\tlabel\n0\ta\tb\t0\n")
    with pytest.raises(DataError, match=r"header lacks column\(s\) \['sentence1'\]"):
        glue.load_glue_dir("rte", tmp_path)


def test_offline_without_local_data_fails_fast_and_says_how(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="--glue_dir.*--train_file"):
        glue.load_task("rte")
    assert time.perf_counter() - t0 < 2.0


# ----------------------------------------------------------------------------- metrics


def test_metrics_match_hand_computed_values():
    m = glue.compute_metrics("mrpc", np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0]))
    # acc 3/4; F1 = 2PR/(P+R) with P = 1/2, R = 1 -> 2/3
    assert m == pytest.approx(
        {"eval_accuracy": 0.75, "eval_f1": 2 / 3, "eval_combined_score": (0.75 + 2 / 3) / 2}
    )
    # TP=2 FP=1 TN=1 FN=0: (2*1 - 1*0) / sqrt(3*2*2*1)
    m = glue.compute_metrics("cola", np.array([1, 1, 1, 0]), np.array([1, 1, 0, 0]))
    assert m == pytest.approx({"eval_matthews_correlation": 2 / np.sqrt(12)})
    # pearson([1,2,3],[1,3,2]) = 0.5, spearman also 0.5; predictions may be [n, 1]
    m = glue.compute_metrics("stsb", np.array([[1.0], [2.0], [3.0]]), np.array([1.0, 3.0, 2.0]))
    assert m == pytest.approx(
        {"eval_pearson": 0.5, "eval_spearmanr": 0.5, "eval_combined_score": 0.5}
    )
    m = glue.compute_metrics("stsb", np.array([1.0, 2.0, 4.0]), np.array([1.0, 2.0, 3.0]))
    assert m["eval_spearmanr"] == pytest.approx(1.0) and m["eval_pearson"] < 1.0


def test_metrics_take_logits_and_mnli_mismatched_suffix():
    logits = np.array([[0.1, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    labels = np.array([1, 0, 0])
    assert glue.compute_metrics("mnli", logits, labels, split="validation_matched") == {
        "eval_accuracy": pytest.approx(2 / 3)
    }
    assert glue.compute_metrics("mnli", logits, labels, split="validation_mismatched") == {
        "eval_accuracy_mm": pytest.approx(2 / 3)
    }
    with pytest.raises(ValueError, match="differ in shape"):
        glue.compute_metrics("rte", np.array([0, 1]), np.array([0, 1, 1]))
