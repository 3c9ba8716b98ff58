"""``train.instruct`` end to end on the real decoder's tiny random config (``LlamaConfig.tiny``,
the real functional forward and KV-cache generation): methods, packing, resume, generation."""

import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from transformers import AutoTokenizer

import sift_jax
from sift_jax.paths import flatten_paths
from tests.train.core.toy import interrupt_batches
from train.core.outputs import is_complete, read_run_state
from train.generate import generate
from train.instruct import InstructConfig, run
from train.instruct import task as instruct
from train.instruct.data import IGNORE_INDEX, response_loss
from train.models.decoder import DecoderApply, LlamaConfig, LlamaForCausalLM
from train.models.pretrained import Pretrained

FIX = Path(__file__).resolve().parents[2] / "fixtures"
# vocab of the fixture tokenizer; a wide init so greedy argmaxes are far from ties
CFG = LlamaConfig.tiny(vocab_size=512, max_position_embeddings=256, initializer_range=0.2)
D, FF = CFG.hidden_size, CFG.intermediate_size
Q, KV = CFG.num_attention_heads * CFG.head_dim, CFG.num_key_value_heads * CFG.head_dim


def tiny_parts(seed: int = 0):
    """``(DecoderApply, params)`` of a randomly initialised tiny LLaMA."""
    graphdef, state = nnx.split(LlamaForCausalLM(CFG, rngs=nnx.Rngs(seed)), nnx.Param)
    return DecoderApply(graphdef), nnx.to_pure_dict(state)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(FIX / "instruct" / "tokenizer")


def tiny_model(tok, seed=0):
    """The tiny LLaMA as the jobs load models: a ``Pretrained`` bundle."""
    return Pretrained.from_model(LlamaForCausalLM(CFG, rngs=nnx.Rngs(seed)), tokenizer=tok)


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
        max_steps=4,
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


def _losses(run_dir: Path) -> list[float]:
    log = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in log if "loss" in r]


def test_config_defaults_are_the_paper_recipe():
    cfg = InstructConfig()
    assert (cfg.sparse_rate, cfg.learning_rate, cfg.warmup_ratio) == (0.05, 2e-4, 0.03)
    assert cfg.sparse_exception == [] and cfg.finetuning_type == "sift"
    import re

    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert all(re.search(cfg.sparse_module[0], f"layers/0/x/{n}/kernel") for n in names)
    assert not re.search(cfg.sparse_module[0], "model/embed_tokens/embedding")


@pytest.fixture(scope="module")
def sift_run(tmp_path_factory, tok):
    """One uninterrupted SIFT run (checkpoint every 2 steps), shared by the tests below:
    ``(results, TrainResult, base params as numpy, run directory)``."""
    root = tmp_path_factory.mktemp("sift")
    model = tiny_model(tok)
    base = jax.tree.map(np.asarray, model.params)
    seen = {}
    orig = instruct.fit

    def spy(cfg, task, params, **kw):
        seen["res"] = orig(cfg, task, params, **kw)
        return seen["res"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(instruct, "review_records", lambda n, seed: fake_reviews())
        mp.setattr(instruct, "fit", spy)
        res = run(cfg_for(root, save_steps=2), model)
    return res, seen["res"], base, root / "run"


def _check_run(run_dir: Path, res: dict, ftype: str) -> None:
    # The job's own results are part of the run: complete only once they are written.
    assert is_complete(run_dir) and "instruct_results.json" in read_run_state(run_dir)["outputs"]
    out = json.loads((run_dir / "instruct_results.json").read_text())
    assert out["before"]["eval_accuracy"] == res["before"]["eval_accuracy"]
    assert 0.0 <= out["after"]["eval_accuracy"] <= 1.0
    losses = _losses(run_dir)
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert out["train"]["finetuning_type"] == ftype


@pytest.mark.parametrize("ftype", ["full", "lora"])
def test_full_and_lora_tune_the_review_task(tmp_path, tok, reviews, ftype):
    res = run(cfg_for(tmp_path, finetuning_type=ftype), tiny_model(tok))
    _check_run(tmp_path / "run", res, ftype)


def test_sift_tunes_only_selected_projection_entries_and_saves_an_exact_delta(sift_run):
    res, result, base, run_dir = sift_run
    _check_run(run_dir, res, "sift")
    _check_sift_changes_only_selected_entries(result, base, run_dir)


def _check_sift_changes_only_selected_entries(res, base, run_dir):
    tuned = flatten_paths(res.params)
    for path, w0 in flatten_paths(base).items():
        changed = int((np.asarray(tuned[path]) != w0).sum())
        if path.endswith("_proj/kernel"):
            assert 0 < changed <= sift_jax.selection.count_for_rate(0.05, w0.size), path
        else:
            assert changed == 0, path
    c = lambda n: sift_jax.selection.count_for_rate(0.05, n)  # noqa: E731
    per_layer = 2 * c(D * Q) + 2 * c(D * KV) + 3 * c(D * FF)  # q, o; k, v; gate, up, down
    assert res.metrics["trainable_params"] == CFG.num_hidden_layers * per_layer
    # The saved delta turns the base model into the tuned one, bit for bit.
    from train.generate import merge_delta_file

    merged = flatten_paths(merge_delta_file(base, str(run_dir / "sift_delta.safetensors")))
    for path, w in tuned.items():
        np.testing.assert_array_equal(np.asarray(merged[path]), np.asarray(w), err_msg=path)


def test_loss_is_on_the_response_tokens_only_hand_checked(tok):
    """The training loss of one chat example equals the mean NLL of exactly the tokens of
    ``negative<|im_end|>\\n`` (computed by hand from the real forward's logits)."""
    model = tiny_model(tok)
    rec = instruct.make_review_record("dull", 0)
    arr = instruct.idata.tokenize_records(tok, [rec], 64, "chat")
    ids, labels = arr.input_ids[0], arr.labels[0]
    resp = [i for i, t in enumerate(labels) if t != IGNORE_INDEX]
    assert tok.decode(ids[resp]) == "negative<|im_end|>\n"
    assert tok.decode(ids[: resp[0]]).endswith("<|im_start|>assistant\n")
    logits = np.asarray(
        model.apply_fn(model.params, jnp.asarray(arr.input_ids), jnp.asarray(arr.attention_mask))
    )[0].astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    by_hand = np.mean([logz[i - 1] - logits[i - 1, ids[i]] for i in resp])
    got = float(response_loss(jnp.asarray(logits[None]), jnp.asarray(arr.labels)))
    np.testing.assert_allclose(got, by_hand, rtol=1e-5)


def test_alpaca_file_with_packing_reports_eval_loss_and_mmlu(tmp_path, tok):
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
        mmlu_dir=str(FIX / "mmlu"),
    )
    res = run(cfg, tiny_model(tok))
    assert np.isfinite(res["after"]["eval_loss"]) and res["after"]["eval_perplexity"] > 1
    for when in ("before", "after"):  # MMLU through the real forward, before and after
        assert res[when]["mmlu_num_questions"] == 8
        assert 0.0 <= res[when]["mmlu_average"] <= 1.0


def test_packing_needs_a_segment_aware_model(tmp_path, tok):
    class NoSegments:  # a decoder whose forward takes no segment_ids / positions
        supports_packing = False
        apply_fn = staticmethod(lambda p, ids, mask: ids)

    arrays = instruct.idata.tokenize_records(tok, fake_reviews(4)[0], 48, "chat", True)
    with pytest.raises(ValueError, match="--packing needs a model forward"):
        instruct.build_task(NoSegments(), cfg_for(tmp_path, packing=True), arrays)


def test_packed_rows_match_unpacked_logits():
    """Segment masking + position reset make a packed row equal to separate rows."""
    apply_fn, params = tiny_parts()
    a, b = [3, 17, 42, 9, 11], [5, 6, 7]
    f = jax.jit(apply_fn)
    sep = f(
        params,
        jnp.array([a + [0] * 3, b + [0] * 5]),
        jnp.array([[1] * 5 + [0] * 3, [1] * 3 + [0] * 5]),
    )
    sep_a, sep_b = sep[:1, :5], sep[1:, :3]
    packed = f(
        params,
        jnp.array([a + b]),
        jnp.ones((1, 8), jnp.int32),
        segment_ids=jnp.array([[1] * 5 + [2] * 3]),
        positions=jnp.array([list(range(5)) + list(range(3))]),
    )
    np.testing.assert_allclose(packed[0, :5], sep_a[0], atol=1e-5)
    np.testing.assert_allclose(packed[0, 5:], sep_b[0], atol=1e-5)


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, tok, reviews, monkeypatch, sift_run):
    full, _, _, full_dir = sift_run
    orig = instruct.build_task

    def killing_task(*a, **k):
        # dies during step 4, after the step-2 checkpoint
        return interrupt_batches(orig(*a, **k), 3)

    monkeypatch.setattr(instruct, "build_task", killing_task)
    with pytest.raises(KeyboardInterrupt):
        run(cfg_for(tmp_path, save_steps=2), tiny_model(tok))
    monkeypatch.setattr(instruct, "build_task", orig)
    resumed = run(cfg_for(tmp_path, save_steps=2, resume_from_checkpoint="latest"), tiny_model(tok))
    np.testing.assert_allclose(_losses(tmp_path / "run"), _losses(full_dir), rtol=1e-5)
    assert resumed["after"]["eval_accuracy"] == full["after"]["eval_accuracy"]


def _manual_greedy(apply_fn, params, prompt, n):
    """Greedy decoding by re-running the full (no-cache) forward on the growing sequence."""
    ids = list(prompt)
    for _ in range(n):
        buf = np.zeros((1, 32), np.int32)
        buf[0, : len(ids)] = ids
        logits = _apply_jit(apply_fn, params, buf, (buf > -1) & (np.arange(32) < len(ids)))
        ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
    return ids[len(prompt) :]


@partial(jax.jit, static_argnums=0)
def _apply_jit(apply_fn, params, ids, mask):
    return apply_fn(params, ids, mask.astype(jnp.int32))


def test_greedy_kv_cache_generation_is_deterministic_and_exact():
    apply_fn, params = tiny_parts()
    prompts = [[1, 40, 41, 42, 43, 44, 45], [1, 7]]  # different lengths in one batch
    out1 = generate(apply_fn, params, prompts, max_new_tokens=6)
    out2 = generate(apply_fn, params, prompts, max_new_tokens=6)
    assert out1 == out2
    assert out1 == [_manual_greedy(apply_fn, params, p, 6) for p in prompts]
    # The generic (no-cache) loop for other apply functions agrees with the KV-cache path.
    no_cache = lambda p, i, m: apply_fn(p, i, m)  # noqa: E731 - not a DecoderApply
    assert generate(no_cache, params, prompts, max_new_tokens=6) == out1
    # Sampling: a fixed seed reproduces; a tiny top_p is greedy.
    s1 = generate(apply_fn, params, prompts, 6, temperature=1.0, seed=3)
    assert s1 == generate(apply_fn, params, prompts, 6, temperature=1.0, seed=3)
    assert generate(apply_fn, params, prompts, 6, temperature=1.0, top_p=1e-6) == out1


def test_generation_stops_at_eos():
    apply_fn, params = tiny_parts()
    first = _manual_greedy(apply_fn, params, [1, 7], 1)[0]
    out = generate(apply_fn, params, [[1, 7]], max_new_tokens=5, eos_id=first)
    assert out == [[first]]


def test_flags_parse_into_the_instruct_config():
    from train.core.config import parse_args

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

    monkeypatch.setattr(gen, "load_model", lambda cfg: tiny_model(tok))
    argv = ["--prompt", "hi", "--prompt", "What is the capital?", "--max_new_tokens", "4"]
    texts = gen.main(argv)
    assert len(texts) == 2 and texts == gen.main(argv)
    assert "### Prompt:\nhi\n### Response:\n" in capsys.readouterr().out


@pytest.mark.parametrize("ftype", ["full", "sift"])
def test_fsdp_mesh_shards_the_decoders_weights_and_optimizer_state(tmp_path, tok, reviews, ftype):
    """Issue 13: train.instruct places the decoder through its bundle: with --mesh fsdp=8 the
    weights (SIFT: the merged buffers) and full FT's AdamW moments are split over 8 devices."""
    seen = {}
    orig = instruct.fit

    def spy(cfg, task, params, **kw):
        seen["res"] = orig(cfg, task, params, **kw)
        return seen["res"]

    cfg = cfg_for(
        tmp_path, finetuning_type=ftype, mesh="fsdp=8", per_device_train_batch_size=1, max_steps=2
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(instruct, "fit", spy)
        run(cfg, tiny_model(tok))
    res = seen["res"]
    q = "model/layers/0/self_attn/q_proj/kernel"

    def spec_of(tree):
        x = flatten_paths(tree)[q]
        return x.sharding.spec, len(x.sharding.device_set)

    if ftype == "full":
        mu = res.state.opt_state.inner_state[1][0].mu  # chain(clip, adamw) -> adamw's moments
        for tree in (res.state.trainable, mu):
            spec, devices = spec_of(tree)
            assert "fsdp" in str(spec) and devices == 8
    else:
        assert "fsdp" in str(spec_of(res.state.buffers.weights)[0])
        assert spec_of(res.state.buffers.weights)[1] == 8
