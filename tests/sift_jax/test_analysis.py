"""Gradient quasi-sparsity: hand-computed values, brute-force agreement, expected orderings."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from sift_jax.analysis import gradient_sparsity, gradient_sparsity_by_group, top_count


def brute_force(arrays, fraction):
    a = np.concatenate([np.abs(np.asarray(x, np.float64)).ravel() for x in arrays])
    k = max(1, int(fraction * a.size))
    top = np.sort(a)[::-1][:k]
    share = float(np.sum(top**2) / np.sum(a**2))
    return k, share


def test_hand_computed_values():
    r = gradient_sparsity({"w": jnp.array([3.0, 4.0, 0.0, 0.0])}, fractions=(0.25, 0.5, 1.0))
    assert r["overall"][0.25] == {"k": 1, "norm_ratio": 0.8, "energy_share": 0.64}
    assert r["overall"][0.5] == {"k": 2, "norm_ratio": 1.0, "energy_share": 1.0}
    assert r["per_leaf"]["w"] == r["overall"]
    assert r["sizes"] == {"w": 4} and r["sq_norms"]["w"] == pytest.approx(25.0)


def test_overall_is_one_global_top_not_per_leaf():
    g = {"a": jnp.array([3.0, 4.0, 0.0, 0.0]), "b": jnp.array([1.0, 1.0, 1.0, 1.0])}
    r = gradient_sparsity(g, fractions=(0.25,))
    # 8 entries → k = 2, the global top two are 4 and 3 (both in "a").
    assert r["overall"][0.25]["k"] == 2
    assert r["overall"][0.25]["energy_share"] == pytest.approx(25 / 29)
    assert r["overall"][0.25]["norm_ratio"] == pytest.approx(math.sqrt(25 / 29))
    assert r["per_leaf"]["b"][0.25]["energy_share"] == pytest.approx(1 / 4)


def test_ties_at_the_threshold_count_exactly_k_entries():
    r = gradient_sparsity({"w": jnp.full((10,), -2.0)}, fractions=(0.3,))
    assert r["overall"][0.3]["k"] == 3
    assert r["overall"][0.3]["energy_share"] == pytest.approx(0.3)


def test_agrees_with_sorting_on_a_mixed_tree():
    rng = np.random.default_rng(0)
    g = {
        "enc": [
            {"q": jnp.asarray(rng.standard_t(2, (64, 48)), jnp.float32)},
            {"q": jnp.asarray(rng.normal(size=(48, 64)), jnp.bfloat16)},
        ],
        "tiny": jnp.asarray(rng.normal(size=1000) * 1e-30, jnp.float32),  # squares underflow f32
        "bias": np.asarray(rng.normal(size=7)),
        "skip": None,
    }
    fractions = (0.001, 0.01, 0.05, 0.5)
    r = gradient_sparsity(g, fractions)
    leaves = {
        "enc/0/q": g["enc"][0]["q"],
        "enc/1/q": g["enc"][1]["q"],
        "tiny": g["tiny"],
        "bias": g["bias"],
    }
    assert set(r["per_leaf"]) == set(leaves)
    for f in fractions:
        k, share = brute_force(list(leaves.values()), f)
        assert r["overall"][f]["k"] == k
        assert r["overall"][f]["energy_share"] == pytest.approx(share, rel=1e-5)
        for path, x in leaves.items():
            k, share = brute_force([x], f)
            assert r["per_leaf"][path][f]["k"] == k
            assert r["per_leaf"][path][f]["energy_share"] == pytest.approx(share, rel=1e-5)
            assert r["per_leaf"][path][f]["norm_ratio"] == pytest.approx(math.sqrt(share), 1e-5)
    assert r["per_leaf"]["tiny"][0.5]["energy_share"] > 0.5  # not destroyed by underflow


def test_heavy_tailed_gradient_is_more_concentrated_than_gaussian():
    rng = np.random.default_rng(1)
    n = 20000
    gaussian = rng.normal(size=n)
    sparse_ish = rng.normal(size=n) * 0.01
    sparse_ish[rng.choice(n, n // 100, replace=False)] = rng.normal(size=n // 100) * 5.0
    r = gradient_sparsity({"dense": gaussian, "sparse": sparse_ish}, fractions=(0.01, 0.05))
    for f in (0.01, 0.05):
        g_share = r["per_leaf"]["dense"][f]["energy_share"]
        s_share = r["per_leaf"]["sparse"][f]["energy_share"]
        assert s_share > 0.9 > 0.3 > g_share
    # Shares grow with the fraction.
    assert r["per_leaf"]["dense"][0.01]["norm_ratio"] < r["per_leaf"]["dense"][0.05]["norm_ratio"]


def test_zero_gradient_leaf_reports_nan_and_leaves_overall_alone():
    r = gradient_sparsity({"a": jnp.zeros(4), "b": jnp.array([0.0, 2.0])}, fractions=(0.5,))
    assert math.isnan(r["per_leaf"]["a"][0.5]["energy_share"])
    assert r["sq_norms"]["a"] == 0.0
    assert r["overall"][0.5]["energy_share"] == pytest.approx(1.0)


def test_by_group_weights_leaf_shares_by_their_squared_norms():
    g = {
        "layers": [
            {"query": jnp.array([3.0, 4.0]), "value": jnp.array([1.0, 1.0])},
            {"query": jnp.array([0.0, 5.0]), "value": jnp.array([2.0, 0.0])},
        ]
    }
    r = gradient_sparsity(g, fractions=(0.5,))
    by_type = gradient_sparsity_by_group(r, r"(query|value)")
    assert by_type["query"][0.5] == {
        "k": 2,
        "norm_ratio": pytest.approx(math.sqrt(41 / 50)),
        "energy_share": pytest.approx(41 / 50),
    }
    assert by_type["value"][0.5]["energy_share"] == pytest.approx(5 / 6)
    by_layer = gradient_sparsity_by_group(r, lambda p: p.split("/")[1])
    assert by_layer["0"][0.5]["energy_share"] == pytest.approx(17 / 27)
    only_query = gradient_sparsity_by_group(r, lambda p: "q" if "query" in p else None)
    assert list(only_query) == ["q"]


def test_fraction_validation_and_top_count():
    assert top_count(0.001, 100) == 1 and top_count(0.05, 1000) == 50 and top_count(1.0, 3) == 3
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        gradient_sparsity({"w": jnp.ones(3)}, fractions=(0.0,))
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        gradient_sparsity({"w": jnp.ones(3)}, fractions=(1.5,))
