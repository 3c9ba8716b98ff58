"""Tokenization to fixed-length numpy arrays and deterministic, resumable batch iterators.

Shapes are static for ``jax.jit``: every example is padded (and truncated) to
``max_seq_length``; optionally a batch is cut back to the smallest of a few ``buckets`` lengths
that holds its longest example (one compilation per bucket, far less padding for short texts).

Batches are dicts of numpy arrays: ``input_ids``, ``attention_mask``, ``token_type_ids``
(int32, ``[batch, length]``), ``labels`` (int32, or float32 for regression) and
``example_mask`` (int32, 1 for a real example, 0 for padding rows).

Training order: epoch ``e`` visits ``np.random.default_rng([seed, e]).permutation(n)`` in
consecutive batches; the **last partial batch is dropped** (``n // batch_size`` steps an epoch,
as :func:`train.core.fit.plan_steps` assumes). Batch ``b`` of epoch ``e`` depends only on
``(seed, e, b)``, so a run resumed at ``(epoch, step_in_epoch)`` sees exactly the batches it would
have seen. Evaluation visits every example once in order; the last batch is padded with copies of
row 0 whose ``example_mask`` is 0.

Multi-process: the trainers give every process the same global batch and
:func:`train.core.mesh.put_batch` puts onto each process's devices exactly the rows they hold
on the mesh. ``process_index`` / ``process_count`` are for callers that feed their own
contiguous slice (rows ``[i * B / P, (i + 1) * B / P)`` for process ``i`` of ``P``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Encoded",
    "encode",
    "encode_task",
    "eval_batches",
    "load_tokenizer",
    "steps_per_epoch",
    "train_batches",
    "trainer_fns",
]

Batch = dict[str, np.ndarray]


@dataclass
class Encoded:
    """A tokenized split: ``[n, max_seq_length]`` int32 arrays plus ``[n]`` labels."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, idx: np.ndarray) -> Batch:
        """The examples at ``idx`` as a batch (``example_mask`` all ones)."""
        return {
            "input_ids": self.input_ids[idx],
            "attention_mask": self.attention_mask[idx],
            "token_type_ids": self.token_type_ids[idx],
            "labels": self.labels[idx],
            "example_mask": np.ones(len(idx), np.int32),
        }


def load_tokenizer(path: str | Path):
    """A fast HF tokenizer from a local model directory (no network).

    Example:
        >>> from train.data.assets import minilm_dir
        >>> tok = load_tokenizer(minilm_dir())
        >>> tok("a gem")["input_ids"]
        [101, 1037, 17070, 102]
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), use_fast=True)


def encode(
    dataset: Any,
    tokenizer: Any,
    text_keys: Sequence[str],
    max_seq_length: int,
    regression: bool = False,
) -> Encoded:
    """Tokenizes one or two text columns to ``max_seq_length`` (truncating, padding right).

    Args:
        dataset: a ``datasets.Dataset`` or a dict of columns, with ``text_keys`` and ``label``.
        tokenizer: an HF tokenizer (callable on lists of texts / text pairs).
        text_keys: one or two column names.
        max_seq_length: every row is truncated/padded to this length.
        regression: float32 labels instead of int32.

    Example:
        >>> from train.data.assets import minilm_dir
        >>> enc = encode({"sentence": ["a gem", "dull"], "label": [1, 0]},
        ...              load_tokenizer(minilm_dir()), ["sentence"], 8)
        >>> enc.input_ids.shape, enc.input_ids.dtype, enc.attention_mask[0].tolist()
        ((2, 8), dtype('int32'), [1, 1, 1, 1, 0, 0, 0, 0])
    """
    texts = [list(dataset[k]) for k in text_keys]
    out = tokenizer(
        *texts,
        truncation=True,
        max_length=max_seq_length,
        padding="max_length",
        return_attention_mask=True,
        return_token_type_ids=True,
    )
    ids = np.asarray(out["input_ids"], np.int32).reshape(len(texts[0]), max_seq_length)
    mask = np.asarray(out["attention_mask"], np.int32).reshape(ids.shape)
    tt = out.get("token_type_ids")
    tt = np.zeros_like(ids) if tt is None else np.asarray(tt, np.int32).reshape(ids.shape)
    labels = np.asarray(dataset["label"], np.float32 if regression else np.int32)
    return Encoded(ids, mask, tt, labels)


def encode_task(data: Any, tokenizer: Any, max_seq_length: int) -> tuple[Encoded, dict]:
    """Encodes a :class:`train.glue.data.TaskData`: ``(train, {eval split: Encoded})``.

    Example:
        >>> from train.data.assets import minilm_dir
        >>> from train.glue.data import load_task
        >>> tr, ev = encode_task(load_task("rte", glue_dir="tests/fixtures/glue"),
        ...                      load_tokenizer(minilm_dir()), 32)
        >>> len(tr), {k: len(v) for k, v in ev.items()}
        (4, {'validation': 2})
    """
    spec = data.spec
    enc = lambda d: encode(d, tokenizer, spec.text_keys, max_seq_length, spec.is_regression)
    return enc(data.train), {k: enc(v) for k, v in data.eval.items()}


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full training batches per epoch (the last partial batch is dropped).

    Example:
        >>> steps_per_epoch(10, 4)
        2
    """
    return num_examples // batch_size


def _finish(batch: Batch, buckets: Sequence[int] | None, pi: int, pc: int) -> Batch:
    if buckets:
        length = batch["input_ids"].shape[1]
        need = int(batch["attention_mask"].sum(1).max(initial=1))
        cut = min([b for b in buckets if b >= need] + [length])
        batch = {k: (v[:, :cut] if v.ndim == 2 else v) for k, v in batch.items()}
    if pc > 1:
        per = len(batch["labels"]) // pc
        batch = {k: v[pi * per : (pi + 1) * per] for k, v in batch.items()}
    return batch


def _check_hosts(batch_size: int, pi: int, pc: int) -> None:
    if not 0 <= pi < pc:
        raise ValueError(f"process_index {pi} is not in [0, {pc})")
    if batch_size % pc:
        raise ValueError(f"batch size {batch_size} is not divisible by process_count {pc}")


def train_batches(
    data: Encoded,
    batch_size: int,
    epoch: int,
    start: int = 0,
    *,
    seed: int,
    buckets: Sequence[int] | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
    """The batches of one training epoch, from batch number ``start`` on.

    Args:
        data: the encoded training split.
        batch_size: global batch size (all processes together).
        epoch: epoch number (selects the permutation).
        start: first batch to yield (the step within the epoch to resume from).
        seed: data-order seed.
        buckets: optional lengths to cut batches back to (see the module docstring).
        process_index: this process (multi-host).
        process_count: number of processes; each gets ``batch_size // process_count`` rows.

    Example:
        >>> enc = Encoded(*(np.zeros((10, 4), np.int32),) * 3, np.arange(10, dtype=np.int32))
        >>> [b["labels"].tolist() for b in train_batches(enc, 4, epoch=0, seed=0)]
        [[4, 6, 2, 7], [3, 5, 9, 0]]
        >>> [b["labels"].tolist() for b in train_batches(enc, 4, epoch=0, start=1, seed=0)]
        [[3, 5, 9, 0]]
    """
    _check_hosts(batch_size, process_index, process_count)
    order = np.random.default_rng([seed, epoch]).permutation(len(data))
    for b in range(start, steps_per_epoch(len(data), batch_size)):
        batch = data.rows(order[b * batch_size : (b + 1) * batch_size])
        yield _finish(batch, buckets, process_index, process_count)


def eval_batches(
    data: Encoded,
    batch_size: int,
    *,
    buckets: Sequence[int] | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
    """Every example once, in order, in full-size batches; padding rows have ``example_mask`` 0.

    Example:
        >>> enc = Encoded(*(np.zeros((5, 4), np.int32),) * 3, np.arange(5, dtype=np.int32))
        >>> [(b["labels"].tolist(), b["example_mask"].tolist()) for b in eval_batches(enc, 3)]
        [([0, 1, 2], [1, 1, 1]), ([3, 4, 0], [1, 1, 0])]
    """
    _check_hosts(batch_size, process_index, process_count)
    n = len(data)
    for s in range(0, n, batch_size):
        idx = np.arange(s, min(s + batch_size, n))
        pad = batch_size - len(idx)
        batch = data.rows(np.concatenate([idx, np.zeros(pad, np.int64)]))
        batch["example_mask"][len(idx) :] = 0
        yield _finish(batch, buckets, process_index, process_count)


def trainer_fns(
    train: Encoded,
    evals: dict[str, Encoded],
    seed: int,
    buckets: Sequence[int] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The callables :class:`train.core.task.Task` takes: ``train_batches`` and ``eval_sets``.

    ``train_batches(epoch, start, batch_size)`` and ``eval_sets[name](batch_size)`` yield global
    batches (the trainer slices them per host).

    Example:
        >>> enc = Encoded(*(np.zeros((10, 4), np.int32),) * 3, np.arange(10, dtype=np.int32))
        >>> tb, ev = trainer_fns(enc, {"validation": enc}, seed=0)
        >>> len(list(tb(0, 1, 4))), len(list(ev["validation"](4)))
        (1, 3)
    """

    def train_fn(epoch: int, start: int, batch_size: int) -> Iterator[Batch]:
        return train_batches(train, batch_size, epoch, start, seed=seed, buckets=buckets)

    def eval_fn(data: Encoded):
        return lambda batch_size: eval_batches(data, batch_size, buckets=buckets)

    return train_fn, {name: eval_fn(d) for name, d in evals.items()}
