"""Text generation from a decoder, optionally with a saved SIFT delta merged in.

``python -m train.generate --prompt "Name a fruit."`` generates with the packaged
SmolLM2-135M-Instruct through its chat template; ``--delta out/sift_delta.safetensors`` first
merges the increments saved by ``python -m train.instruct``.

:func:`generate` takes ``(apply_fn, params)``. For the ``train.models`` decoders (``apply_fn`` a
:class:`train.models.decoder.DecoderApply`, as :func:`load_decoder` returns) it runs
:func:`train.models.generate.generate`: left-padded prompts, one prefill and then one token per
step against a KV cache, all in one ``jax.jit``. Any other
``apply_fn(params, input_ids, attention_mask) -> logits`` gets the generic loop: one fixed-size
right-padded buffer per row and the full forward at every step (no cache; exact but quadratic)
inside a ``lax.fori_loop``. Greedy when ``temperature == 0``, otherwise temperature + nucleus
(top-p) sampling.

Settings are checked before anything runs, in one place
(:func:`train.models.generate.check_generation_args`): ``max_new_tokens >= 1``,
``temperature >= 0``, ``0 < top_p <= 1``, and each prompt plus ``max_new_tokens`` within the
model's context (``max_position_embeddings``); a longer prompt is refused, not truncated. The
command line reports these (and an empty ``--prompt_file``) as usage errors, without a
traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from train.core.config import flag, parse_args
from train.models import generate as kv
from train.models.generate import check_generation_args
from train.models.pretrained import Pretrained, load_pretrained

ApplyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]

DEFAULT_MODEL = "embedded:smollm2"


@partial(jax.jit, static_argnames=("apply_fn", "max_new_tokens"))
def _generate_jit(
    apply_fn, params, ids, lengths, rng, eos_id, pad_id, max_new_tokens, temperature, top_p
):
    b, width = ids.shape
    cols = jnp.arange(width)[None, :]

    def body(t, carry):
        ids, cur, done = carry
        mask = (cols < cur[:, None]).astype(jnp.int32)
        logits = apply_fn(params, ids, mask)
        last = jnp.take_along_axis(logits, (cur - 1)[:, None, None], axis=1)[:, 0]
        tok = kv.sample_logits(last, jax.random.fold_in(rng, t), temperature, top_p).astype(
            ids.dtype
        )
        tok = jnp.where(done, pad_id, tok)
        ids = ids.at[jnp.arange(b), cur].set(tok)
        done = done | (tok == eos_id)
        return ids, cur + 1, done

    ids, _, _ = jax.lax.fori_loop(0, max_new_tokens, body, (ids, lengths, jnp.zeros((b,), bool)))
    return ids


def generate(
    apply_fn: ApplyFn,
    params: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    eos_id: int | None = None,
    pad_id: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    pad_to_multiple_of: int = 32,
) -> list[list[int]]:
    """Continues each tokenized prompt; returns only the new tokens (cut after EOS).

    Args:
        apply_fn: a :class:`train.models.decoder.DecoderApply` (KV-cache generation), or any
            hashable ``(params, input_ids, attention_mask) -> [b, s, vocab]`` (e.g. a
            module-level function: it is a static argument of the jitted no-cache loop).
        params: the model params.
        prompts: token id lists (different lengths are fine).
        max_new_tokens: tokens generated per prompt.
        eos_id: stop token (kept in the output), or ``None``.
        pad_id: filler id for unused buffer slots.
        temperature: 0 = greedy; > 0 = softmax temperature; never negative.
        top_p: nucleus sampling mass in ``(0, 1]`` (with ``temperature > 0``).
        seed: sampling seed.
        pad_to_multiple_of: prompt / buffer width rounding (fewer recompilations).

    Raises:
        ValueError: for an empty prompt or settings
            :func:`train.models.generate.check_generation_args` refuses, e.g. a prompt that
            with ``max_new_tokens`` does not fit a ``train.models`` decoder's context.

    Example:
        >>> def count_up(params, ids, mask):  # predicts "previous token + 1"
        ...     return jax.nn.one_hot(ids + 1, 10) * 10.0
        >>> generate(count_up, None, [[1, 2], [5]], max_new_tokens=3, eos_id=7)
        [[3, 4, 5], [6, 7]]
    """
    for r, p in enumerate(prompts):
        if not len(p):
            raise ValueError(f"Prompt {r} is empty; generation needs at least one token.")
    graphdef = getattr(apply_fn, "graphdef", None)
    model = None
    if graphdef is not None and prompts:  # a train.models decoder: prefill + KV-cache steps
        from flax import nnx

        model = nnx.merge(graphdef, params)
    kv.check_generation_args(
        max_new_tokens, temperature, top_p, [len(p) for p in prompts], _context_of(model)
    )
    if not prompts:
        return []
    if model is not None:
        ids, mask = kv.left_pad(prompts, pad_id, multiple=pad_to_multiple_of)
        new = kv.generate(
            model,
            ids,
            mask,
            max_new_tokens,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        ).tolist()
        return [_cut_at_eos(row, eos_id) for row in new]
    width = max(len(p) for p in prompts) + max_new_tokens
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    ids = np.full((len(prompts), width), pad_id, np.int32)
    for r, p in enumerate(prompts):
        ids[r, : len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    out = _generate_jit(
        apply_fn,
        params,
        jnp.asarray(ids),
        jnp.asarray(lengths),
        jax.random.key(seed),
        jnp.int32(-1 if eos_id is None else eos_id),
        jnp.int32(pad_id),
        max_new_tokens,
        jnp.float32(temperature),
        jnp.float32(top_p),
    )
    out = np.asarray(out)
    return [
        _cut_at_eos(out[r, n : n + max_new_tokens].tolist(), eos_id) for r, n in enumerate(lengths)
    ]


def _context_of(model: Any) -> int | None:
    """``max_position_embeddings`` of a ``train.models`` decoder (or its bundle), else None."""
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    n = getattr(cfg, "max_position_embeddings", None)
    return None if n is None else int(n)


def context_length(model: Pretrained) -> int | None:
    """How many positions (prompt + new tokens) ``model`` takes, or ``None`` if unknown.

    Example:
        >>> from flax import nnx
        >>> from train.models.decoder import LlamaConfig, LlamaForCausalLM
        >>> context_length(Pretrained.from_model(LlamaForCausalLM(LlamaConfig.tiny(),
        ...                                                        rngs=nnx.Rngs(0))))
        64
    """
    return _context_of(model)


def read_prompts(prompt: Sequence[str] | None, prompt_file: str | None) -> list[str]:
    """The ``--prompt`` values, then the non-empty lines of ``--prompt_file``; the built-in
    prompt only when neither flag is given.

    Raises:
        ValueError: for an empty ``--prompt``, a missing ``--prompt_file``, or one without a
            single non-empty line.

    Example:
        >>> read_prompts(["Name a fruit."], None)
        ['Name a fruit.']
        >>> read_prompts(None, None)
        ['Give three tips for staying healthy.']
    """
    prompts = list(prompt or [])
    for i, text in enumerate(prompts):
        if not text.strip():
            raise ValueError(f"--prompt number {i + 1} is empty; give it some text.")
    if prompt_file is not None:
        try:
            with open(prompt_file, encoding="utf-8") as f:
                lines = [ln.rstrip("\r\n") for ln in f if ln.strip()]
        except FileNotFoundError:
            raise ValueError(f"--prompt_file {prompt_file} does not exist.") from None
        except IsADirectoryError:
            raise ValueError(
                f"--prompt_file {prompt_file} is a directory; pass a text file with one prompt "
                "per line."
            ) from None
        if not lines:
            raise ValueError(
                f"--prompt_file {prompt_file} has no non-empty lines; put one prompt per line."
            )
        prompts += lines
    return prompts or ["Give three tips for staying healthy."]


def _cut_at_eos(tokens: list[int], eos_id: int | None) -> list[int]:
    if eos_id is not None and eos_id in tokens:
        return tokens[: tokens.index(eos_id) + 1]
    return tokens


def encode_prompt(tokenizer, text: str, chat_template: bool) -> list[int]:
    """Token ids of a user prompt, through the chat template (with the generation prompt)
    or as plain text with the tokenizer's special tokens.

    Example:
        >>> from transformers import AutoTokenizer
        >>> tok = AutoTokenizer.from_pretrained("tests/fixtures/instruct/tokenizer")
        >>> tok.decode(encode_prompt(tok, "hi", chat_template=True))
        '<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n'
    """
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("This tokenizer has no chat template; pass --no-chat_template.")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text)["input_ids"])


def merge_delta_file(params: Any, path: str) -> Any:
    """``params`` with the SIFT delta saved at ``path`` merged in (``sift_jax`` delta format).

    Example:
        >>> import os, tempfile, numpy as np, sift_jax
        >>> base = {"w": np.zeros(3, np.float32)}
        >>> f = os.path.join(tempfile.mkdtemp(), "delta.safetensors")
        >>> sift_jax.save_delta(sift_jax.extract_delta({"w": np.array([0, 2, 0], np.float32)},
        ...                                            base, {"w": np.array([1])}), f)
        >>> merge_delta_file(base, f)["w"].tolist()
        [0.0, 2.0, 0.0]
    """
    import sift_jax

    return sift_jax.merge_delta(params, sift_jax.load_delta(path))


@dataclass
class GenerateConfig:
    """``train.generate`` flags."""

    model_name_or_path: str = flag(
        DEFAULT_MODEL,
        "'embedded:smollm2' (the packaged SmolLM2-135M-Instruct), a .gguf file, or a local "
        "HF LLaMA-family directory.",
    )
    delta: str | None = flag(None, "A SIFT delta (.safetensors) to merge in.")
    dtype: str = flag("float32", "Parameter dtype.", choices=["float32", "bfloat16"])
    prompt: list[str] = flag([], "A prompt (repeat the flag for several).", repeat=True)
    prompt_file: str | None = flag(
        None,
        "A file with one prompt per line (blank lines skipped; a file with none is an error). "
        "Without --prompt and --prompt_file a built-in prompt is used.",
    )
    max_new_tokens: int = flag(
        64,
        "Tokens to generate per prompt (>= 1). Each prompt plus max_new_tokens must fit the "
        "model's context (max_position_embeddings): longer prompts are refused, not truncated.",
    )
    temperature: float = flag(
        0.0, "0 = greedy (the default); > 0 samples at that temperature. Must be >= 0."
    )
    top_p: float = flag(
        1.0, "Nucleus sampling mass, in (0, 1] (used with --temperature > 0; 1 = no cut)."
    )
    seed: int = flag(0, "Sampling seed.")
    chat_template: bool = flag(
        True, "Wrap each prompt in the tokenizer's chat template (if it has one)."
    )

    def __post_init__(self):
        check_generation_args(self.max_new_tokens, self.temperature, self.top_p, prefix="--")


def load_decoder(name: str, dtype: str = "float32", remat: bool = False) -> Pretrained:
    """Loads a LLaMA-family decoder (``embedded:smollm2``, a ``.gguf`` file, an HF directory
    or hub id) as a :class:`~train.models.pretrained.Pretrained` causal LM.

    Example:
        >>> m = load_decoder("embedded:smollm2")  # doctest: +SKIP
        >>> m.apply_fn(m.params, ids, mask).shape  # doctest: +SKIP
        (1, 7, 49152)
    """
    return load_pretrained(name, head="causal_lm", dtype=dtype, remat=remat)


def load_model(cfg: GenerateConfig) -> Pretrained:
    """The decoder named by ``cfg.model_name_or_path`` with ``cfg.delta`` merged in."""
    model = load_decoder(cfg.model_name_or_path, cfg.dtype)
    if cfg.delta:
        model.params = merge_delta_file(model.params, cfg.delta)
    return model


def main(argv: Sequence[str] | None = None) -> list[str]:
    """``python -m train.generate``: prints one completion per prompt and returns them.

    Example:
        >>> main(["--prompt", "Name a fruit.", "--max_new_tokens", "8"])  # doctest: +SKIP
    """
    cfg = parse_args(argv, GenerateConfig, description=__doc__.split("\n\n")[0])
    prompts = read_prompts(cfg.prompt or None, cfg.prompt_file)  # before the model is loaded
    model = load_model(cfg)
    tok = model.tokenizer
    use_chat = cfg.chat_template and bool(getattr(tok, "chat_template", None))
    ids = [encode_prompt(tok, t, use_chat) for t in prompts]
    settings = (cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    check_generation_args(*settings, [len(i) for i in ids], context_length(model), prefix="--")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    outs = generate(
        model.apply_fn,
        model.params,
        ids,
        cfg.max_new_tokens,
        tok.eos_token_id,
        pad,
        cfg.temperature,
        cfg.top_p,
        cfg.seed,
    )
    texts = [tok.decode(o, skip_special_tokens=True) for o in outs]
    for prompt, text in zip(prompts, texts, strict=True):
        print(f"### Prompt:\n{prompt}\n### Response:\n{text}\n", file=sys.stdout)
    return texts


def cli() -> int:
    """The console entry point (``python -m train.generate``): :func:`main` with one-line errors
    (``--debug`` shows the traceback)."""
    from train.core.cli import run_main

    return run_main(main, prog="train.generate")
