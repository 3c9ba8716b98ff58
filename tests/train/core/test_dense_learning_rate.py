"""--dense_learning_rate: the densely trained tensors beside SIFT's increments or LoRA's
adapters (the head) get their own peak rate; a run without such tensors refuses the flag."""

import numpy as np
import pytest

from tests.train.core.toy import cfg_for, toy_params, toy_task
from train.core.fit import fit


def _moved(res, path):
    a = res.params
    b = toy_params()
    for key in path:
        a, b = a[key], b[key]
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.mark.parametrize("method", ["sift", "lora"])
def test_the_head_trains_at_its_own_rate(tmp_path, method):
    base = fit(cfg_for(tmp_path / "a", finetuning_type=method), toy_task(), toy_params())
    slow = fit(
        cfg_for(tmp_path / "b", finetuning_type=method, dense_learning_rate=3e-8),
        toy_task(),
        toy_params(),
    )
    query = ("encoder", "layers", "0", "attention", "query", "kernel")
    # the head (--sparse_exception / --lora_exception: classifier) at 1e-6 of the rate: it
    # stays where it was (AdamW steps are about the rate), the targeted tensor still trains
    assert _moved(base, ("classifier", "kernel")) > 1e-2
    assert _moved(slow, ("classifier", "kernel")) < 1e-6
    assert _moved(slow, query) > 1e-2
    assert slow.losses[0] == pytest.approx(base.losses[0]) and slow.losses != base.losses


def test_a_run_without_dense_tensors_refuses_the_flag(tmp_path):
    with pytest.raises(ValueError, match="Drop --dense_learning_rate"):
        fit(cfg_for(tmp_path / "f", finetuning_type="full", dense_learning_rate=1e-3),
            toy_task(), toy_params())  # fmt: skip
    with pytest.raises(ValueError, match="no tensor is trained densely"):
        fit(cfg_for(tmp_path / "s", sparse_exception=[], dense_learning_rate=1e-3),
            toy_task(), toy_params())  # fmt: skip
