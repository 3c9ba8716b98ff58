"""GLUE task registry, loading (hub, local GLUE TSV directory, csv/json files) and official metrics.

Every loader returns a :class:`TaskData` whose datasets have the task's text columns (HF names,
see :data:`TASKS`) and ``label`` (``ClassLabel`` in HF's label order, or float32 for STS-B and
``mr-reg``). Everything is validated before training starts: unknown task, missing file,
missing text column, empty text, and labels outside the task's classes each raise a
:class:`DataError` that names the file, the row and the value.

Where the data comes from (:func:`load_task`), first match wins:

1. ``train_file`` / ``validation_file``: csv or tsv (read with :mod:`csv`, a header line, tsv
   with ``QUOTE_NONE``), json or jsonl (read with ``datasets.load_dataset``); columns as in HF
   ``run_glue.py``: the task's own text keys, or ``sentence1``/``sentence2`` (pairs) /
   ``sentence`` (single), and ``label`` (an id or a label name);
2. ``glue_dir``: the standard GLUE TSV layout of ``download_glue_data.py`` (``RTE/train.tsv``,
   ``RTE/dev.tsv``, ``MNLI/dev_matched.tsv`` + ``dev_mismatched.tsv``; CoLA has no header);
3. ``mr`` / ``mr-reg``: the embedded movie-review sentences (:mod:`train.data.mr`);
4. the Hugging Face hub (``nyu-mll/glue``), unless ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` is
   set or a 3-second probe of the hub fails: then a :class:`DataError` says how to use local files.

Local text files are read as the official GLUE files need: UTF-8 with or without a byte-order
mark (the MRPC files begin with one), TSV with ``csv.QUOTE_NONE`` (a field that begins with
``"``, as in MRPC and RTE, is text, not a quoted field), every row with exactly the header's
number of fields (CoLA, headerless: 4). A row with another number of fields, an empty line
before the last row, and a file without rows raise a :class:`DataError` naming file and line.
"""

from __future__ import annotations

import csv
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

__all__ = [
    "TASKS",
    "GLUE_TASKS",
    "DataError",
    "TaskData",
    "TaskSpec",
    "compute_metrics",
    "get_task",
    "hub_reachable",
    "label_names",
    "load_glue_dir",
    "load_files",
    "load_task",
]


class DataError(ValueError):
    """Task data that cannot be used as asked (the message says where and how to fix it)."""


@dataclass(frozen=True)
class TaskSpec:
    """What defines a task: its inputs, labels, evaluation splits and metrics.

    Attributes:
        name: registry name (``"rte"``).
        text_keys: one or two text column names, HF ``glue`` names.
        label_names: class names in HF's id order; empty for regression.
        metrics: metric names, as HF ``evaluate``'s glue metric returns them.
        eval_splits: evaluation split names (MNLI: matched and mismatched).
        main_metric: the HF-style key the paper reports (``"eval_accuracy"``).
        glue_dir_name: folder name in the GLUE TSV layout (``"RTE"``), ``None`` for non-GLUE.
        tsv_columns: TSV column (name, or position for headerless CoLA) of each text key.
        tsv_label: TSV label column (name or position; a position means the TSV has no header).
        tsv_files: TSV file name of each split (train first).
        tsv_width: number of fields of every row of a headerless TSV (CoLA: 4); with a
            header, the header's length is used.
    """

    name: str
    text_keys: tuple[str, ...]
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    eval_splits: tuple[str, ...] = ("validation",)
    main_metric: str = "eval_accuracy"
    glue_dir_name: str | None = None
    tsv_columns: tuple[str | int, ...] = ()
    tsv_label: str | int = "label"
    tsv_files: dict[str, str] = field(
        default_factory=lambda: {"train": "train.tsv", "validation": "dev.tsv"}
    )
    tsv_width: int | None = None

    @property
    def is_regression(self) -> bool:
        """True when the label is a float (STS-B, ``mr-reg``)."""
        return not self.label_names

    @property
    def num_labels(self) -> int:
        """Number of classes; 1 for regression (a single output, as in HF)."""
        return len(self.label_names) or 1


_NLI2 = ("entailment", "not_entailment")
TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec(
            "cola", ("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",),
            main_metric="eval_matthews_correlation", glue_dir_name="CoLA",
            tsv_columns=(3,), tsv_label=1, tsv_width=4,  # source, label, original mark, text
        ),
        TaskSpec(
            "sst2", ("sentence",), ("negative", "positive"), ("accuracy",),
            glue_dir_name="SST-2", tsv_columns=("sentence",),
        ),
        TaskSpec(
            "mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
            ("accuracy", "f1"), glue_dir_name="MRPC",
            tsv_columns=("#1 String", "#2 String"), tsv_label="Quality",
        ),
        TaskSpec(
            "qqp", ("question1", "question2"), ("not_duplicate", "duplicate"),
            ("accuracy", "f1"), glue_dir_name="QQP",
            tsv_columns=("question1", "question2"), tsv_label="is_duplicate",
        ),
        TaskSpec(
            "stsb", ("sentence1", "sentence2"), (), ("pearson", "spearmanr"),
            main_metric="eval_pearson", glue_dir_name="STS-B",
            tsv_columns=("sentence1", "sentence2"), tsv_label="score",
        ),
        TaskSpec(
            "mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
            ("accuracy",), eval_splits=("validation_matched", "validation_mismatched"),
            glue_dir_name="MNLI", tsv_columns=("sentence1", "sentence2"), tsv_label="gold_label",
            tsv_files={
                "train": "train.tsv",
                "validation_matched": "dev_matched.tsv",
                "validation_mismatched": "dev_mismatched.tsv",
            },
        ),
        TaskSpec(
            "qnli", ("question", "sentence"), _NLI2, ("accuracy",), glue_dir_name="QNLI",
            tsv_columns=("question", "sentence"),
        ),
        TaskSpec(
            "rte", ("sentence1", "sentence2"), _NLI2, ("accuracy",), glue_dir_name="RTE",
            tsv_columns=("sentence1", "sentence2"),
        ),
        TaskSpec(
            "wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",),
            glue_dir_name="WNLI", tsv_columns=("sentence1", "sentence2"),
        ),
        TaskSpec("mr", ("sentence",), ("negative", "positive"), ("accuracy",)),
        TaskSpec(
            "mr-reg", ("sentence",), (), ("pearson", "spearmanr"), main_metric="eval_pearson"
        ),
    ]
}  # fmt: skip
GLUE_TASKS = tuple(n for n, t in TASKS.items() if t.glue_dir_name)


def get_task(name: str) -> TaskSpec:
    """The :class:`TaskSpec` of ``name`` (case-insensitive; ``sst-2``/``sts-b`` accepted).

    Raises:
        DataError: unknown name (the message lists the valid ones).

    Example:
        >>> get_task("STS-B").num_labels, get_task("mnli").eval_splits
        (1, ('validation_matched', 'validation_mismatched'))
    """
    key = name.strip().lower()
    key = {"sst-2": "sst2", "sts-b": "stsb", "mr_reg": "mr-reg"}.get(key, key)
    if key not in TASKS:
        raise DataError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[key]


@dataclass
class TaskData:
    """A loaded task: ``train`` and the ``eval`` datasets (``{split name: Dataset}``).

    Attributes:
        spec: the task.
        train: training ``datasets.Dataset`` (text keys + ``label``).
        eval: evaluation datasets by split name (``spec.eval_splits`` order).
        source: where the data came from, for the log.
    """

    spec: TaskSpec
    train: Any
    eval: dict[str, Any]
    source: str


# ----------------------------------------------------------------------------- rows → datasets


def _features(spec: TaskSpec):
    import datasets

    cols = {k: datasets.Value("string") for k in spec.text_keys}
    cols["label"] = (
        datasets.Value("float32")
        if spec.is_regression
        else datasets.ClassLabel(names=list(spec.label_names))
    )
    return datasets.Features(cols)


def _convert_label(spec: TaskSpec, raw: Any, where: str) -> int | float:
    """A raw label (id, name, or number string) as the task's label; :class:`DataError` if not."""
    if spec.is_regression:
        try:
            value = float(raw)
        except (TypeError, ValueError):
            value = float("nan")
        if raw is None or isinstance(raw, bool) or not np.isfinite(value):
            raise DataError(f"{where}: label {raw!r} is not a number (task {spec.name})")
        return value
    if isinstance(raw, str):
        s = raw.strip()
        if s in spec.label_names:
            return spec.label_names.index(s)
        raw = s
    try:
        as_float = float(raw)
        ok = not isinstance(raw, bool) and as_float.is_integer()
        as_int = int(as_float) if ok else -1
    except (TypeError, ValueError):
        as_int = -1
    if 0 <= as_int < spec.num_labels:
        return as_int
    valid = ", ".join(f"{i}={n}" for i, n in enumerate(spec.label_names))
    raise DataError(f"{where}: label {raw!r} is not a class of task {spec.name} ({valid})")


def _check_text(value: Any, key: str, where: str) -> str:
    if value is None or not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: empty or missing text in column {key!r}")
    return value


def _to_dataset(spec: TaskSpec, rows: list[tuple[list[str], Any]], wheres: list[str]):
    """Validated ``(texts, raw label)`` rows as a ``datasets.Dataset``."""
    import datasets

    cols: dict[str, list] = {k: [] for k in spec.text_keys}
    cols["label"] = []
    for (texts, raw), where in zip(rows, wheres, strict=True):
        for key, text in zip(spec.text_keys, texts, strict=True):
            cols[key].append(_check_text(text, key, where))
        cols["label"].append(_convert_label(spec, raw, where))
    return datasets.Dataset.from_dict(cols, features=_features(spec))


# ----------------------------------------------------------------------------- GLUE TSV directory


def _task_folder(spec: TaskSpec, glue_dir: Path) -> Path:
    for cand in (glue_dir / spec.glue_dir_name, glue_dir / spec.name, glue_dir):
        if (cand / spec.tsv_files["train"]).is_file():
            return cand
    raise DataError(
        f"no {spec.glue_dir_name}/{spec.tsv_files['train']} under --glue_dir {glue_dir} "
        f"(expected the GLUE layout, e.g. {glue_dir / spec.glue_dir_name / 'train.tsv'})"
    )


def _read_records(path: Path, delimiter: str, quoted: bool) -> list[tuple[int, list[str]]]:
    """``(line number, fields)`` of every record of a delimited UTF-8 text file.

    A leading byte-order mark is dropped (``utf-8-sig``). ``quoted=False`` reads with
    ``csv.QUOTE_NONE``: one record per line, ``"`` is an ordinary character (GLUE TSVs).
    ``quoted=True`` is the standard csv dialect (``strict``: a stray or unterminated quote is
    an error instead of a silently merged row). Empty lines at the end of the file are dropped;
    an empty line before the last record stays, as a record of no fields.
    """
    quoting = csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE
    records: list[tuple[int, list[str]]] = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting, strict=quoted)
        last = 0  # line number of the previous record's last line (quoted fields span lines)
        try:
            for fields in reader:
                records.append((last + 1, fields))
                last = reader.line_num
        except csv.Error as e:
            raise DataError(f"{path}, line {reader.line_num}: cannot be parsed: {e}") from e
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e})") from e
    while records and not records[-1][1]:
        records.pop()
    return records


def _check_width(path: Path, records, width: int, delimiter: str) -> None:
    """:class:`DataError` naming file and line for the first record without ``width`` fields."""
    sep = {"\t": "tab", ",": "comma"}.get(delimiter, repr(delimiter))
    for lineno, fields in records:
        if len(fields) != width:
            got = f"{len(fields)}: {delimiter.join(fields)[:80]!r}" if fields else "0 (empty line)"
            raise DataError(
                f"{path}, line {lineno}: expected {width} {sep}-separated fields, got {got}"
            )


def _read_tsv(spec: TaskSpec, path: Path):
    if not path.is_file():
        raise DataError(f"missing file {path} (task {spec.name})")
    records = _read_records(path, "\t", quoted=False)
    if not records:
        raise DataError(f"{path}: empty file (task {spec.name} needs rows)")
    headerless = isinstance(spec.tsv_label, int)
    if headerless:
        pos, lab = list(spec.tsv_columns), spec.tsv_label
        width = spec.tsv_width or max([*pos, lab]) + 1
        body = records
    else:
        header = records[0][1]
        index = {name: i for i, name in enumerate(header)}
        missing = [c for c in (*spec.tsv_columns, spec.tsv_label) if c not in index]
        if missing:
            raise DataError(
                f"{path}: header lacks column(s) {missing} needed for task {spec.name}; "
                f"found {header}"
            )
        pos, lab = [index[c] for c in spec.tsv_columns], index[spec.tsv_label]
        width = len(header)
        body = records[1:]
    if not body:
        raise DataError(f"{path}: a header but no rows (task {spec.name} needs rows)")
    _check_width(path, body, width, "\t")
    rows = [([parts[p] for p in pos], parts[lab]) for _, parts in body]
    return _to_dataset(spec, rows, [f"{path}, line {lineno}" for lineno, _ in body])


def load_glue_dir(task: str, glue_dir: str | Path) -> TaskData:
    """A GLUE task from a local directory in the standard GLUE TSV layout.

    Args:
        task: GLUE task name (``"rte"``).
        glue_dir: the directory holding ``CoLA/``, ``RTE/``, ... (or the task folder itself).

    Raises:
        DataError: missing folder or file, or a malformed row (file and line named).

    Example:
        >>> d = load_glue_dir("mnli", "tests/fixtures/glue")
        >>> sorted(d.eval), d.train.features["label"].names[0]
        (['validation_matched', 'validation_mismatched'], 'entailment')
    """
    spec = get_task(task)
    if spec.glue_dir_name is None:
        raise DataError(f"task {spec.name} is not a GLUE task; it has no GLUE directory layout")
    folder = _task_folder(spec, Path(glue_dir))
    ds = {split: _read_tsv(spec, folder / fname) for split, fname in spec.tsv_files.items()}
    train = ds.pop("train")
    return TaskData(spec, train, ds, source=str(folder))


# ----------------------------------------------------------------------------- csv / json files


def _file_builder(path: Path) -> str:
    ext = path.suffix.lower()
    if ext in (".csv", ".tsv"):
        return "csv"
    if ext in (".json", ".jsonl"):
        return "json"
    raise DataError(f"{path}: unsupported extension {ext!r} (use .csv, .tsv, .json or .jsonl)")


def _read_csv_columns(path: Path) -> tuple[dict[str, list[str]], list[str]]:
    """Columns and per-row ``where`` of a csv (standard quoting) or tsv (``QUOTE_NONE``) file."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    records = _read_records(path, delimiter, quoted=delimiter == ",")
    if not records:
        raise DataError(f"{path}: empty file (expected a header line and rows)")
    header, body = records[0][1], records[1:]
    if not body:
        raise DataError(f"{path}: a header but no rows")
    _check_width(path, body, len(header), delimiter)
    columns = {name: [fields[i] for _, fields in body] for i, name in enumerate(header)}
    wheres = [f"{path}, row {i} (line {lineno})" for i, (lineno, _) in enumerate(body, 1)]
    return columns, wheres


def _read_json_columns(path: Path) -> tuple[dict[str, list], list[str]]:
    """Columns and per-row ``where`` of a json (list of records, or JSON lines) / jsonl file."""
    import datasets

    text = path.read_bytes().decode("utf-8", errors="replace").lstrip("\ufeff").strip()
    if not text:
        raise DataError(f"{path}: empty file (expected JSON records)")
    try:
        raw = datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception as e:  # pyarrow / datasets parse errors; the cause says more
        if "".join(text.split()) in ("[]", "{}"):
            raise DataError(f"{path}: no records") from e
        cause = e.__cause__ or e
        raise DataError(f"{path}: cannot be read as json: {cause or type(cause).__name__}") from e
    if raw.num_rows == 0:
        raise DataError(f"{path}: no records")
    jsonl = path.suffix.lower() == ".jsonl"
    wheres = [
        f"{path}, row {i}" + (f" (line {i})" if jsonl else "") for i in range(1, raw.num_rows + 1)
    ]
    return raw.to_dict(), wheres


def _read_file(spec: TaskSpec, path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file {path} (task {spec.name})")
    if _file_builder(path) == "csv":
        data, wheres = _read_csv_columns(path)
    else:
        data, wheres = _read_json_columns(path)
    cols = set(data)
    keys = list(spec.text_keys)
    if not set(keys) <= cols:
        generic = ["sentence1", "sentence2"] if len(keys) == 2 else ["sentence"]
        if set(generic) <= cols:
            keys = generic
        else:
            raise DataError(
                f"{path}: missing text column(s) for task {spec.name}: expected "
                f"{list(spec.text_keys)} or {generic}; found {sorted(cols)}"
            )
    if "label" not in cols:
        raise DataError(f"{path}: no 'label' column; found {sorted(cols)}")
    rows = [([data[k][i] for k in keys], data["label"][i]) for i in range(len(wheres))]
    return _to_dataset(spec, rows, wheres)


def load_files(
    task: str, train_file: str | Path | None, validation_file: str | Path | None
) -> TaskData:
    """A task from csv / json / jsonl files (columns as in HF ``run_glue.py``).

    Args:
        task: task name; gives the text keys, classes and metrics.
        train_file: training file.
        validation_file: evaluation file (becomes the ``validation`` split).

    Raises:
        DataError: missing file or column, empty text, or a label outside the task's classes.

    Example:
        >>> d = load_files("rte", "tests/fixtures/files/rte_train.csv",
        ...                "tests/fixtures/files/rte_dev.jsonl")
        >>> d.train.column_names, list(d.eval)
        (['sentence1', 'sentence2', 'label'], ['validation'])
    """
    spec = get_task(task)
    if train_file is None or validation_file is None:
        raise DataError("--train_file and --validation_file must be given together")
    return TaskData(
        spec,
        _read_file(spec, train_file),
        {"validation": _read_file(spec, validation_file)},
        source=f"{train_file}, {validation_file}",
    )


# ----------------------------------------------------------------------------- hub and dispatch


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when HF offline mode is set or the hub does not answer a TCP probe in ``timeout`` s.

    Example:
        >>> import os; os.environ["HF_HUB_OFFLINE"] = "1"; hub_reachable()
        False
    """
    if _truthy("HF_HUB_OFFLINE") or _truthy("HF_DATASETS_OFFLINE"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host or "huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_hub(spec: TaskSpec) -> TaskData:
    import datasets

    if not hub_reachable():
        raise DataError(
            f"task {spec.name}: the Hugging Face hub is not reachable (or HF offline mode is set) "
            "and no local data was given. Point at local files with --glue_dir DIR (the GLUE "
            f"TSV layout, e.g. DIR/{spec.glue_dir_name}/train.tsv and dev.tsv) or "
            "--train_file F --validation_file F (csv/json/jsonl, HF run_glue columns); or use "
            "the embedded offline task --task_name mr."
        )
    dd = datasets.load_dataset("nyu-mll/glue", spec.name)
    keep = [*spec.text_keys, "label"]
    pick = lambda d: d.select_columns(keep).cast(_features(spec))
    return TaskData(
        spec,
        pick(dd["train"]),
        {s: pick(dd[s]) for s in spec.eval_splits},
        source="hub:nyu-mll/glue",
    )


def load_task(
    task: str,
    glue_dir: str | Path | None = None,
    train_file: str | Path | None = None,
    validation_file: str | Path | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> TaskData:
    """Loads and validates a task from wherever it is (see the module docstring for the order).

    Args:
        task: a name in :data:`TASKS`.
        glue_dir: local GLUE directory (TSV layout).
        train_file: csv/json/jsonl training file (needs ``validation_file`` too).
        validation_file: csv/json/jsonl evaluation file.
        max_train_samples: keep only the first N training examples.
        max_eval_samples: keep only the first N examples of each eval split.

    Raises:
        DataError: unknown task, missing/malformed local data, or no data reachable offline.

    Example:
        >>> d = load_task("cola", glue_dir="tests/fixtures/glue", max_train_samples=3)
        >>> d.train.num_rows, d.spec.main_metric
        (3, 'eval_matthews_correlation')
    """
    spec = get_task(task)
    if train_file is not None or validation_file is not None:
        data = load_files(spec.name, train_file, validation_file)
    elif spec.name in ("mr", "mr-reg"):
        from train.data import mr

        ds = mr.load_mr(regression=spec.is_regression)
        data = TaskData(spec, ds["train"], {"validation": ds["validation"]}, source="embedded:mr")
    elif glue_dir is not None:
        data = load_glue_dir(spec.name, glue_dir)
    else:
        data = _load_hub(spec)
    if max_train_samples is not None:
        data.train = data.train.select(range(min(max_train_samples, data.train.num_rows)))
    if max_eval_samples is not None:
        data.eval = {
            k: v.select(range(min(max_eval_samples, v.num_rows))) for k, v in data.eval.items()
        }
    return data


# ----------------------------------------------------------------------------- metrics


def compute_metrics(
    task: str | TaskSpec,
    predictions: np.ndarray,
    labels: np.ndarray,
    split: str | None = None,
    prefix: str = "eval_",
) -> dict[str, float]:
    """The task's official GLUE metrics, named as HF ``run_glue.py`` logs them.

    CoLA: Matthews correlation; STS-B: Pearson and Spearman; MRPC, QQP: accuracy and F1
    (positive class 1); others: accuracy. With more than one metric, ``combined_score`` is
    their mean. The ``validation_mismatched`` split of MNLI gets the suffix ``_mm``.

    Args:
        task: task name or spec.
        predictions: logits ``[n, num_labels]`` or class ids ``[n]``; regression: ``[n]`` or
            ``[n, 1]`` scores.
        labels: ``[n]`` gold labels.
        split: evaluation split name (for the ``_mm`` suffix).
        prefix: prepended to every key.

    Example:
        >>> compute_metrics("mrpc", np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0]))
        {'eval_accuracy': 0.75, 'eval_f1': 0.6666666666666666, 'eval_combined_score': 0.7083333333333333}
    """  # noqa: E501
    from scipy import stats
    from sklearn.metrics import f1_score, matthews_corrcoef

    spec = get_task(task) if isinstance(task, str) else task
    preds = np.asarray(predictions)
    labels = np.asarray(labels)
    if spec.is_regression:
        preds = preds.reshape(len(preds), -1)[:, 0].astype(np.float64)
        labels = labels.astype(np.float64)
    elif preds.ndim == 2:
        preds = preds.argmax(-1)
    if preds.shape != labels.shape:
        raise ValueError(f"predictions {preds.shape} and labels {labels.shape} differ in shape")
    out: dict[str, float] = {}
    for m in spec.metrics:
        if m == "accuracy":
            out[m] = float((preds == labels).mean())
        elif m == "f1":
            out[m] = float(f1_score(labels, preds))
        elif m == "matthews_correlation":
            out[m] = float(matthews_corrcoef(labels, preds))
        elif m == "pearson":
            out[m] = float(stats.pearsonr(preds, labels)[0])
        elif m == "spearmanr":
            out[m] = float(stats.spearmanr(preds, labels)[0])
    if len(out) > 1:
        out["combined_score"] = float(np.mean(list(out.values())))
    suffix = "_mm" if split == "validation_mismatched" else ""
    return {f"{prefix}{k}{suffix}": v for k, v in out.items()}


def label_names(task: str) -> Sequence[str]:
    """Class names in id order (empty for regression).

    Example:
        >>> list(label_names("rte"))
        ['entailment', 'not_entailment']
    """
    return get_task(task).label_names
