"""Tokenization and the deterministic, resumable, host-sliced batch iterators."""

import numpy as np
import pytest

from train.data.assets import minilm_dir
from train.glue import batching
from train.glue.batching import Encoded
from train.glue.data import load_task


@pytest.fixture(scope="module")
def tok():
    return batching.load_tokenizer(minilm_dir())


def _toy(n: int, length: int = 6) -> Encoded:
    lens = (np.arange(n) % length) + 1
    mask = (np.arange(length)[None] < lens[:, None]).astype(np.int32)
    ids = (np.arange(n)[:, None] * 10 + np.arange(length)[None]).astype(np.int32) * mask
    return Encoded(ids, mask, np.zeros_like(ids), np.arange(n, dtype=np.int32))


def test_encode_pairs_static_shape_dtypes_and_segments(tok):
    data = load_task("rte", glue_dir="tests/fixtures/glue")
    tr, ev = batching.encode_task(data, tok, 16)
    assert tr.input_ids.shape == (4, 16) and tr.input_ids.dtype == np.int32
    assert tr.labels.dtype == np.int32 and tr.labels.tolist() == [1, 0, 0, 1]
    # sentence pairs: segment 1 present, [CLS] first, truncated rows end in [SEP]
    assert tr.token_type_ids.max() == 1 and (tr.input_ids[:, 0] == tok.cls_token_id).all()
    assert (tr.attention_mask.sum(1) == 16).any()
    assert set(ev) == {"validation"}


def test_encode_regression_labels_are_float32(tok):
    tr, _ = batching.encode_task(load_task("stsb", glue_dir="tests/fixtures/glue"), tok, 32)
    assert tr.labels.dtype == np.float32
    np.testing.assert_allclose(tr.labels, [5.0, 3.8, 3.8], rtol=1e-6)


def test_resume_mid_epoch_gives_exactly_the_remaining_batches():
    enc = _toy(23)
    full = list(batching.train_batches(enc, 4, epoch=3, seed=7))
    assert len(full) == batching.steps_per_epoch(23, 4) == 5  # last partial batch dropped
    for k in range(6):
        resumed = list(batching.train_batches(enc, 4, epoch=3, start=k, seed=7))
        assert len(resumed) == len(full) - k
        for a, b in zip(full[k:], resumed, strict=True):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])


def test_epochs_are_distinct_seeded_permutations():
    enc = _toy(20)
    order = lambda e, s: np.concatenate(
        [b["labels"] for b in batching.train_batches(enc, 5, epoch=e, seed=s)]
    )
    assert sorted(order(0, 1).tolist()) == list(range(20))  # no repeats, nothing lost
    np.testing.assert_array_equal(order(0, 1), order(0, 1))
    assert not np.array_equal(order(0, 1), order(1, 1))
    assert not np.array_equal(order(0, 1), order(0, 2))


def test_host_slices_partition_the_global_batch():
    enc = _toy(16)
    glob = list(batching.train_batches(enc, 8, epoch=0, seed=0))
    parts = [
        list(batching.train_batches(enc, 8, epoch=0, seed=0, process_index=i, process_count=4))
        for i in range(4)
    ]
    for b, g in enumerate(glob):
        np.testing.assert_array_equal(
            np.concatenate([parts[i][b]["input_ids"] for i in range(4)]), g["input_ids"]
        )
    with pytest.raises(ValueError, match="not divisible by process_count 3"):
        next(batching.train_batches(enc, 8, epoch=0, seed=0, process_index=0, process_count=3))


def test_eval_counts_every_example_exactly_once():
    enc = _toy(11)
    batches = list(batching.eval_batches(enc, 4))
    assert all(b["labels"].shape == (4,) for b in batches)  # static shapes
    kept = np.concatenate([b["labels"][b["example_mask"] == 1] for b in batches])
    assert kept.tolist() == list(range(11))
    per_host = [
        list(batching.eval_batches(enc, 4, process_index=i, process_count=2)) for i in (0, 1)
    ]
    masks = sum(int(b["example_mask"].sum()) for h in per_host for b in h)
    assert masks == 11


def test_buckets_cut_batches_to_the_smallest_fitting_length():
    enc = _toy(12, length=6)  # lengths 1..6 repeating
    for b in batching.eval_batches(enc, 3, buckets=(2, 4)):
        need = b["attention_mask"].sum(1).max()
        assert b["input_ids"].shape[1] == min([x for x in (2, 4, 6) if x >= need])
        assert b["attention_mask"].sum(1).max() == need  # nothing real cut off
