"""bench.memory_model: the analytic step-memory formulas (no compilation; fast)."""

import dataclasses
import doctest

import pytest

from bench import memory_model as mm
from bench.memory_model import LLAMA_7B, GiB, Shape, step_memory


def test_doctests():
    assert doctest.testmod(mm).failed == 0


def test_llama_7b_param_count():
    assert LLAMA_7B.params() == 6_738_415_616
    assert LLAMA_7B.layer_linear_params() == 4 * 4096**2 + 3 * 4096 * 11008
    tied = dataclasses.replace(LLAMA_7B, tied=True)
    assert LLAMA_7B.params() - tied.params() == 32000 * 4096


def test_from_config_reads_hf_fields():
    class Cfg:
        hidden_size, intermediate_size, num_hidden_layers = 64, 96, 3
        num_attention_heads, num_key_value_heads, vocab_size = 4, 2, 100
        tie_word_embeddings, head_dim = True, None

    s = Shape.from_config(Cfg)
    assert (s.q_dim, s.kv_dim, s.layers, s.tied) == (64, 32, 3, True)
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 96 + 2 * 64
    assert s.params() == 3 * per_layer + 100 * 64 + 64


def test_from_config_matches_the_decoder_config():
    try:
        from train.models.decoder import LlamaConfig
    except Exception as e:  # the trainer package is optional here
        pytest.skip(f"train.models.decoder unavailable: {e}")
    cfg = LlamaConfig()
    assert Shape.from_config(cfg) == LLAMA_7B


@pytest.mark.parametrize("method", ["full", "lora", "sift"])
def test_weights_row_is_two_bytes_per_param(method):
    m = step_memory(LLAMA_7B, method)
    assert m.row("weights").bytes == 2 * LLAMA_7B.params()


def test_sift_optimizer_state_is_two_fp32_per_trained_value():
    k = mm.sift_k(LLAMA_7B, 0.05)
    assert k == 32 * (4 * 838_861 + 3 * 2_254_439)  # ceil(5%) per kernel, as count_for_rate
    m = step_memory(LLAMA_7B, "sift", rate=0.05)
    assert m.row("moments").bytes == 2 * 4 * k
    assert m.row("trained values").bytes == 4 * k
    assert m.row("sift indices").bytes == 4 * k
    assert round(m.row("moments").bytes / GiB, 2) == 2.41


def test_full_ft_moments_and_gradients():
    P = LLAMA_7B.params()
    m = step_memory(LLAMA_7B, "full", moment_bytes=4)
    assert m.row("moments").bytes == 8 * P
    r = mm.paper_table1("full", "full")
    assert r.row("gradients").bytes == 2 * P  # bf16 dense gradients


@pytest.mark.parametrize("method", ["full", "sift"])
@pytest.mark.parametrize("remat", ["none", "full"])
def test_monotonic_in_batch_and_seq(method, remat):
    """Never decreasing; the activation-bound phase strictly increasing (a short step can peak
    at the optimizer update, which does not depend on the tokens)."""
    for name, values in ("batch", (1, 2, 4, 8)), ("seq", (256, 512, 1024, 2048, 4096)):
        steps = [step_memory(LLAMA_7B, method, remat=remat, **{name: v}) for v in values]
        totals = [m.total for m in steps]
        bwd = [m.phases["backward layer 0"] for m in steps]
        assert all(a <= b for a, b in zip(totals, totals[1:], strict=False)), (name, totals)
        assert all(a < b for a, b in zip(bwd, bwd[1:], strict=False)), (name, bwd)
        if remat == "none" and method == "sift":  # activations decide the peak
            assert all(a < b for a, b in zip(totals, totals[1:], strict=False)), (name, totals)


@pytest.mark.parametrize("profile", ["torch", "jax_gpu", "xla_cpu_bf16"])
def test_remat_lowers_activations(profile):
    none = step_memory(LLAMA_7B, "sift", remat="none", profile=profile)
    full = step_memory(LLAMA_7B, "sift", remat="full", profile=profile)
    per_layer_none = mm.layer_activation_bytes(LLAMA_7B, 1, 2048, mm.PROFILES[profile])
    assert full.total < none.total
    assert full.row("saved activations").bytes < none.row("saved activations").bytes
    # only the layer input is kept per layer under full remat
    assert full.row("saved activations").bytes <= LLAMA_7B.layers * 2048 * 4096 * 2
    assert none.row("saved activations").bytes >= LLAMA_7B.layers * per_layer_none * 0.5


def test_cpu_profile_remat_is_ineffective():
    """XLA:CPU drops the barriers: remat saves nothing there (what bench.memory measured)."""
    a = step_memory(LLAMA_7B, "sift", remat="none", profile="xla_cpu")
    b = step_memory(LLAMA_7B, "sift", remat="full", profile="xla_cpu")
    assert a.total == b.total
    assert round(a.row("cpu weight copies").bytes / GiB, 1) == 24.6


def test_paper_table1_reproduction():
    for (method, remat), want in mm.PAPER.items():
        got = mm.paper_table1(remat, method).total / GiB
        assert abs(got - want) / want < 0.025, (method, remat, got, want)
    # with remat both land within 0.05 GiB of the paper
    assert abs(mm.paper_table1("full", "sift").total / GiB - 16.50) < 0.05
    assert abs(mm.paper_table1("full", "full").total / GiB - 76.12) < 0.05


def test_model_matches_the_measured_cpu_compiles():
    cases = [
        ("sift_bf16dots_none", "none", "xla_cpu_bf16"),
        ("sift_bf16dots_remat", "full", "xla_cpu_bf16"),
        ("sift_cpu_none", "none", "xla_cpu"),
    ]
    for key, remat, profile in cases:
        got = step_memory(LLAMA_7B, "sift", rate=0.05, remat=remat, profile=profile).total / GiB
        want = mm.MEASURED[key]["total"]
        assert abs(got - want) / want < 0.05, (key, got, want)
    scan = step_memory(LLAMA_7B, "sift", remat="full", profile="xla_cpu_bf16", stacked_dw=True)
    assert (
        round(scan.row("dense dW transient").bytes / GiB, 2)
        == mm.MEASURED["sift_bf16dots_scan_remat"]["weight_shaped"]
    )


def test_h200_totals_within_five_percent():
    for (method, remat), want in mm.H200.items():
        kw = dict(moment_bytes=2) if method == "full" else {}
        got = step_memory(LLAMA_7B, method, rate=0.01, remat=remat, **kw).total / GiB
        assert abs(got - want) / want < 0.05, (method, got, want)


def test_plan_decreases_to_below_the_paper():
    totals = [t for _, t in mm.issue15_plan()]
    assert all(a >= b for a, b in zip(totals, totals[1:], strict=False))
    assert totals[-1] / GiB <= 16.50 < totals[-3] / GiB


def test_format_table_lists_every_row_and_the_total():
    b = step_memory(LLAMA_7B, "sift", remat="full", profile="xla_cpu_bf16")
    text = mm.format_table(b, mm.MEASURED["sift_bf16dots_remat"])
    for r in b.rows:
        assert r.name in text
    assert "22.960" in text and "total" in text
    assert "total" in mm.format_table(b)


def test_rejects_unknown_settings():
    with pytest.raises(ValueError):
        step_memory(LLAMA_7B, "qlora")
    with pytest.raises(ValueError):
        step_memory(LLAMA_7B, "sift", remat="selective")
    with pytest.raises(ValueError):
        step_memory(LLAMA_7B, "sift", batch=0)


def test_blocked_attention_scan_and_mu_bytes():
    """Issue 15's step: blocked attention saves no [b, h, s, s] tensor and bounds the transient
    to one block; a scanned stack recomputes under remat even on XLA:CPU and copies one layer's
    weights; mu_bytes shrinks the first moment only."""
    prof = "xla_gpu_like"
    full = step_memory(LLAMA_7B, "sift", remat="none", profile=prof)
    blocked = step_memory(LLAMA_7B, "sift", remat="none", profile=prof, attn_block=512)
    scores = 32 * 2048 * 2048
    drop = full.row("saved activations").bytes - blocked.row("saved activations").bytes
    assert drop == pytest.approx(32 * (10 * scores - 2 * 2048 * 4096))
    cpu = step_memory(LLAMA_7B, "sift", remat="full", profile="xla_cpu_now", attn_block=512)
    scan = step_memory(
        LLAMA_7B, "sift", remat="full", profile="xla_cpu_now", attn_block=512, scan=True
    )
    assert scan.total < cpu.total - 10 * GiB  # remat works in the scan
    assert scan.row("layer weight slices").bytes == 2 * LLAMA_7B.layer_linear_params()
    a = mm.current_step(LLAMA_7B, "sift", remat="full", profile=prof)
    b = mm.current_step(LLAMA_7B, "sift", remat="full", profile=prof, mu_bytes=2)
    assert a.total - b.total == pytest.approx(2 * mm.sift_k(LLAMA_7B, 0.05))
