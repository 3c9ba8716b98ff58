"""--adam_mu_dtype bfloat16 (issue 15's optimizer-state lever): AdamW's first moment is stored
in bf16 for every trainable leaf (SIFT's k-vectors and the dense head), the second moment
stays fp32, the run trains like the fp32 one and resumes exactly."""

import jax
import jax.numpy as jnp
import numpy as np

from tests.train.core.toy import _run_until, cfg_for, toy_params, toy_task
from train.core.fit import fit


def _moments(opt_state, name):
    found = []

    def visit(x):
        if hasattr(x, name) and hasattr(x, "count"):
            found.extend(jax.tree.leaves(getattr(x, name)))
        return x

    jax.tree.map(visit, opt_state, is_leaf=lambda x: hasattr(x, "mu"))
    return found


def test_bf16_first_moment_trains_like_fp32_and_resumes_exactly(tmp_path):
    f32 = fit(cfg_for(tmp_path / "a"), toy_task(), toy_params())
    bf16 = fit(cfg_for(tmp_path / "b", adam_mu_dtype="bfloat16"), toy_task(), toy_params())
    mu, nu = _moments(bf16.state.opt_state, "mu"), _moments(bf16.state.opt_state, "nu")
    assert mu and all(x.dtype == jnp.bfloat16 for x in mu)
    assert all(x.dtype == jnp.float32 for x in nu)
    assert [x.shape for x in mu] == [x.shape for x in _moments(f32.state.opt_state, "mu")]
    assert all(x.dtype == jnp.float32 for x in _moments(f32.state.opt_state, "mu"))
    assert bf16.losses[0] == f32.losses[0] and bf16.losses != f32.losses  # the moment differs
    np.testing.assert_allclose(bf16.losses, f32.losses, rtol=0.05, atol=0.02)
    assert bf16.losses[-1] < bf16.losses[0]
    kw = dict(adam_mu_dtype="bfloat16", save_steps=3)
    _run_until(cfg_for(tmp_path / "k", **kw), 3)
    resumed = fit(
        cfg_for(tmp_path / "k", resume_from_checkpoint="latest", **kw), toy_task(), toy_params()
    )
    np.testing.assert_array_equal(resumed.losses, bf16.losses[3:])
