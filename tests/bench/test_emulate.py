"""The study-only emulation of the original code's quirks (bench/emulate.py)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench.emulate import EmulateGlueConfig
from tests.train.core.toy import cfg_for, toy_params, toy_task
from train.core import methods
from train.core.fit import fit


def emu_cfg(tmp_path, quirks, **kw):
    base = vars(cfg_for(tmp_path, **kw))
    return EmulateGlueConfig(**{**base, "finetuning_type": "sift_emulated", "sift_emulate": quirks})


def test_emulating_the_original_codes_quirks(tmp_path):
    ours = fit(cfg_for(tmp_path / "o"), toy_task(), toy_params())
    lag = fit(emu_cfg(tmp_path / "l", ["lagged"]), toy_task(), toy_params())
    # Step 1 sees the same params (no sparse update yet either way); step 2 does not.
    np.testing.assert_allclose(lag.losses[:2], ours.losses[:2], rtol=1e-6)
    assert abs(lag.losses[2] - ours.losses[2]) > 1e-6
    # No update at all from the selection batch: the dense classifier waits too.
    head0 = toy_params()["classifier"]["kernel"]
    one = cfg_for(tmp_path / "n1", max_steps=1)
    assert not np.array_equal(
        fit(one, toy_task(), toy_params()).params["classifier"]["kernel"], head0
    )
    frozen_sel = emu_cfg(tmp_path / "n2", ["no_selection_update"], max_steps=1)
    np.testing.assert_array_equal(
        fit(frozen_sel, toy_task(), toy_params()).params["classifier"]["kernel"], head0
    )


def test_no_sparse_decay_leaves_the_selected_weights_undecayed():
    def decay_update(quirks):
        cfg = emu_cfg(Path("unused"), quirks, weight_decay=0.5)
        m = methods.build(toy_params(), cfg, optax.constant_schedule(0.1), jax.random.key(0))
        zeros = jax.tree.map(jnp.zeros_like, m.trainable)
        params = jax.tree.map(jnp.ones_like, m.trainable)
        u, _ = m.optimizer.update(zeros, m.optimizer.init(m.trainable), params)
        return u

    ours, orig = decay_update([]), decay_update(["no_sparse_decay"])
    q = lambda t: t["encoder"]["layers"]["0"]["attention"]["query"]["kernel"]  # noqa: E731
    assert float(jnp.abs(q(ours)).max()) > 0  # AdamW decays the selected weights
    assert float(jnp.abs(q(orig)).max()) == 0
    np.testing.assert_array_equal(ours["classifier"]["kernel"], orig["classifier"]["kernel"])
