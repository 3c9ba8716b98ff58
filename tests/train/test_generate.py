"""Generation settings are validated before anything runs (``python -m train.generate``, the
library ``generate`` functions), on the tiny random decoder of tests/test_instruct.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from transformers import AutoTokenizer

from train import generate as gen
from train.core.cli import run_main
from train.models import generate as kv
from train.models.decoder import DecoderApply, LlamaConfig, LlamaForCausalLM
from train.models.pretrained import Pretrained

FIX = Path(__file__).resolve().parents[1] / "fixtures"
CONTEXT = 64
CFG = LlamaConfig.tiny(vocab_size=512, max_position_embeddings=CONTEXT)


def tiny_parts(seed: int = 0):
    """``(DecoderApply, params)`` of a randomly initialised tiny LLaMA (context 64)."""
    graphdef, state = nnx.split(LlamaForCausalLM(CFG, rngs=nnx.Rngs(seed)), nnx.Param)
    return DecoderApply(graphdef), nnx.to_pure_dict(state)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(FIX / "instruct" / "tokenizer")


@pytest.fixture
def no_model(monkeypatch):
    """Flag errors must come before the (large) model is loaded."""

    def refuse(args):
        raise AssertionError("the model was loaded although the flags are invalid")

    monkeypatch.setattr(gen, "load_model", refuse)


@pytest.fixture
def tiny(monkeypatch, tok):
    model = Pretrained.from_model(LlamaForCausalLM(CFG, rngs=nnx.Rngs(0)), tokenizer=tok)
    monkeypatch.setattr(gen, "load_model", lambda cfg: model)
    return model


def cli_error(capsys, argv) -> str:
    """``python -m train.generate`` must exit as a usage error (status 2) with a message, no
    traceback."""
    assert run_main(gen.main, argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: " in err
    return " ".join(err.split())  # argparse wraps nothing, but be safe about newlines


# ----------------------------------------------------------------------------- command line


@pytest.mark.parametrize("top_p", ["0", "-0.5", "1.5", "nan"])
def test_cli_refuses_top_p_outside_0_1(no_model, capsys, top_p):
    err = cli_error(capsys, ["--prompt", "hi", "--temperature", "0.7", "--top_p", top_p])
    assert "--top_p must be in (0, 1]" in err and f"got {float(top_p)!r}" in err


@pytest.mark.parametrize("n", ["0", "-3"])
def test_cli_refuses_max_new_tokens_below_1(no_model, capsys, n):
    err = cli_error(capsys, ["--prompt", "hi", "--max_new_tokens", n])
    assert "--max_new_tokens must be an integer >= 1" in err and f"got {n}" in err


@pytest.mark.parametrize("t", ["-0.1", "inf"])
def test_cli_refuses_negative_or_infinite_temperature(no_model, capsys, t):
    err = cli_error(capsys, ["--prompt", "hi", "--temperature", t])
    assert "--temperature must be a finite number >= 0 (0 = greedy decoding" in err


def test_cli_refuses_a_prompt_file_without_prompts(no_model, capsys, tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\t\n")
    err = cli_error(capsys, ["--prompt_file", str(blank)])
    assert f"--prompt_file {blank} has no non-empty lines" in err
    # ... even next to a --prompt: the file was meant to hold prompts
    both = ["--prompt", "hi", "--prompt_file", str(blank)]
    assert "no non-empty lines" in cli_error(capsys, both)
    err = cli_error(capsys, ["--prompt_file", str(tmp_path / "missing.txt")])
    assert "missing.txt does not exist" in err
    assert "--prompt number 2 is empty" in cli_error(capsys, ["--prompt", "hi", "--prompt", " "])


def test_prompt_file_lines_are_the_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("first\n\n  \nsecond\r\n")
    assert gen.read_prompts(["cli"], str(f)) == ["cli", "first", "second"]


def test_cli_refuses_a_prompt_longer_than_the_context(tiny, capsys, monkeypatch):
    ran = []
    monkeypatch.setattr(gen, "generate", lambda *a, **k: ran.append(1))
    long = " ".join(["word"] * 80)
    err = cli_error(capsys, ["--prompt", "hi", "--prompt", long, "--max_new_tokens", "4"])
    assert "Prompt 1 (counting from 0) has" in err
    assert f"more than the model's context of {CONTEXT} (max_position_embeddings)" in err
    assert "Prompts are not truncated" in err and "lower --max_new_tokens" in err
    err = cli_error(capsys, ["--prompt", "hi", "--max_new_tokens", str(CONTEXT)])
    assert f"--max_new_tokens {CONTEXT} leaves no room for a prompt" in err
    assert not ran  # refused before generating


def test_cli_generates_with_valid_flags(tiny, capsys):
    texts = gen.main(["--prompt", "hi", "--max_new_tokens", "3", "--temperature", "0"])
    assert len(texts) == 1
    assert "### Prompt:\nhi\n### Response:\n" in capsys.readouterr().out


def test_help_says_long_prompts_are_refused(capsys):
    with pytest.raises(SystemExit):
        gen.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "longer prompts are refused, not truncated" in out
    assert "0 = greedy" in out and "in (0, 1]" in out


# ----------------------------------------------------------------------------- library


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(top_p=0.0), r"^top_p must be in \(0, 1\]"),
        (dict(top_p=-1.0), r"^top_p must be in \(0, 1\]"),
        (dict(max_new_tokens=0), r"^max_new_tokens must be an integer >= 1"),
        (dict(max_new_tokens=-3), r"^max_new_tokens must be an integer >= 1"),
        (dict(max_new_tokens=2.0), r"^max_new_tokens must be an integer >= 1"),
        (dict(temperature=-1.0), r"^temperature must be a finite number >= 0"),
    ],
)
def test_library_generate_refuses_bad_settings(kw, match):
    apply_fn, params = tiny_parts()
    args = dict(max_new_tokens=2) | kw
    with pytest.raises(ValueError, match=match):
        gen.generate(apply_fn, params, [[1, 7]], **args)
    no_cache = lambda p, i, m: apply_fn(p, i, m)  # noqa: E731 - the generic loop checks too
    with pytest.raises(ValueError, match=match):
        gen.generate(no_cache, params, [[1, 7]], **args)
    model = nnx.merge(apply_fn.graphdef, params)
    with pytest.raises(ValueError, match=match):
        kv.generate(model, [[1, 7]], [[1, 1]], **args)


def test_library_generate_fits_prompts_into_the_context():
    apply_fn, params = tiny_parts()
    fits = [list(range(1, CONTEXT - 4 + 1))]  # 60 tokens + 4 new = the whole context
    out = gen.generate(apply_fn, params, fits, max_new_tokens=4)
    assert len(out[0]) == 4
    with pytest.raises(ValueError, match=r"^Prompt 1 \(counting from 0\) has 61 tokens; .* 65 "):
        gen.generate(apply_fn, params, [[1], fits[0] + [1]], max_new_tokens=4)
    model = nnx.merge(apply_fn.graphdef, params)
    ids, mask = kv.left_pad([fits[0] + [1]], 0, multiple=32)  # padding does not count
    with pytest.raises(ValueError, match=r"has 61 tokens"):
        kv.generate(model, ids, mask, 4)


def test_check_generation_args_accepts_numpy_scalars():
    kv.check_generation_args(np.int64(3), np.float32(0.5), np.float64(1.0), [3], CONTEXT)
    with pytest.raises(ValueError, match="max_new_tokens"):
        kv.check_generation_args(True)
