"""Text generation from a decoder, optionally with a saved SIFT delta merged in.

``python -m train.generate --prompt "Name a fruit."`` generates with the packaged
SmolLM2-135M-Instruct through its chat template; ``--delta out/sift_delta.safetensors`` first
merges the increments saved by ``python -m train.instruct``.

:func:`generate` works with any ``apply_fn(params, input_ids, attention_mask) -> logits``: it
keeps one fixed-size token buffer per row, right-padded, and at every step runs the full
forward (no KV cache; simple and exact, fine for the short generations here) inside one
``jax.jit``-compiled ``lax.fori_loop``. Greedy when ``temperature == 0``, otherwise
temperature + nucleus (top-p) sampling.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ApplyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]

DEFAULT_MODEL = "embedded:smollm2"


@dataclass
class DecoderModel:
    """A causal LM as the instruct tools use it.

    Attributes:
        params: nested dict of arrays.
        apply_fn: ``(params, input_ids, attention_mask, **kw) -> [b, s, vocab]`` logits;
            accepts ``segment_ids`` / ``positions`` keywords when ``supports_packing``.
        tokenizer: the HF tokenizer.
        supports_packing: whether ``apply_fn`` takes ``segment_ids`` and ``positions``.
        name: where it came from.
    """

    params: Any
    apply_fn: Callable
    tokenizer: Any
    supports_packing: bool = False
    name: str = ""

    @property
    def logits_fn(self) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """``(input_ids, attention_mask) -> logits`` with the params bound (jitted)."""
        f = jax.jit(self.apply_fn)
        return lambda ids, mask: f(self.params, jnp.asarray(ids), jnp.asarray(mask))


def _sample(logits: jax.Array, rng: jax.Array, temperature, top_p) -> jax.Array:
    """Greedy where ``temperature <= 0``, else temperature + nucleus sampling (traced args)."""
    greedy = jnp.argmax(logits, axis=-1)
    logits = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # keep the smallest prefix whose mass reaches top_p (always at least the top token)
    before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    sampled = jax.random.categorical(rng, jnp.where(logits < cutoff, -jnp.inf, logits), axis=-1)
    return jnp.where(temperature <= 0, greedy, sampled)


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
        tok = _sample(last, jax.random.fold_in(rng, t), temperature, top_p).astype(ids.dtype)
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
        apply_fn: ``(params, input_ids, attention_mask) -> [b, s, vocab]`` (hashable, e.g. a
            module-level function: it is a static argument of the jitted loop).
        params: the model params.
        prompts: token id lists (different lengths are fine).
        max_new_tokens: tokens generated per prompt.
        eos_id: stop token (kept in the output), or ``None``.
        pad_id: filler id for unused buffer slots.
        temperature: 0 = greedy; otherwise softmax temperature.
        top_p: nucleus sampling mass (with ``temperature > 0``).
        seed: sampling seed.
        pad_to_multiple_of: buffer width rounding (fewer recompilations).

    Example:
        >>> def count_up(params, ids, mask):  # predicts "previous token + 1"
        ...     return jax.nn.one_hot(ids + 1, 10) * 10.0
        >>> generate(count_up, None, [[1, 2], [5]], max_new_tokens=3, eos_id=7)
        [[3, 4, 5], [6, 7]]
    """
    if not prompts:
        return []
    width = max(len(p) for p in prompts) + max_new_tokens
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    ids = np.full((len(prompts), width), pad_id, np.int32)
    for r, p in enumerate(prompts):
        if not len(p):
            raise ValueError(f"Prompt {r} is empty; generation needs at least one token.")
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
    result = []
    for r, n in enumerate(lengths):
        new = out[r, n : n + max_new_tokens].tolist()
        if eos_id is not None and eos_id in new:
            new = new[: new.index(eos_id) + 1]
        result.append(new)
    return result


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
        >>> import os, tempfile, numpy as np
        >>> from sift_jax._src import delta as d
        >>> base = {"w": np.zeros(3, np.float32)}
        >>> f = os.path.join(tempfile.mkdtemp(), "delta.safetensors")
        >>> d.save_delta(d.extract_delta({"w": np.array([0, 2, 0], np.float32)}, base,
        ...                              {"w": np.array([1])}), f)
        >>> merge_delta_file(base, f)["w"].tolist()
        [0.0, 2.0, 0.0]
    """
    import sift_jax

    api = sift_jax
    if not hasattr(api, "merge_delta"):
        from sift_jax._src import delta as api  # until the package root re-exports it
    return api.merge_delta(params, api.load_delta(path))


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The flags :func:`load_model` reads."""
    p.add_argument(
        "--model_name_or_path",
        default=DEFAULT_MODEL,
        help="'embedded:smollm2' (the packaged SmolLM2-135M-Instruct), a .gguf file, or a local "
        "HF LLaMA-family directory.",
    )
    p.add_argument("--delta", default=None, help="A SIFT delta (.safetensors) to merge in.")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def load_model(args: argparse.Namespace | Any) -> DecoderModel:
    """The decoder named by ``args.model_name_or_path`` with ``args.delta`` merged in."""
    model = load_decoder(args.model_name_or_path, getattr(args, "dtype", "float32"))
    if getattr(args, "delta", None):
        model.params = merge_delta_file(model.params, args.delta)
    return model


def load_decoder(name: str, dtype: str = "float32") -> DecoderModel:
    """Loads a LLaMA-family decoder through ``train.models`` as a :class:`DecoderModel`."""
    from train.models import decoder as dec  # the model helper's module

    loaded = dec.load_pretrained(name, dtype=dtype)
    return DecoderModel(
        params=loaded.params,
        apply_fn=loaded.apply_fn,
        tokenizer=loaded.tokenizer,
        supports_packing=getattr(loaded, "supports_packing", False),
        name=name,
    )


def main(argv: Sequence[str] | None = None) -> list[str]:
    """``python -m train.generate``: prints one completion per prompt."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--prompt", action="append", default=None, help="A prompt (repeatable).")
    p.add_argument("--prompt_file", default=None, help="A file with one prompt per line.")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy.")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--chat_template",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Wrap each prompt in the tokenizer's chat template (if it has one).",
    )
    args = p.parse_args(argv)
    prompts = list(args.prompt or [])
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts += [ln.rstrip("\n") for ln in f if ln.strip()]
    if not prompts:
        prompts = ["Give three tips for staying healthy."]
    model = load_model(args)
    tok = model.tokenizer
    use_chat = args.chat_template and bool(getattr(tok, "chat_template", None))
    ids = [encode_prompt(tok, t, use_chat) for t in prompts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    outs = generate(
        model.apply_fn,
        model.params,
        ids,
        args.max_new_tokens,
        tok.eos_token_id,
        pad,
        args.temperature,
        args.top_p,
        args.seed,
    )
    texts = [tok.decode(o, skip_special_tokens=True) for o in outs]
    for prompt, text in zip(prompts, texts, strict=True):
        print(f"### Prompt:\n{prompt}\n### Response:\n{text}\n", file=sys.stdout)
    return texts


if __name__ == "__main__":
    main()
