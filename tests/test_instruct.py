"""``train.instruct`` end to end on a tiny random LLaMA: methods, packing, resume, generation."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import AutoTokenizer

import sift_jax
from train import instruct
from train.generate import DecoderModel, generate
from train.instruct import InstructConfig, run
from train.instruct_data import segment_attention_mask
from train.methods import flatten_paths

FIX = Path(__file__).parent / "fixtures"
V, D, LAYERS, HEADS, HD, FF = 512, 32, 2, 4, 8, 64


# --------------------------------------------------------------- a tiny stand-in LLaMA


def tiny_llama_params(seed: int = 0) -> dict:
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    dense = lambda i, o: {"kernel": jax.random.normal(next(keys), (i, o)) * (0.5 / np.sqrt(i))}
    layers = {
        str(i): {
            "input_layernorm": {"scale": jnp.ones(D)},
            "self_attn": {
                "q_proj": dense(D, HEADS * HD),
                "k_proj": dense(D, HEADS * HD),
                "v_proj": dense(D, HEADS * HD),
                "o_proj": dense(HEADS * HD, D),
            },
            "post_attention_layernorm": {"scale": jnp.ones(D)},
            "mlp": {"gate_proj": dense(D, FF), "up_proj": dense(D, FF), "down_proj": dense(FF, D)},
        }
        for i in range(LAYERS)
    }
    emb = jax.random.normal(next(keys), (V, D)) * 0.5
    return {
        "model": {
            "embed_tokens": {"embedding": emb},
            "layers": layers,
            "norm": {"scale": jnp.ones(D)},
        }
    }


def _rms(x, scale):
    return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6) * scale


def _rope(x, pos):
    half = HD // 2
    freq = 1.0 / (10000 ** (jnp.arange(half) / half))
    ang = pos[..., None, None] * freq
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate(
        [x1 * jnp.cos(ang) - x2 * jnp.sin(ang), x1 * jnp.sin(ang) + x2 * jnp.cos(ang)], -1
    )


def tiny_llama_apply(params, input_ids, attention_mask, segment_ids=None, positions=None):
    b, s = input_ids.shape
    p = params["model"]
    x = p["embed_tokens"]["embedding"][input_ids]
    if segment_ids is None:
        positions = jnp.broadcast_to(jnp.arange(s), (b, s))
        mask = jnp.tril(jnp.ones((s, s), bool))[None, None] & (attention_mask[:, None, None, :] > 0)
    else:
        mask = segment_attention_mask(segment_ids)
    for i in range(LAYERS):
        lyr = p["layers"][str(i)]
        h = _rms(x, lyr["input_layernorm"]["scale"])
        a = lyr["self_attn"]
        q, k, v = (
            (h @ a[n]["kernel"]).reshape(b, s, HEADS, HD) for n in ("q_proj", "k_proj", "v_proj")
        )
        q, k = _rope(q, positions), _rope(k, positions)
        sc = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HD)
        w = jax.nn.softmax(jnp.where(mask, sc, -1e9), -1)
        o = jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, s, HEADS * HD)
        x = x + o @ a["o_proj"]["kernel"]
        h = _rms(x, lyr["post_attention_layernorm"]["scale"])
        m = lyr["mlp"]
        x = (
            x
            + (jax.nn.silu(h @ m["gate_proj"]["kernel"]) * (h @ m["up_proj"]["kernel"]))
            @ m["down_proj"]["kernel"]
        )
    return _rms(x, p["norm"]["scale"]) @ p["embed_tokens"]["embedding"].T


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(FIX / "instruct" / "tokenizer")


def tiny_model(tok, seed=0):
    return DecoderModel(tiny_llama_params(seed), tiny_llama_apply, tok, True, "tiny")


# A small sentiment set the tiny model can learn: the label is in the wording.
def fake_reviews(n=48, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n).tolist()
    words = {1: ["good", "great", "fine"], 0: ["bad", "awful", "dull"]}
    recs = [instruct.make_review_record(f"a {rng.choice(words[y])} movie", y) for y in labels]
    return recs, labels


def cfg_for(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        max_train_samples=32,
        val_set_size=16,
        model_max_length=48,
        max_steps=6,
        learning_rate=1e-2,
        warmup_ratio=0.0,
        logging_steps=1,
        disable_tqdm=True,
        mesh="data=1",
        sparse_rate=0.05,
    )
    base.update(kw)
    return InstructConfig(**base)


@pytest.fixture
def reviews(monkeypatch):
    monkeypatch.setattr(instruct, "review_records", lambda n, seed: fake_reviews())


def test_config_defaults_are_the_paper_recipe():
    cfg = InstructConfig()
    assert (cfg.sparse_rate, cfg.learning_rate, cfg.warmup_ratio) == (0.05, 2e-4, 0.03)
    assert cfg.sparse_exception == [] and cfg.finetuning_type == "sift"
    import re

    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert all(re.search(cfg.sparse_module[0], f"layers/0/x/{n}/kernel") for n in names)
    assert not re.search(cfg.sparse_module[0], "model/embed_tokens/embedding")


@pytest.mark.parametrize("ftype", ["sift", "full", "lora"])
def test_each_method_tunes_the_review_task(tmp_path, tok, reviews, ftype):
    model = tiny_model(tok)
    res = run(cfg_for(tmp_path, finetuning_type=ftype), model)
    out = json.loads((tmp_path / "run" / "instruct_results.json").read_text())
    assert out["before"]["eval_accuracy"] == res["before"]["eval_accuracy"]
    assert 0.0 <= out["after"]["eval_accuracy"] <= 1.0
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert out["train"]["finetuning_type"] == ftype


def test_sift_changes_only_selected_projection_entries(tmp_path, tok, reviews, monkeypatch):
    model = tiny_model(tok)
    base = jax.tree.map(np.asarray, model.params)
    seen = {}
    orig = instruct.train

    def spy(cfg, task, params, **kw):
        seen["res"] = orig(cfg, task, params, **kw)
        return seen["res"]

    monkeypatch.setattr(instruct, "train", spy)
    run(cfg_for(tmp_path), model)
    tuned = flatten_paths(seen["res"].params)
    for path, w0 in flatten_paths(base).items():
        changed = int((np.asarray(tuned[path]) != w0).sum())
        if path.endswith("_proj/kernel"):
            assert 0 < changed <= sift_jax.count_for_rate(0.05, w0.size), path
        else:
            assert changed == 0, path
    per_layer = 4 * sift_jax.count_for_rate(0.05, D * HEADS * HD)  # q, k, v, o
    per_layer += 3 * sift_jax.count_for_rate(0.05, D * FF)  # gate, up, down
    k = LAYERS * per_layer
    assert seen["res"].metrics["trainable_params"] == k
    # The saved delta turns the base model into the tuned one, bit for bit.
    from train.generate import merge_delta_file

    merged = flatten_paths(merge_delta_file(base, str(tmp_path / "run" / "sift_delta.safetensors")))
    for path, w in tuned.items():
        np.testing.assert_array_equal(np.asarray(merged[path]), np.asarray(w), err_msg=path)


def test_alpaca_file_with_packing_reports_eval_loss(tmp_path, tok):
    recs = [
        {"instruction": f"Repeat the word {w}.", "input": "", "output": w}
        for w in ["apple", "blue", "sky", "France", "Paris", "two"] * 6
    ]
    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = cfg_for(
        tmp_path,
        data_path=[str(data)],
        prompt_template="alpaca",
        packing=True,
        model_max_length=96,
        val_set_size=6,
        per_device_train_batch_size=2,
        max_steps=4,
    )
    res = run(cfg, tiny_model(tok))
    assert np.isfinite(res["after"]["eval_loss"]) and res["after"]["eval_perplexity"] > 1


def test_packing_needs_a_segment_aware_model(tmp_path, tok, reviews):
    model = DecoderModel(tiny_llama_params(), tiny_llama_apply, tok, False)
    with pytest.raises(ValueError, match="--packing needs a model forward"):
        run(cfg_for(tmp_path, packing=True), model)


def test_packed_rows_match_unpacked_logits(tok):
    """Segment masking + position reset make a packed row equal to separate rows."""
    params = tiny_llama_params()
    a, b = [3, 17, 42, 9, 11], [5, 6, 7]
    sep_a = tiny_llama_apply(params, jnp.array([a]), jnp.ones((1, 5), jnp.int32))
    sep_b = tiny_llama_apply(params, jnp.array([b]), jnp.ones((1, 3), jnp.int32))
    packed = jax.jit(tiny_llama_apply)(
        params,
        jnp.array([a + b]),
        jnp.ones((1, 8), jnp.int32),
        segment_ids=jnp.array([[1] * 5 + [2] * 3]),
        positions=jnp.array([list(range(5)) + list(range(3))]),
    )
    np.testing.assert_allclose(packed[0, :5], sep_a[0], atol=1e-5)
    np.testing.assert_allclose(packed[0, 5:], sep_b[0], atol=1e-5)


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, tok, reviews, monkeypatch):
    full = run(cfg_for(tmp_path / "full", save_steps=3), tiny_model(tok))
    orig = instruct.build_task
    seen = {"n": 0}

    def killing_task(*a, **k):
        task = orig(*a, **k)
        inner = task.train_batches

        def batches(epoch, start, bs):
            for b in inner(epoch, start, bs):
                if seen["n"] == 4:  # dies during step 5, after the step-3 checkpoint
                    raise KeyboardInterrupt
                seen["n"] += 1
                yield b

        task.train_batches = batches
        return task

    monkeypatch.setattr(instruct, "build_task", killing_task)
    with pytest.raises(KeyboardInterrupt):
        run(cfg_for(tmp_path / "killed", save_steps=3), tiny_model(tok))
    monkeypatch.setattr(instruct, "build_task", orig)
    resumed = run(
        cfg_for(tmp_path / "killed", save_steps=3, resume_from_checkpoint="latest"),
        tiny_model(tok),
    )
    logs = [
        [json.loads(x) for x in (tmp_path / d / "run" / "train_log.jsonl").read_text().splitlines()]
        for d in ("full", "killed")
    ]
    np.testing.assert_allclose(
        [r["loss"] for r in logs[1] if "loss" in r],
        [r["loss"] for r in logs[0] if "loss" in r],
        rtol=1e-5,
    )
    assert resumed["after"]["eval_accuracy"] == full["after"]["eval_accuracy"]


_apply_jit = jax.jit(tiny_llama_apply)


def _manual_greedy(params, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        logits = _apply_jit(params, jnp.array([ids]), jnp.ones((1, len(ids)), jnp.int32))
        ids.append(int(jnp.argmax(logits[0, -1])))
    return ids[len(prompt) :]


def test_greedy_generation_is_deterministic_and_exact(tok):
    params = tiny_llama_params()
    prompts = [[1, 40, 41, 42, 43, 44, 45], [1, 7]]  # different lengths in one batch
    out1 = generate(tiny_llama_apply, params, prompts, max_new_tokens=6)
    out2 = generate(tiny_llama_apply, params, prompts, max_new_tokens=6)
    assert out1 == out2
    assert out1 == [_manual_greedy(params, p, 6) for p in prompts]
    # Sampling: fixed seed reproduces; a tiny top_p is greedy.
    s1 = generate(tiny_llama_apply, params, prompts, 6, temperature=1.0, seed=3)
    assert s1 == generate(tiny_llama_apply, params, prompts, 6, temperature=1.0, seed=3)
    assert generate(tiny_llama_apply, params, prompts, 6, temperature=1.0, top_p=1e-6) == out1


def test_generation_stops_at_eos(tok):
    params = tiny_llama_params()
    first = _manual_greedy(params, [1, 7], 1)[0]
    out = generate(tiny_llama_apply, params, [[1, 7]], max_new_tokens=5, eos_id=first)
    assert out == [[first]]


def test_flags_parse_into_the_instruct_config():
    from train.config import parse_args

    cfg = parse_args(
        [
            "--data_path",
            "a.json",
            "b.jsonl",
            "--packing",
            "--mmlu_dir",
            "m",
            "--sparse_rate",
            "0.03",
        ],
        InstructConfig,
    )
    assert isinstance(cfg, InstructConfig)
    assert cfg.data_path == ["a.json", "b.jsonl"] and cfg.packing and cfg.mmlu_dir == "m"
    assert cfg.sparse_rate == 0.03 and cfg.learning_rate == 2e-4


def test_generate_cli_uses_the_chat_template(tok, monkeypatch, capsys):
    from train import generate as gen

    monkeypatch.setattr(gen, "load_model", lambda args: tiny_model(tok))
    texts = gen.main(
        ["--prompt", "hi", "--prompt", "What is the capital?", "--max_new_tokens", "4"]
    )
    assert len(texts) == 2 and texts == gen.main(
        ["--prompt", "hi", "--prompt", "What is the capital?", "--max_new_tokens", "4"]
    )
    assert "### Prompt:\nhi\n### Response:\n" in capsys.readouterr().out
