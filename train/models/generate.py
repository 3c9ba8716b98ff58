"""Batched generation from :class:`~train.models.decoder.LlamaForCausalLM` with a KV cache,
all inside one ``jax.jit`` (prefill + ``lax.fori_loop`` of single-token steps).

Prompts are left-padded, so every row's next token goes to the same cache slot; RoPE positions
come from ``cumsum(attention_mask) - 1`` so padding does not shift them. Greedy when
``temperature == 0``, else temperature + nucleus (top-p) sampling; both are traced values (one
compilation serves both).

:func:`check_generation_args` is the one place generation settings are validated (here, in
:func:`train.generate.generate` and in ``python -m train.generate``): at least one new token,
``temperature >= 0``, ``0 < top_p <= 1``, and every prompt plus ``max_new_tokens`` within the
model's context (``max_position_embeddings``). Prompts that do not fit are refused, never
truncated.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train.models.decoder import LlamaForCausalLM, init_cache


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: Any, top_p: Any) -> jax.Array:
    """Next tokens ``[b]`` from ``logits`` ``[b, vocab]``: argmax where ``temperature <= 0``,
    else a sample from the smallest top-``top_p`` nucleus at that temperature.

    Example:
        >>> sample_logits(jnp.array([[0.0, 3.0, 1.0]]), jax.random.key(0), 0.0, 1.0)
        Array([1], dtype=int32)
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    sorted_desc = jnp.sort(scaled, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted entry
    cutoff = jnp.min(jnp.where(before < top_p, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    sampled = jax.random.categorical(rng, jnp.where(scaled < cutoff, -jnp.inf, scaled), axis=-1)
    return jnp.where(temperature <= 0, greedy, sampled.astype(jnp.int32))


def check_generation_args(
    max_new_tokens: Any,
    temperature: Any = 0.0,
    top_p: Any = 1.0,
    prompt_lengths: Sequence[int] = (),
    context: int | None = None,
    *,
    prefix: str = "",
) -> None:
    """Raises ``ValueError``, naming the setting and the fix, for generation that cannot work.

    Checked before anything runs: ``max_new_tokens`` is an integer ``>= 1``; ``temperature``
    is finite and ``>= 0`` (0 = greedy); ``top_p`` is in ``(0, 1]`` (0 or less would keep no
    token); and, when ``context`` is given, each prompt length plus ``max_new_tokens`` is at
    most ``context`` (a longer prompt is refused, not truncated).

    Args:
        max_new_tokens: tokens to generate per prompt.
        temperature: sampling temperature (0 = greedy).
        top_p: nucleus mass.
        prompt_lengths: token counts of the prompts (without padding).
        context: the model's ``max_position_embeddings``, or ``None`` (not checked).
        prefix: put before setting names in messages (``"--"`` for command-line flags).

    Example:
        >>> check_generation_args(8, temperature=0.7, top_p=0.9, prompt_lengths=[5], context=64)
        >>> check_generation_args(8, top_p=0)
        Traceback (most recent call last):
        ...
        ValueError: top_p must be in (0, 1] (the probability mass sampled from; 1 = no cut); ...
        >>> check_generation_args(8, prompt_lengths=[3, 60], context=64, prefix="--")
        Traceback (most recent call last):
        ...
        ValueError: Prompt 1 (counting from 0) has 60 tokens; with --max_new_tokens 8 it needs ...
    """
    try:
        if isinstance(max_new_tokens, bool):
            raise TypeError
        n_new = operator.index(max_new_tokens)
    except TypeError:
        n_new = None
    if n_new is None or n_new < 1:
        raise ValueError(
            f"{prefix}max_new_tokens must be an integer >= 1 (the number of tokens to generate "
            f"per prompt); got {max_new_tokens!r}."
        )
    temp = _as_float(temperature)
    if temp is None or not math.isfinite(temp) or temp < 0:
        raise ValueError(
            f"{prefix}temperature must be a finite number >= 0 (0 = greedy decoding, > 0 = "
            f"sampling at that temperature); got {temperature!r}."
        )
    mass = _as_float(top_p)
    if mass is None or not 0 < mass <= 1:  # also false for NaN
        raise ValueError(
            f"{prefix}top_p must be in (0, 1] (the probability mass sampled from; 1 = no cut); "
            f"got {top_p!r}. A top_p of 0 or less would keep no token at all."
        )
    if context is None:
        return
    context = int(context)
    if n_new >= context:
        raise ValueError(
            f"{prefix}max_new_tokens {n_new} leaves no room for a prompt in the model's context "
            f"of {context} tokens (max_position_embeddings); use at most {context - 1}."
        )
    long = [(r, int(n)) for r, n in enumerate(prompt_lengths) if int(n) + n_new > context]
    if long:
        r, n = long[0]
        more = f" ({len(long) - 1} more prompts are too long as well)" if len(long) > 1 else ""
        raise ValueError(
            f"Prompt {r} (counting from 0) has {n} tokens; with {prefix}max_new_tokens {n_new} "
            f"it needs {n + n_new} positions, more than the model's context of {context} "
            f"(max_position_embeddings){more}. Prompts are not truncated: shorten it to at most "
            f"{context - n_new} tokens or lower {prefix}max_new_tokens."
        )


def _as_float(x: Any) -> float | None:
    if isinstance(x, bool):
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _generate(graphdef, params, ids, mask, rng, eos_id, pad_id, temperature, top_p, max_new_tokens):
    model = nnx.merge(graphdef, params)
    b, p = ids.shape
    cache = init_cache(model.cfg, b, p + max_new_tokens)
    full = jnp.concatenate([mask, jnp.zeros((b, max_new_tokens), mask.dtype)], axis=1)
    logits, cache = model(ids, full, cache=cache, cache_index=0)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)

    def body(t, carry):
        cache, full, last, done, out = carry
        tok = sample_logits(last, jax.random.fold_in(rng, t), temperature, top_p)
        tok = jnp.where(done, pad_id, tok)
        out = out.at[:, t].set(tok)
        done = done | (tok == eos_id)
        full = full.at[:, p + t].set(1)
        logits, cache = model(tok[:, None], full, cache=cache, cache_index=p + t)
        return cache, full, logits[:, -1], done, out

    carry = (cache, full, logits[:, -1], jnp.zeros((b,), bool), out)
    return jax.lax.fori_loop(0, max_new_tokens, body, carry)[-1]


def generate(
    model: LlamaForCausalLM,
    input_ids: Any,
    attention_mask: Any,
    max_new_tokens: int = 32,
    *,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> np.ndarray:
    """New tokens ``[b, max_new_tokens]`` for left-padded prompts (``pad_token_id`` after EOS).

    Args:
        model: the decoder.
        input_ids: ``[b, p]`` left-padded prompt ids.
        attention_mask: ``[b, p]`` (0 on the left padding).
        max_new_tokens: tokens to generate.
        eos_token_id: a row stops after emitting it.
        pad_token_id: filler after a row stopped.
        temperature: 0 = greedy; > 0 samples at that temperature; never negative.
        top_p: nucleus mass in ``(0, 1]`` (with ``temperature > 0``).
        seed: sampling seed.

    Raises:
        ValueError: from :func:`check_generation_args`, e.g. a prompt that with
            ``max_new_tokens`` does not fit ``model.cfg.max_position_embeddings``.

    Example:
        >>> from train.models.decoder import LlamaConfig
        >>> m = LlamaForCausalLM(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
        >>> generate(m, [[0, 5, 6]], [[0, 1, 1]], 4).shape
        (1, 4)
    """
    lengths = np.asarray(attention_mask).reshape(np.shape(input_ids)[0], -1).sum(-1)
    check_generation_args(
        max_new_tokens,
        temperature,
        top_p,
        lengths.tolist(),
        getattr(getattr(model, "cfg", None), "max_position_embeddings", None),
    )
    graphdef, state = nnx.split(model, nnx.Param)
    out = _generate(
        graphdef,
        nnx.to_pure_dict(state),
        jnp.asarray(input_ids, jnp.int32),
        jnp.asarray(attention_mask, jnp.int32),
        jax.random.key(seed),
        jnp.int32(-1 if eos_token_id is None else eos_token_id),
        jnp.int32(pad_token_id),
        jnp.float32(temperature),
        jnp.float32(top_p),
        max_new_tokens,
    )
    return np.asarray(out)


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, multiple: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, mask)`` with the prompts right-aligned (width rounded up to ``multiple``).

    Example:
        >>> left_pad([[5, 6], [7]], 0, multiple=1)[0].tolist()
        [[5, 6], [0, 7]]
    """
    width = -(-max(len(p) for p in prompts) // multiple) * multiple
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for r, p in enumerate(prompts):
        if len(p):
            ids[r, width - len(p) :] = p
            mask[r, width - len(p) :] = 1
    return ids, mask


def generate_text(
    model: LlamaForCausalLM,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    *,
    chat_template: bool = False,
    **kwargs: Any,
) -> list[str]:
    """Completions of text prompts (optionally through the tokenizer's chat template).

    Example:
        >>> generate_text(model, tok, ["The capital of France is"], 3)  # doctest: +SKIP
        [' Paris.']
    """
    if chat_template:
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
    encoded = [tokenizer(p, add_special_tokens=not chat_template)["input_ids"] for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = left_pad(encoded, pad)
    eos = kwargs.pop("eos_token_id", tokenizer.eos_token_id)
    out = generate(model, ids, mask, max_new_tokens, eos_token_id=eos, pad_token_id=pad, **kwargs)
    texts = []
    for row in out.tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts
