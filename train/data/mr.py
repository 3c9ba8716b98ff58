"""The embedded default task ``mr``: movie-review sentence sentiment, no download from the hub.

Data: the 10,605 Rotten-Tomatoes review sentences (Pang & Lee) that Hutto & Gilbert (VADER,
ICWSM 2014) had rated by humans, each with the mean rating on [-4, 4]. They ship in the
``vaderSentiment==3.3.2`` source distribution (see :func:`train.data.assets.review_sentences_dir`).

Preparation, fixed and documented so that every machine gets the same examples:

* sentences with a mean rating of exactly 0 (37) carry no sign and are **dropped**;
* exact duplicate sentences (2) keep only their first id, so none straddles the split;
* ``mr``: label 1 if the rating is positive, 0 if negative (names ``negative``, ``positive``);
  ``mr-reg``: the same sentences with the rating itself as a float label;
* split: stratified by label, 10% of each class to ``validation``. Within a class, sentences are
  ranked by ``sha256(f"{seed}:{id}")`` and the first ``round(0.1 * n_class)`` go to validation.
  A hash rather than a random generator, so the split cannot drift with numpy versions.

With the defaults (seed 0): 10,566 sentences (5,241 positive, 5,325 negative); train 9,510
(4,717 positive, 4,793 negative: 49.6% positive), validation 1,056 (524 positive, 532 negative:
49.6% positive; ``round`` halves to even). Both splits are sorted by id;
the trainer shuffles.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from train.data import assets

__all__ = [
    "MR_FILE",
    "MR_SPLIT_SEED",
    "Review",
    "load_mr",
    "load_ratings",
    "load_sentences",
    "split_indices",
]

MR_FILE = "movieReviewSnippets_GroundTruth.txt"
MR_SPLIT_SEED = 0
MR_DEV_FRACTION = 0.1


@dataclass(frozen=True)
class Review:
    """One rated sentence: file ``id``, mean human ``rating`` in [-4, 4], ``sentence``."""

    id: int
    rating: float
    sentence: str


def load_ratings(path: str | Path | None = None) -> list[Review]:
    """All rated sentences of a VADER ground-truth file, sorted by id, nothing dropped.

    Args:
        path: a ``*_GroundTruth.txt`` file (``id<TAB>rating<TAB>sentence`` lines); default: the
            movie-review file of :func:`train.data.assets.review_sentences_dir`.

    Raises:
        ValueError: a malformed line (the file and line number are named).

    Example:
        >>> reviews = load_ratings()  # doctest: +SKIP
        >>> len(reviews), reviews[2]  # doctest: +SKIP
        (10605, Review(id=3, rating=-0.6, sentence='Effective but too tepid biopic'))
    """
    path = Path(path) if path is not None else assets.review_sentences_dir() / MR_FILE
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t", 2)
            try:
                if len(parts) != 3 or not parts[2].strip():
                    raise ValueError("expected id<TAB>rating<TAB>sentence")
                out.append(Review(int(parts[0]), float(parts[1]), parts[2].strip()))
            except ValueError as e:
                raise ValueError(f"{path}, line {lineno}: {e}: {line[:80]!r}") from None
    out.sort(key=lambda r: r.id)
    return out


def _usable(reviews: list[Review]) -> list[Review]:
    """Drops rating-0 sentences and later duplicates (see the module docstring)."""
    seen: set[str] = set()
    kept = []
    for r in reviews:
        if r.rating == 0 or r.sentence in seen:
            continue
        seen.add(r.sentence)
        kept.append(r)
    return kept


def load_sentences(path: str | Path | None = None) -> tuple[list[str], np.ndarray]:
    """Every usable sentence (sorted by id) and its 0/1 sentiment label, unsplit.

    Example:
        >>> sentences, labels = load_sentences()  # doctest: +SKIP
        >>> len(sentences), int(labels.sum())  # doctest: +SKIP
        (10566, 5241)
    """
    reviews = _usable(load_ratings(path))
    return [r.sentence for r in reviews], np.array([int(r.rating > 0) for r in reviews], np.int64)


def split_indices(
    ids: np.ndarray, labels: np.ndarray, dev_fraction: float = MR_DEV_FRACTION, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, hash-ranked train/dev split (positions into ``ids``, each in a hashed order).

    Args:
        ids: unique integer ids of the examples.
        labels: the class of each example (the split is stratified by it).
        dev_fraction: share of each class that goes to dev (rounded per class).
        seed: salt of the hash; another seed gives another split.

    Example:
        >>> tr, dev = split_indices(np.arange(20), np.array([0, 1] * 10))
        >>> len(tr), len(dev), sorted(set(tr) | set(dev)) == list(range(20))
        (18, 2, True)
        >>> bool((np.diff(tr) > 0).all())  # not sorted: a prefix mixes the classes
        False
    """
    ids = np.asarray(ids)
    labels = np.asarray(labels)
    dev = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        keys = [hashlib.sha256(f"{seed}:{int(ids[i])}".encode()).hexdigest() for i in members]
        ranked = members[np.argsort(np.array(keys), kind="stable")]
        dev.extend(ranked[: int(round(dev_fraction * len(members)))].tolist())
    dev_idx = np.sort(np.array(dev, dtype=np.int64))
    train_idx = np.setdiff1d(np.arange(len(ids)), dev_idx)

    # The file lists all positive sentences first: order each split by a second hash so that
    # any prefix (--max_train_samples / --max_eval_samples) has both classes.
    def shuffled(idx: np.ndarray) -> np.ndarray:
        keys = [hashlib.sha256(f"order:{seed}:{int(ids[i])}".encode()).hexdigest() for i in idx]
        return idx[np.argsort(np.array(keys), kind="stable")]

    return shuffled(train_idx), shuffled(dev_idx)


def load_mr(
    regression: bool = False,
    seed: int = MR_SPLIT_SEED,
    dev_fraction: float = MR_DEV_FRACTION,
    path: str | Path | None = None,
):
    """The ``mr`` (or, with ``regression``, ``mr-reg``) task as HF datasets.

    Args:
        regression: labels are the float ratings instead of 0/1.
        seed: split seed (keep the default to compare with published numbers).
        dev_fraction: share of each class held out as ``validation``.
        path: a ground-truth file to use instead of the embedded one.

    Returns:
        ``{"train": Dataset, "validation": Dataset}`` with columns ``idx`` (the file's id),
        ``sentence``, ``label`` (int64, or float32 for regression).

    Example:
        >>> ds = load_mr()  # doctest: +SKIP
        >>> ds["train"].num_rows, ds["validation"].num_rows  # doctest: +SKIP
        (9510, 1056)
    """
    import datasets

    reviews = _usable(load_ratings(path))
    ids = np.array([r.id for r in reviews], np.int64)
    signs = np.array([int(r.rating > 0) for r in reviews], np.int64)
    train_idx, dev_idx = split_indices(ids, signs, dev_fraction, seed)
    if regression:
        features = datasets.Features(
            idx=datasets.Value("int64"),
            sentence=datasets.Value("string"),
            label=datasets.Value("float32"),
        )
    else:
        features = datasets.Features(
            idx=datasets.Value("int64"),
            sentence=datasets.Value("string"),
            label=datasets.ClassLabel(names=["negative", "positive"]),
        )

    def build(idx: np.ndarray):
        rows = [reviews[i] for i in idx]
        return datasets.Dataset.from_dict(
            {
                "idx": [r.id for r in rows],
                "sentence": [r.sentence for r in rows],
                "label": [r.rating for r in rows] if regression else [int(signs[i]) for i in idx],
            },
            features=features,
        )

    return {"train": build(train_idx), "validation": build(dev_idx)}
