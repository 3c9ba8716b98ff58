"""GLUE registry, loaders (TSV dir, csv/json files, offline hub) and metrics of train.glue.data."""

import time
from pathlib import Path

import numpy as np
import pytest

from train.glue import data as glue
from train.glue.data import DataError

FIX = Path(__file__).resolve().parents[2] / "fixtures"
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
    assert d.train.num_rows == 6
    assert d.train["label"] == [1, 1, 0, 1, 0, 1]
    assert d.train[2]["sentence"] == "They drank the pub."
    assert d.train[5]["sentence"] == 'Susan whispered "Shut up".'  # quotes kept verbatim
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
    assert r.eval["validation"]["label"] == [1, 0]


def test_mrpc_bom_header_and_fields_beginning_with_a_quote_come_back_verbatim():
    # The official MRPC files begin with a UTF-8 BOM; some fields begin with '"' and are text,
    # not quoted fields (a quote-aware reader merges dev rows 1 and 2 and drops a row).
    assert (GLUE_DIR / "MRPC" / "train.tsv").read_bytes().startswith(b"\xef\xbb\xbfQuality\t")
    d = glue.load_task("mrpc", glue_dir=GLUE_DIR)
    assert d.train.num_rows == 5 and d.eval["validation"].num_rows == 3
    assert d.train["label"] == [1, 0, 1, 0, 1]
    assert d.eval["validation"]["label"] == [1, 0, 0]
    assert d.train.features["label"].names == ["not_equivalent", "equivalent"]
    assert d.train[0]["sentence1"].startswith('Amrozi accused his brother, whom he called "the')
    assert d.train[3]["sentence1"] == (
        '"I think you\'ll see a lot of job growth in the next two years," he said, adding the '
        "growth could replace jobs lost."
    )
    assert d.train[3]["sentence2"] == (
        '"I think you\'ll see a lot of job growth in the next two years," said Mankiw.'
    )
    dev = d.eval["validation"]
    assert dev[0]["sentence2"] == (
        '"The foodservice pie business does not fit our long-term growth strategy.'
    )
    assert dev[1]["sentence1"].startswith("Magnarelli said Racicot hated the Iraqi regime")
    assert dev[1]["sentence2"].startswith('His wife said he was "100 percent behind George Bush"')


def test_rte_field_beginning_with_a_double_quote_is_text():
    # Official RTE train row index 2164 opens a quote that never closes in its field (a
    # quote-aware reader would run on into the next field); row 50 opens and closes one inside.
    d = glue.load_glue_dir("rte", GLUE_DIR)
    assert d.train.num_rows == 4
    row = d.train[0]
    assert row["sentence1"] == (
        "\"That film wasn't too successful, but then 'WarGames,' which was successful, came out "
        "right when I won the Tony for 'Brighton Beach' in 1983."
    )
    assert row["sentence2"] == 'The film "WarGames" was shot in 1983.'
    assert row["label"] == 1
    assert d.train[1]["sentence1"].startswith("A place of sorrow, after Pope John Paul II died")
    assert d.train[2]["sentence1"].startswith('"Instead of action on crime, we got the federal')
    assert d.train[2]["sentence1"].endswith("tabled the bill killing the long-gun registry.")
    assert d.train[2]["sentence2"] == "Garry Breitkreuz is a member of the Conservative Party."
    assert d.train[2]["label"] == 0


def test_sst2_tsv_keeps_the_text_verbatim():
    d = glue.load_glue_dir("sst2", GLUE_DIR)
    assert d.train.num_rows == 4 and d.eval["validation"].num_rows == 2
    assert d.train["label"] == [0, 0, 1, 0]
    assert d.eval["validation"]["label"] == [1, 0]
    assert d.train[0]["sentence"] == "hide new secretions from the parental units "
    assert d.eval["validation"][0]["sentence"] == "it 's a charming and often affecting journey . "


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


def test_glue_tsv_rows_with_wrong_field_count_are_errors_not_skipped(tmp_path):
    cola = tmp_path / "CoLA"
    cola.mkdir()
    (cola / "dev.tsv").write_bytes((GLUE_DIR / "CoLA" / "dev.tsv").read_bytes())
    _write(cola / "train.tsv", "gj04\t1\t\tA fine sentence.\ngj04\t0\t*\tOne\textra field.\n")
    with pytest.raises(
        DataError, match=r"CoLA/train.tsv, line 2: expected 4 tab-separated fields, got 5"
    ):
        glue.load_glue_dir("cola", tmp_path)
    _write(cola / "train.tsv", "gj04\t1\t\tA fine sentence.\ngj04\t0\tNo mark column.\n")
    with pytest.raises(DataError, match=r"CoLA/train.tsv, line 2: expected 4 .* got 3"):
        glue.load_glue_dir("cola", tmp_path)
    _write(cola / "train.tsv", "gj04\t1\t\tA fine sentence.\n\ngj04\t0\t*\tAnother.\n")
    with pytest.raises(
        DataError, match=r"CoLA/train.tsv, line 2: expected 4 .* got 0 \(empty line\)"
    ):
        glue.load_glue_dir("cola", tmp_path)
    _write(cola / "train.tsv", "gj04\t1\t\tA fine sentence.\ngj04\t0\t*\tAnother.\n\n\n")
    assert glue.load_glue_dir("cola", tmp_path).train.num_rows == 2  # trailing empty lines
    mrpc = tmp_path / "MRPC"
    mrpc.mkdir()
    header = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    _write(mrpc / "train.tsv", header + '1\t1\t2\t"Open quote\tb\n0\t3\t4\tc\n')
    with pytest.raises(DataError, match=r"MRPC/train.tsv, line 3: expected 5 .* got 4"):
        glue.load_glue_dir("mrpc", tmp_path)


def test_empty_glue_tsv_is_named(tmp_path):
    (tmp_path / "SST-2").mkdir()
    _write(tmp_path / "SST-2" / "train.tsv", "")
    with pytest.raises(DataError, match=r"SST-2/train.tsv: empty file"):
        glue.load_glue_dir("sst2", tmp_path)
    _write(tmp_path / "SST-2" / "train.tsv", "sentence\tlabel\n")
    with pytest.raises(DataError, match=r"SST-2/train.tsv: a header but no rows"):
        glue.load_glue_dir("sst2", tmp_path)


def test_train_files_with_bom_and_tsv_quote_none(tmp_path):
    f = tmp_path / "t.csv"
    f.write_bytes('\ufeffsentence1,sentence2,label\n"a, b",c,0\n'.encode())
    d = glue.load_files("rte", f, f)
    assert d.train.column_names == ["sentence1", "sentence2", "label"]
    assert d.train[0]["sentence1"] == "a, b"
    t = tmp_path / "t.tsv"
    t.write_bytes('\ufeffsentence1\tsentence2\tlabel\n"Open quote\tb\t1\nc\t"d"\t0\n'.encode())
    d = glue.load_files("rte", t, t)
    assert d.train["sentence1"] == ['"Open quote', "c"] and d.train["sentence2"] == ["b", '"d"']
    assert d.train["label"] == [1, 0]
    j = tmp_path / "t.jsonl"
    j.write_bytes('\ufeff{"sentence": "x", "label": 1}\n'.encode())
    assert glue.load_files("sst2", j, j).train["sentence"] == ["x"]


def test_ragged_csv_names_file_and_line(tmp_path):
    f = _write(tmp_path / "r.csv", "sentence1,sentence2,label\na,b,0\nc,d\n")
    with pytest.raises(DataError, match=r"r.csv, line 3: expected 3 comma-separated fields, got 2"):
        glue.load_files("rte", f, f)
    f = _write(tmp_path / "r.csv", 'sentence1,sentence2,label\n"two\nlines",b,0\nc,d,1,9\n')
    with pytest.raises(DataError, match=r"r.csv, line 4: expected 3 comma-separated fields, got 4"):
        glue.load_files("rte", f, f)
    t = _write(tmp_path / "r.tsv", "sentence\tlabel\nx\t1\ny\t0\textra\n")
    with pytest.raises(DataError, match=r"r.tsv, line 3: expected 2 tab-separated fields, got 3"):
        glue.load_files("sst2", t, t)
    u = _write(tmp_path / "u.csv", 'sentence,label\nx,1\n"never closed,0\n')
    with pytest.raises(DataError, match=r"u.csv, line \d+: cannot be parsed"):
        glue.load_files("sst2", u, u)
    # a quoted field spanning lines: later rows still name their own line
    g = _write(tmp_path / "g.csv", 'sentence1,sentence2,label\n"two\nlines",b,0\nc,,1\n')
    with pytest.raises(DataError, match=r"g.csv, row 2 \(line 4\): empty .* 'sentence2'"):
        glue.load_files("rte", g, g)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("e.csv", "", "empty file"),
        ("e.tsv", "\n\n", "empty file"),
        ("h.csv", "sentence,label\n", "a header but no rows"),
        ("e.json", "", "empty file"),
        ("e.jsonl", "  \n", "empty file"),
        ("l.json", "[]", "no records"),
    ],
)
def test_empty_train_file_is_named(tmp_path, name, text, message):
    ok = FIX / "files" / "sst2.json"
    f = _write(tmp_path / name, text)
    with pytest.raises(DataError, match=rf"{name}: {message}"):
        glue.load_task("sst2", train_file=f, validation_file=ok)
    with pytest.raises(DataError, match=rf"{name}: {message}"):
        glue.load_task("sst2", train_file=ok, validation_file=f)


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
