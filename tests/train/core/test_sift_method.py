"""The trainer's SIFT method beyond the paper's recipe: a shared budget (--sift_budget global
or mass) trains the same number of entries chosen across tensors, and resumes exactly."""

import numpy as np
import pytest

from tests.train.core.toy import _run_until, cfg_for, toy_params, toy_task
from train.core.fit import fit


@pytest.mark.parametrize("budget", ["global", "mass"])
def test_shared_budget_trains_the_same_count_and_resumes_exactly(tmp_path, budget):
    per = fit(cfg_for(tmp_path / "p"), toy_task(), toy_params())
    glob = fit(cfg_for(tmp_path / "g", sift_budget=budget), toy_task(), toy_params())
    assert glob.metrics["trainable_params"] == per.metrics["trainable_params"]
    sizes_per = {p: s.size for p, s in per.method.plan.sparse_scopes.items()}
    sizes_glob = {p: s.size for p, s in glob.method.plan.sparse_scopes.items()}
    assert sum(sizes_glob.values()) == sum(sizes_per.values()) and sizes_glob != sizes_per
    assert glob.losses[-1] < glob.losses[0]
    # killed after its step-5 checkpoint (the plan was resized at step 0), resumed: the same run
    kw = dict(sift_budget=budget, save_steps=5)
    _run_until(cfg_for(tmp_path / "k", **kw), 5)
    resumed = fit(
        cfg_for(tmp_path / "k", resume_from_checkpoint="latest", **kw), toy_task(), toy_params()
    )
    np.testing.assert_allclose(resumed.losses, glob.losses[5:], rtol=1e-6)
    idx_a = resumed.method.plan.global_indices(resumed.state.buffers)
    idx_b = glob.method.plan.global_indices(glob.state.buffers)
    assert idx_a.keys() == idx_b.keys()
    for p in idx_a:
        np.testing.assert_array_equal(idx_a[p], idx_b[p])
