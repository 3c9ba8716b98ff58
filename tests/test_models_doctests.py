"""The ``>>>`` examples in ``train/models`` run (pytest's doctest collection covers only
``sift_jax``)."""

import doctest
import importlib

import pytest

MODULES = [
    "sharding",
    "layers",
    "encoder",
    "decoder",
    "functional",
    "generate",
    "registry",
    "pretrained",
    "hf",
    "weights.mapping",
    "weights.hf_dir",
    "weights.gguf_file",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, monkeypatch):
    monkeypatch.chdir(__file__.rsplit("/tests/", 1)[0])  # examples use repo-relative paths
    mod = importlib.import_module(f"train.models.{name}")
    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.failed == 0
