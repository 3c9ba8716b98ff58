"""The encoder classifier as the GLUE trainer used it; now a thin layer over
:mod:`train.models.pretrained` (kept for callers of the old names).

``load_classifier`` = ``load_pretrained(..., head="classifier", tokenizer="required")``; the
bundle is a :class:`~train.models.pretrained.Pretrained` (``apply_fn``, ``place``,
``export``, ``description``, ...).
"""

from __future__ import annotations

from pathlib import Path

from train.models.encoder import ClassifierApply, classifier_apply_fn
from train.models.pretrained import EMBEDDED, Pretrained, load_pretrained, resolve_source

EncoderBundle = Pretrained
resolve_model = resolve_source

__all__ = [
    "EMBEDDED",
    "ClassifierApply",
    "EncoderBundle",
    "classifier_apply_fn",
    "load_classifier",
    "resolve_model",
    "save_classifier",
]


def load_classifier(
    name_or_path: str,
    *,
    num_labels: int,
    dtype: str = "float32",
    remat: bool = False,
    id2label: dict[str, str] | None = None,
    seed: int = 0,
) -> Pretrained:
    """A BERT/RoBERTa sequence classifier (fresh head when the checkpoint has none, or one for
    another label count); the checkpoint must have a tokenizer.

    Example:
        >>> b = load_classifier("embedded:minilm", num_labels=2)  # doctest: +SKIP
        >>> b.apply_fn(b.params, batch, None, False).shape  # doctest: +SKIP
        (8, 2)
    """
    return load_pretrained(
        name_or_path,
        head="classifier",
        num_labels=num_labels,
        dtype=dtype,
        remat=remat,
        id2label=id2label,
        seed=seed,
        tokenizer="required",
    )


def save_classifier(bundle: Pretrained, params: dict, out_dir: str | Path) -> Path:
    """``bundle.export(params, out_dir)``: the merged ``*ForSequenceClassification`` HF dir."""
    return bundle.export(params, out_dir)
