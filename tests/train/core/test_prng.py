"""The dropout PRNG (train.core.prng): fast masks with the statistics dropout needs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.core import prng


def test_hash32_masks_keep_the_right_share_and_differ_by_key_and_position():
    k = prng.key(0)
    keys = [jax.random.fold_in(k, i) for i in range(4)]
    masks = [np.asarray(jax.random.bernoulli(kk, 0.9, (200_000,))) for kk in keys]
    for m in masks:
        assert abs(m.mean() - 0.9) < 0.003
    # independent streams: two keys agree where independent masks would (0.9^2 + 0.1^2)
    agree = (masks[0] == masks[1]).mean()
    assert abs(agree - 0.82) < 0.005
    # no short-range structure within a stream
    u = np.asarray(jax.random.uniform(keys[2], (100_000,)))
    for lag in (1, 2, 32, 384):
        assert abs(np.corrcoef(u[:-lag], u[lag:])[0, 1]) < 0.02
    # split / fold_in are threefry's: the same key data as threefry's
    t = jax.random.key(0)
    np.testing.assert_array_equal(
        jax.random.key_data(jax.random.fold_in(k, 5)), jax.random.key_data(jax.random.fold_in(t, 5))
    )


def test_keys_round_trip_through_their_raw_data_and_bad_names_are_refused():
    k = jax.random.fold_in(prng.key(3), 7)
    data = jax.random.key_data(k)
    again = prng.wrap(data)
    np.testing.assert_array_equal(jax.random.uniform(k, (5,)), jax.random.uniform(again, (5,)))
    assert jax.random.uniform(prng.key(3, "threefry"), (3,)).dtype == jnp.float32
    with pytest.raises(ValueError, match="Unknown PRNG"):
        prng.key(0, "mt19937")
