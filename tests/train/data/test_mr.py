"""The embedded ``mr`` task: parsing rules and the documented, deterministic split."""

import hashlib

import numpy as np
import pytest

from train.data import assets, mr
from train.glue.data import load_task


@pytest.fixture(scope="module")
def real_file():
    try:
        return assets.review_sentences_dir() / mr.MR_FILE
    except assets.AssetError as e:
        pytest.skip(f"review sentences not cached and not fetchable: {e}")


def test_parsing_drops_zero_ratings_and_duplicates(tmp_path):
    f = tmp_path / "g.txt"
    f.write_text("3\t-0.5\tBad.\r\n1\t2.0\tGood.\r\n2\t0\tMeh.\r\n4\t1.0\tGood.\r\n", "utf-8")
    assert [r.id for r in mr.load_ratings(f)] == [1, 2, 3, 4]
    sentences, labels = mr.load_sentences(f)
    assert sentences == ["Good.", "Bad."] and labels.tolist() == [1, 0]
    f.write_text("1\t2.0\tGood.\nx\t1\tBad id.\n", "utf-8")
    with pytest.raises(ValueError, match=r"g.txt, line 2"):
        mr.load_ratings(f)


def test_split_is_stratified_disjoint_and_seeded():
    ids = np.arange(100, 300)
    labels = (ids % 3 == 0).astype(int)
    tr, dev = mr.split_indices(ids, labels, 0.1, seed=0)
    assert len(np.intersect1d(tr, dev)) == 0 and len(tr) + len(dev) == 200
    assert labels[dev].sum() == round(0.1 * labels.sum())
    tr2, dev2 = mr.split_indices(ids, labels, 0.1, seed=0)
    np.testing.assert_array_equal(dev, dev2)
    assert not np.array_equal(dev, mr.split_indices(ids, labels, 0.1, seed=1)[1])


def test_documented_sizes_balance_and_pinned_split(real_file):
    assert len(mr.load_ratings(real_file)) == 10605
    s, lab = mr.load_sentences(real_file)
    assert (len(s), int(lab.sum())) == (10566, 5241)
    ds = mr.load_mr(path=real_file)
    tr, dev = ds["train"], ds["validation"]
    assert (tr.num_rows, sum(tr["label"])) == (9510, 4717)
    assert (dev.num_rows, sum(dev["label"])) == (1056, 524)
    assert not set(tr["idx"]) & set(dev["idx"])
    # the exact dev membership, pinned: a change here changes every published mr number
    digest = hashlib.sha256(",".join(map(str, sorted(dev["idx"]))).encode()).hexdigest()[:16]
    assert digest == "10c8f901409e35bb"
    # any prefix is mixed (the file lists positives first): --max_*_samples stay balanced
    assert 0.4 < np.mean(tr["label"][:500]) < 0.6 and 0.35 < np.mean(dev["label"][:200]) < 0.65
    reg = mr.load_mr(regression=True, path=real_file)
    assert reg["validation"]["idx"] == dev["idx"]
    assert [int(x > 0) for x in reg["validation"]["label"]] == dev["label"]


def test_mr_through_the_task_loader(real_file, monkeypatch):
    monkeypatch.setenv("SIFT_JAX_CACHE", str(real_file.parents[2]))
    d = load_task("mr", max_eval_samples=10)
    assert d.spec.num_labels == 2 and d.eval["validation"].num_rows == 10
    assert d.train.column_names == ["idx", "sentence", "label"]
