"""MMLU-style multiple-choice evaluation (zero- or k-shot) from local CSV files.

The layout is the original MMLU release's: ``<dir>/dev/<subject>_dev.csv`` (few-shot examples)
and ``<dir>/test/<subject>_test.csv`` (or ``val/``), no header, columns
``question, A, B, C, D, answer``. Fields are kept verbatim, as the original code's
``pandas.read_csv`` reads them (line breaks inside quoted fields included, a ``CRLF`` inside a
quoted field as well), except that an option ``None`` stays the text ``"None"`` (pandas makes
it NaN and the original prompt then shows ``nan``). Prompts are the original code's
(Hendrycks et al.)::

    The following are multiple choice questions (with answers) about <subject words>.

    <dev question>
    A. ...
    B. ...
    C. ...
    D. ...
    Answer: B

    <test question>
    ...
    Answer:

except that the subject words follow a single space (the original's ``format_subject`` puts
a second one before them). The prediction is the argmax over the next-token logits of the
answer letters (``" A"``, ``" B"``, ...), as in the original code and the SIFT paper's
evaluation. When a prompt is longer than ``max_length`` the number of shots is reduced (as
the original does), and a zero-shot prompt that is still too long keeps its last
``max_length`` tokens (the end of the question, its options and ``Answer:``; a leading BOS is
kept). Both are counted in the result.

Two ways to score the prompts, with the same predictions:

* any ``logits_fn(input_ids, attention_mask) -> [batch, seq, vocab]`` (:class:`FullLogits`;
  a tiny random model or a fake function tests it): right-padded batches in file order, the
  logits read at each prompt's last real token;
* :class:`DecoderScorer` for a ``train.models`` decoder (what ``python -m train.mmlu`` uses):
  the LM head is applied at each prompt's last real token only (the model's hidden states,
  not ``[batch, seq, vocab]`` logits); prompts are sorted by length into batches of a few
  bucketed widths (about ``tokens_per_batch`` tokens each, so few distinct shapes to
  compile); and the token prefix that every prompt of a subject shares (the header and the
  k answered dev examples) is run once into a KV cache that each batch of questions attends
  to, so a k-shot prompt costs its question's tokens (plus attention over the cached
  prefix), not the whole prompt.

The whole test set (14,042 questions) on the packaged SmolLM2-135M-Instruct, fp32 on CPU
(bfloat16 is slower there)::

    python -m train.mmlu --mmlu_dir DIR --output_file mmlu_0shot.json
    python -m train.mmlu --mmlu_dir DIR --mmlu_k_shot 5 --output_file mmlu_5shot.json

The JSON holds per-subject and average accuracies, the shot setting, ``max_length`` and how
many prompts got fewer shots or were cut, wall time and questions per second, the scorer's
counters and every prediction.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from train.core import logs
from train.core.config import flag as cfg_flag
from train.core.config import parse_args
from train.core.outputs import write_json_atomic

log = logging.getLogger("train")

CHOICES = ("A", "B", "C", "D")

LogitsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Question:
    """One multiple-choice row: question, the four options, and the answer letter."""

    question: str
    options: tuple[str, str, str, str]
    answer: str


def format_subject(subject: str) -> str:
    """``"high_school_physics"`` -> ``"high school physics"``.

    Example:
        >>> format_subject("high_school_physics")
        'high school physics'
    """
    return " ".join(subject.split("_"))


def format_example(q: Question, include_answer: bool = True) -> str:
    """One question block of the MMLU prompt.

    Example:
        >>> print(format_example(Question("2+2?", ("1", "2", "3", "4"), "D")), end="")
        2+2?
        A. 1
        B. 2
        C. 3
        D. 4
        Answer: D
        <BLANKLINE>
    """
    s = q.question
    for letter, opt in zip(CHOICES, q.options, strict=True):
        s += f"\n{letter}. {opt}"
    s += "\nAnswer:"
    if include_answer:
        s += f" {q.answer}\n\n"
    return s


def build_prompt(subject: str, question: Question, shots: Sequence[Question] = ()) -> str:
    """The full prompt for ``question`` with ``shots`` answered examples before it.

    Example:
        >>> q = Question("2+2?", ("1", "2", "3", "4"), "D")
        >>> build_prompt("elementary_mathematics", q).splitlines()[0]
        'The following are multiple choice questions (with answers) about elementary mathematics.'
        >>> build_prompt("x", q, [q]).count("Answer:")
        2
    """
    head = (
        f"The following are multiple choice questions (with answers) about "
        f"{format_subject(subject)}.\n\n"
    )
    return head + "".join(format_example(s) for s in shots) + format_example(question, False)


def load_csv(path: str) -> list[Question]:
    """Reads an MMLU CSV (no header; question, A, B, C, D, answer).

    Raises:
        ValueError: naming the file and row of a malformed line.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "x_test.csv")
        >>> _ = open(p, "w").write('"Pick, one",a,b,c,d,C\\n')
        >>> load_csv(p)
        [Question(question='Pick, one', options=('a', 'b', 'c', 'd'), answer='C')]
    """
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.reader(f)):
            if not row:
                continue
            if len(row) != 6:
                raise ValueError(
                    f"{path}, row {i}: expected 6 columns (question, A, B, C, D, answer), "
                    f"got {len(row)}."
                )
            ans = row[5].strip()
            if ans not in CHOICES:
                raise ValueError(f"{path}, row {i}: answer must be one of A/B/C/D, got {ans!r}.")
            out.append(Question(row[0], (row[1], row[2], row[3], row[4]), ans))
    return out


def list_subjects(data_dir: str, split: str = "test") -> list[str]:
    """Subjects with a ``<split>/<subject>_<split>.csv`` file, sorted.

    Example:
        >>> list_subjects("tests/fixtures/mmlu")
        ['college_chemistry', 'world_geography']
    """
    split_dir = os.path.join(data_dir, split)
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(
            f"No MMLU {split} directory {split_dir} (expected <dir>/{split}/<subject>_{split}.csv)."
        )
    end = f"_{split}.csv"
    return sorted(f[: -len(end)] for f in os.listdir(split_dir) if f.endswith(end))


def choice_token_ids(tokenizer, choices: Sequence[str] = CHOICES) -> list[int]:
    """The token that follows ``"Answer:"`` for each letter (``" A"`` etc.).

    Found by tokenizing ``"Answer: A"`` against ``"Answer:"``, which is right for byte-level
    BPE (GPT-2, SmolLM, LLaMA-3) and SentencePiece (LLaMA-1/2) tokenizers alike.

    Example:
        >>> class Tok:  # one token per character
        ...     def __call__(self, text, add_special_tokens=False):
        ...         return {"input_ids": [ord(c) for c in text]}
        >>> choice_token_ids(Tok(), "AB")
        [32, 32]
    """
    base = list(tokenizer("Answer:", add_special_tokens=False)["input_ids"])
    ids = []
    for c in choices:
        full = list(tokenizer(f"Answer: {c}", add_special_tokens=False)["input_ids"])
        if full[: len(base)] == base and len(full) > len(base):
            ids.append(full[len(base)])
        else:
            ids.append(list(tokenizer(f" {c}", add_special_tokens=False)["input_ids"])[-1])
    return ids


class Encoded(NamedTuple):
    """A tokenized prompt: its ids, the shots it holds, and whether it was cut to fit."""

    ids: list[int]
    shots: int
    truncated: bool


def truncate_left(ids: Sequence[int], max_length: int, bos_id: int | None = None) -> list[int]:
    """The last ``max_length`` tokens of ``ids``, keeping a leading ``bos_id``.

    Example:
        >>> truncate_left([1, 5, 6, 7, 8], 3), truncate_left([1, 5, 6, 7, 8], 3, bos_id=1)
        ([6, 7, 8], [1, 7, 8])
    """
    ids = list(ids)
    if len(ids) <= max_length:
        return ids
    if bos_id is not None and ids and ids[0] == bos_id and max_length > 1:
        return ids[:1] + ids[len(ids) - max_length + 1 :]
    return ids[len(ids) - max_length :]


def encode_prompt(
    tokenizer, subject: str, question: Question, shots: Sequence[Question], max_length: int
) -> Encoded:
    """Token ids of the prompt, dropping shots while it exceeds ``max_length``.

    Returns:
        ``Encoded(ids, shots, truncated)``; a zero-shot prompt still too long keeps its last
        tokens (and a leading BOS), with ``truncated=True``.

    Example:
        >>> from transformers import AutoTokenizer
        >>> tok = AutoTokenizer.from_pretrained("tests/fixtures/instruct/tokenizer")
        >>> q = Question("2+2?", ("1", "2", "3", "4"), "D")
        >>> ids, k, cut = encode_prompt(tok, "math", q, [q, q], max_length=10_000)
        >>> k, cut, tok.decode(ids).endswith("Answer:")
        (2, False, True)
        >>> encode_prompt(tok, "math", q, [q, q], max_length=10)[1:]
        (0, True)
    """
    k = len(shots)
    while True:
        ids = list(tokenizer(build_prompt(subject, question, shots[:k]))["input_ids"])
        if len(ids) <= max_length:
            return Encoded(ids, k, False)
        if k == 0:
            return Encoded(truncate_left(ids, max_length, tokenizer.bos_token_id), 0, True)
        k -= 1


# ----------------------------------------------------------------------------- batching


def bucket_width(n: int, multiple: int = 32, per_octave: int = 4) -> int:
    """The padded width for a prompt of ``n`` tokens: a multiple of ``multiple``, at most
    ``per_octave`` widths between two powers of two (padding under ``1 / per_octave``), so
    batches take few distinct shapes.

    Example:
        >>> [bucket_width(n) for n in (1, 32, 33, 65, 100, 129, 257, 1000)]
        [32, 32, 64, 96, 128, 160, 320, 1024]
        >>> [bucket_width(n, per_octave=2) for n in (100, 129, 257, 1000)]
        [128, 192, 384, 1024]
    """
    if n <= multiple:
        return multiple
    w = multiple
    while 2 * w < n:
        w *= 2
    step = max(w // per_octave, multiple)
    return w + -(-(n - w) // step) * step


class Batch(NamedTuple):
    """Prompt indices ``rows`` padded to ``width`` tokens in a batch of ``size`` rows
    (``size - len(rows)`` filler rows)."""

    rows: list[int]
    width: int
    size: int


def plan_batches(
    lengths: Sequence[int],
    tokens_per_batch: int = 2048,
    max_batch_size: int = 32,
    multiple: int = 32,
    per_octave: int = 4,
) -> list[Batch]:
    """Batches of prompts of similar length, longest first.

    Each batch's width is :func:`bucket_width` of its longest prompt and its row count
    ``tokens_per_batch // width`` (between 1 and ``max_batch_size``), so a width always comes
    with the same row count (one compiled shape per width), except for the last batch, which
    has the next power of two rows at most (the only one with filler rows).

    Example:
        >>> for b in plan_batches([10, 300, 40, 35, 12, 290, 8], tokens_per_batch=128):
        ...     print(b)
        Batch(rows=[1], width=320, size=1)
        Batch(rows=[5], width=320, size=1)
        Batch(rows=[2, 3], width=64, size=2)
        Batch(rows=[4, 0, 6], width=32, size=4)
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out, i = [], 0
    while i < len(order):
        width = bucket_width(lengths[order[i]], multiple, per_octave)
        size = max(1, min(max_batch_size, tokens_per_batch // width))
        left = len(order) - i
        if left < size:  # the last batch: the next power of two rows, not a full batch
            size = min(size, 1 << (left - 1).bit_length())
        out.append(Batch(order[i : i + size], width, size))
        i += size
    return out


def pad_batch(
    prompts: Sequence[Sequence[int]], batch: Batch, pad_id: int, side: str = "right"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, mask, last)`` ``[size, width]``, ``[size, width]``, ``[size]`` for ``batch``:
    ``last`` is each row's last real token (filler rows hold one ``pad_id`` token).

    Example:
        >>> ids, mask, last = pad_batch([[5, 6, 7], [8]], Batch([0, 1], 4, 3), 0, "left")
        >>> ids.tolist(), last.tolist()
        ([[0, 5, 6, 7], [0, 0, 0, 8], [0, 0, 0, 0]], [3, 3, 3])
        >>> pad_batch([[5, 6, 7], [8]], Batch([0, 1], 4, 2), 0)[2].tolist()
        [2, 0]
    """
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}.")
    ids = np.full((batch.size, batch.width), pad_id, np.int32)
    mask = np.zeros((batch.size, batch.width), np.int32)
    last = np.zeros(batch.size, np.int32)
    rows = [list(prompts[r]) for r in batch.rows] + [[pad_id]] * (batch.size - len(batch.rows))
    for r, p in enumerate(rows):
        n = len(p)
        if not 0 < n <= batch.width:
            raise ValueError(f"prompt of {n} tokens does not fit width {batch.width}.")
        lo = 0 if side == "right" else batch.width - n
        ids[r, lo : lo + n] = p
        mask[r, lo : lo + n] = 1
        last[r] = lo + n - 1
    return ids, mask, last


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix all of ``seqs`` share.

    Example:
        >>> common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]])
        2
    """
    if not seqs:
        return 0
    first, n = seqs[0], min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


# ----------------------------------------------------------------------------- scoring


class Scorer(Protocol):
    """``choice_logits(prompts, choice_ids, pad_id, groups)`` -> ``[n, len(choice_ids)]``:
    the next-token logits of the answer letters after each prompt. ``groups`` (one hashable
    per prompt, e.g. its subject and shot count) tells which prompts share a prefix."""

    def choice_logits(
        self,
        prompts: Sequence[list[int]],
        choice_ids: Sequence[int],
        pad_id: int,
        groups: Sequence[Hashable] | None = None,
    ) -> np.ndarray: ...


def full_logits_scores(
    logits_fn: LogitsFn,
    prompts: Sequence[list[int]],
    choice_ids: Sequence[int],
    pad_id: int,
    batch_size: int = 8,
    pad_to_multiple_of: int = 64,
) -> np.ndarray:
    """``[n, len(choice_ids)]`` logits of the choices after each prompt, the straightforward
    way: prompts in order, right-padded to a multiple of ``pad_to_multiple_of`` and to
    ``batch_size`` rows, full ``[b, s, vocab]`` logits read at each prompt's last real token.

    Example:
        >>> def logits_fn(ids, mask):  # favours token 7 everywhere
        ...     out = np.zeros(ids.shape + (10,)); out[..., 7] = 1.0; return out
        >>> full_logits_scores(logits_fn, [[1, 2], [3]], [5, 7], pad_id=0).tolist()
        [[0.0, 1.0], [0.0, 1.0]]
    """
    out = []
    choice_ids = np.asarray(choice_ids)
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        width = -(-max(len(p) for p in chunk) // pad_to_multiple_of) * pad_to_multiple_of
        ids, mask, last = pad_batch(
            chunk, Batch(list(range(len(chunk))), width, batch_size), pad_id
        )
        logits = np.asarray(logits_fn(ids, mask))
        out.append(logits[np.arange(batch_size), last][:, choice_ids][: len(chunk)])
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, len(choice_ids)))


def predict(
    logits_fn: LogitsFn,
    prompts: Sequence[list[int]],
    choice_ids: Sequence[int],
    pad_id: int,
    batch_size: int = 8,
    pad_to_multiple_of: int = 64,
) -> np.ndarray:
    """Index of the highest-scoring choice for each tokenized prompt
    (:func:`full_logits_scores`).

    Example:
        >>> def logits_fn(ids, mask):  # favours token 7 everywhere
        ...     out = np.zeros(ids.shape + (10,)); out[..., 7] = 1.0; return out
        >>> predict(logits_fn, [[1, 2], [3]], choice_ids=[5, 6, 7, 8], pad_id=0).tolist()
        [2, 2]
    """
    scores = full_logits_scores(
        logits_fn, prompts, choice_ids, pad_id, batch_size, pad_to_multiple_of
    )
    return scores.argmax(-1) if len(scores) else np.zeros(0, np.int64)


@dataclass
class FullLogits:
    """:class:`Scorer` over any ``logits_fn(ids, mask) -> [b, s, vocab]``
    (:func:`full_logits_scores`).

    Example:
        >>> f = lambda ids, mask: np.eye(4)[ids]  # the next token is the current one
        >>> FullLogits(f, batch_size=2).choice_logits([[1], [3, 2]], [1, 2], 0).tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """

    logits_fn: LogitsFn
    batch_size: int = 8
    pad_to_multiple_of: int = 64

    def choice_logits(self, prompts, choice_ids, pad_id, groups=None) -> np.ndarray:
        """See :class:`Scorer` (``groups`` is ignored)."""
        return full_logits_scores(
            self.logits_fn, prompts, choice_ids, pad_id, self.batch_size, self.pad_to_multiple_of
        )


def _head_at(model, hidden, last, choice_ids):
    """The choice logits at ``hidden[r, last[r]]``, as ``LlamaForCausalLM`` computes logits
    (final norm, then the tied embedding or the LM head, in fp32)."""
    x = model.model.norm(hidden[jnp.arange(hidden.shape[0]), last])
    head = model.model.embed_tokens.attend if model.lm_head is None else model.lm_head
    return head(x).astype(jnp.float32)[:, choice_ids]


@partial(jax.jit, static_argnames=("graphdef",))
def _last_token_logits(graphdef, params, ids, mask, last, choice_ids):
    from flax import nnx

    model = nnx.merge(graphdef, params)
    _, hidden = model(ids, mask, output_hidden_states=True)  # the unused logits are dead code
    return _head_at(model, hidden[-1], last, choice_ids)


@partial(jax.jit, static_argnames=("graphdef",))
def _prefill(graphdef, params, ids, mask):
    from flax import nnx

    from train.models.decoder import init_cache

    model = nnx.merge(graphdef, params)
    _, cache = model(ids, mask, cache=init_cache(model.cfg, 1, ids.shape[1]), cache_index=0)
    return cache


@partial(jax.jit, static_argnames=("graphdef",))
def _cached_last_token_logits(graphdef, params, cache, prefix_mask, ids, mask, last, choice_ids):
    from flax import nnx

    model = nnx.merge(graphdef, params)
    b, s = ids.shape
    p = prefix_mask.shape[-1]

    def grow(c):  # [layers, 1, p, kv, hd] -> [layers, b, p + s, kv, hd]
        shape = (c.shape[0], b, p) + c.shape[3:]
        tail = jnp.zeros((c.shape[0], b, s) + c.shape[3:], c.dtype)
        return jnp.concatenate([jnp.broadcast_to(c, shape), tail], axis=2)

    full = jnp.concatenate([jnp.broadcast_to(prefix_mask, (b, p)), mask], axis=1)
    (_, hidden), _ = model(
        ids, full, cache=jax.tree.map(grow, cache), cache_index=p, output_hidden_states=True
    )
    return _head_at(model, hidden[-1], last, choice_ids)


class DecoderScorer:
    """Fast :class:`Scorer` for a ``train.models`` decoder (``LlamaForCausalLM`` family).

    Same predictions as :class:`FullLogits` on the model's logits, computed with less work:
    the LM head only at each prompt's last real token; prompts sorted into
    :func:`plan_batches` batches (left or right padded); and, per group of prompts (one
    subject at one shot count), the shared token prefix run once into a KV cache when it has
    at least ``min_prefix`` tokens (``prefix_cache=False`` turns this off). Prompts of groups
    with shorter shared prefixes (zero-shot: only the header) are batched together.

    Args:
        graphdef: the model's NNX graphdef. params: its nested dict of params.
        tokens_per_batch: about this many padded tokens per forward.
        max_batch_size: at most this many rows per forward.
        padding_side: ``"right"`` or ``"left"``.
        prefix_cache: run shared prefixes once into a KV cache.
        min_prefix: shortest shared prefix worth caching.
        verbose: print progress about once a minute.

    Attributes:
        stats: counters of the work done (``questions``, ``batches``, ``shapes`` compiled,
            ``tokens`` real and ``padded_tokens`` in the forwards, cached ``prefixes`` and
            their ``prefix_tokens``; ``prefill_seconds`` and ``batch_seconds``, compiles
            included).

    Example:
        >>> from flax import nnx
        >>> from train.models.decoder import LlamaConfig, LlamaForCausalLM
        >>> g, p = nnx.split(LlamaForCausalLM(LlamaConfig.tiny(), rngs=nnx.Rngs(0)), nnx.Param)
        >>> s = DecoderScorer(g, nnx.to_pure_dict(p), min_prefix=2)
        >>> s.choice_logits([[3, 4, 5, 6], [3, 4, 5, 9, 8]], [10, 11], pad_id=0).shape
        (2, 2)
        >>> s.stats["prefixes"], s.stats["prefix_tokens"], s.stats["tokens"]
        (1, 3, 3)
    """

    def __init__(
        self,
        graphdef: Any,
        params: Any,
        *,
        tokens_per_batch: int = 1024,
        max_batch_size: int = 32,
        padding_side: str = "right",
        prefix_cache: bool = True,
        min_prefix: int = 64,
        verbose: bool = False,
    ):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        if tokens_per_batch < 1 or max_batch_size < 1:
            raise ValueError("tokens_per_batch and max_batch_size must be >= 1.")
        self.graphdef, self.params = graphdef, params
        self.tokens_per_batch, self.max_batch_size = tokens_per_batch, max_batch_size
        self.padding_side, self.prefix_cache = padding_side, prefix_cache
        self.min_prefix, self.verbose = max(1, min_prefix), verbose
        self.stats: dict[str, Any] = dict.fromkeys(
            ("questions", "batches", "tokens", "padded_tokens", "prefixes", "prefix_tokens"), 0
        )
        self.stats.update(prefill_seconds=0.0, batch_seconds=0.0)
        self._shapes: set[tuple] = set()

    @classmethod
    def from_model(cls, model: Any, **kw: Any) -> DecoderScorer:
        """From a ``train.models.pretrained.Pretrained`` decoder (``graphdef``, ``params``) or
        anything with ``params`` and an ``apply_fn`` holding a ``graphdef``.

        Example:
            >>> from train.models.pretrained import load_pretrained
            >>> s = DecoderScorer.from_model(load_pretrained("embedded:smollm2"))  # doctest: +SKIP
        """
        graphdef = getattr(model, "graphdef", None)
        if graphdef is None:
            graphdef = getattr(getattr(model, "apply_fn", None), "graphdef", None)
        if graphdef is None:
            raise TypeError(f"{type(model).__name__} has no graphdef (not a train.models model).")
        return cls(graphdef, model.params, **kw)

    def choice_logits(
        self,
        prompts: Sequence[list[int]],
        choice_ids: Sequence[int],
        pad_id: int,
        groups: Sequence[Hashable] | None = None,
    ) -> np.ndarray:
        """See :class:`Scorer`."""
        n = len(prompts)
        out = np.zeros((n, len(choice_ids)), np.float32)
        if n == 0:
            return out
        if any(len(p) == 0 for p in prompts):
            raise ValueError("An empty prompt has no last token to score.")
        cids = jnp.asarray(np.asarray(choice_ids, np.int32))
        members: dict[Hashable, list[int]] = {}
        for i, g in enumerate(groups if groups is not None else [None] * n):
            members.setdefault(g, []).append(i)
        pooled: list[int] = []
        cached: list[tuple[list[int], int]] = []
        for rows in members.values():
            shared = [prompts[i] for i in rows]
            # at least one token per prompt stays outside the prefix (its last one is scored)
            p = min(common_prefix_length(shared), min(len(s) for s in shared) - 1)
            if self.prefix_cache and p >= self.min_prefix:
                cached.append((rows, p))
            else:
                pooled.extend(rows)
        self._t0, self._done, self._n, self._next_log = time.time(), 0, n, time.time() + 60
        if pooled:
            sub = [prompts[i] for i in pooled]
            scores = self._run(sub, cids, pad_id, None)
            out[pooled] = scores
        for rows, p in cached:
            prefix = list(prompts[rows[0]][:p])
            width = bucket_width(p, per_octave=2)
            ids = np.full((1, width), pad_id, np.int32)
            mask = np.zeros((1, width), np.int32)
            ids[0, :p], mask[0, :p] = prefix, 1
            self._shapes.add(("prefill", width))
            t = time.time()
            cache = _prefill(self.graphdef, self.params, jnp.asarray(ids), jnp.asarray(mask))
            jax.block_until_ready(cache)
            self.stats["prefill_seconds"] += time.time() - t
            self.stats["prefixes"] += 1
            self.stats["prefix_tokens"] += p
            out[rows] = self._run([prompts[i][p:] for i in rows], cids, pad_id, (cache, mask))
        self.stats["questions"] += n
        self.stats["shapes"] = len(self._shapes)
        return out

    def _run(self, prompts, cids, pad_id, prefix) -> np.ndarray:
        out = np.zeros((len(prompts), cids.shape[0]), np.float32)
        lengths = [len(p) for p in prompts]
        for batch in plan_batches(lengths, self.tokens_per_batch, self.max_batch_size):
            t = time.time()
            ids, mask, last = pad_batch(prompts, batch, pad_id, self.padding_side)
            args = (jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(last), cids)
            if prefix is None:
                self._shapes.add(ids.shape)
                res = _last_token_logits(self.graphdef, self.params, *args)
            else:
                cache, pmask = prefix
                self._shapes.add((pmask.shape[1],) + ids.shape)
                res = _cached_last_token_logits(
                    self.graphdef, self.params, cache, jnp.asarray(pmask), *args
                )
            out[batch.rows] = np.asarray(res)[: len(batch.rows)]
            self.stats["batch_seconds"] += time.time() - t
            self.stats["batches"] += 1
            self.stats["tokens"] += sum(lengths[r] for r in batch.rows)
            self.stats["padded_tokens"] += ids.size
            self._progress(len(batch.rows))
        return out

    def _progress(self, k: int) -> None:
        self._done += k
        now = time.time()
        if self.verbose and now >= self._next_log:
            rate = self._done / (now - self._t0)
            eta = (self._n - self._done) / max(rate, 1e-9)
            log.info(
                f"MMLU scoring: {self._done}/{self._n} questions, {rate:.2f}/s, "
                f"{len(self._shapes)} shapes compiled, about {eta / 60:.0f} min left"
            )
            self._next_log = now + 60


# ----------------------------------------------------------------------------- evaluation


@dataclass
class MMLUResult:
    """Accuracies: per subject, the question-weighted average (the original MMLU number) and
    the unweighted mean over subjects; how the prompts were built (``k_shot``,
    ``max_length``, how many got fewer shots or were cut from the left) and how long it
    took."""

    subjects: dict[str, float]
    average: float
    macro_average: float
    num_questions: int
    k_shot: int
    predictions: dict[str, list[str]] = field(default_factory=dict, repr=False)
    num_fewer_shots: int = 0
    num_truncated: int = 0
    max_length: int | None = None
    split: str = "test"
    seconds: float = 0.0
    prompt_tokens: int = 0
    max_prompt_tokens: int = 0
    resumed_subjects: int = 0

    @property
    def questions_per_second(self) -> float:
        """Questions per second of wall time (tokenizing and compiling included)."""
        return self.num_questions / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        """JSON-friendly metrics (``mmlu_average``, ``mmlu_<subject>``, ...).

        Example:
            >>> MMLUResult({"virology": 0.5}, 0.5, 0.5, 2, 0).as_dict()["mmlu_virology"]
            0.5
        """
        out = {
            "mmlu_average": self.average,
            "mmlu_macro_average": self.macro_average,
            "mmlu_num_questions": self.num_questions,
            "mmlu_k_shot": self.k_shot,
            "mmlu_split": self.split,
            "mmlu_max_length": self.max_length,
            "mmlu_num_fewer_shots": self.num_fewer_shots,
            "mmlu_num_truncated": self.num_truncated,
            "mmlu_prompt_tokens": self.prompt_tokens,
            "mmlu_max_prompt_tokens": self.max_prompt_tokens,
            "mmlu_seconds": round(self.seconds, 3),
            "mmlu_questions_per_second": round(self.questions_per_second, 4),
            "mmlu_resumed_subjects": self.resumed_subjects,
        }
        out.update({f"mmlu_{s}": a for s, a in self.subjects.items()})
        return out


def _check_progress(path: str, saved: dict, key: dict) -> None:
    if saved.get("key") != key:
        old = saved.get("key") or {}
        diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
        shown = ", ".join(f"{k}: {old.get(k)!r} there, {key.get(k)!r} now" for k in diff)
        raise ValueError(
            f"{path} holds MMLU progress for other settings ({shown}). Delete it to start "
            f"over, or run with the settings it was written for."
        )


def load_progress(path: str, key: dict) -> dict[str, dict]:
    """Per-subject records of an interrupted :func:`evaluate_mmlu` run (``{}`` if ``path``
    does not exist).

    Raises:
        ValueError: the file was written for other settings (``key``), or is not a progress
            file.

    Example:
        >>> import tempfile
        >>> load_progress(os.path.join(tempfile.mkdtemp(), "none.json"), {"k_shot": 5})
        {}
    """
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{path} is not an MMLU progress file ({e}); delete it to start over."
        ) from e
    fields = ("predictions", "fewer_shots", "truncated", "prompt_tokens", "max_prompt_tokens")
    if (
        not isinstance(saved, dict)
        or not isinstance(saved.get("subjects"), dict)
        or not all(
            isinstance(r, dict) and all(f in r for f in fields) for r in saved["subjects"].values()
        )
    ):
        raise ValueError(f"{path} is not an MMLU progress file; delete it to start over.")
    _check_progress(path, saved, key)
    return saved["subjects"]


def evaluate_mmlu(
    model: LogitsFn | Scorer,
    tokenizer,
    data_dir: str,
    k_shot: int = 0,
    subjects: Sequence[str] | None = None,
    batch_size: int = 8,
    max_length: int = 2048,
    max_questions_per_subject: int | None = None,
    verbose: bool = False,
    split: str = "test",
    progress_file: str | None = None,
    progress_key: dict | None = None,
) -> MMLUResult:
    """MMLU accuracy of a model.

    Args:
        model: a :class:`Scorer` (e.g. :class:`DecoderScorer`) or a ``logits_fn``
            ``(input_ids [b, s] int32, attention_mask [b, s]) -> [b, s, vocab]``, scored with
            :class:`FullLogits` in batches of ``batch_size``.
        tokenizer: an HF tokenizer (its special tokens, e.g. BOS, are added to each prompt).
        data_dir: the MMLU directory (``dev/`` and ``test/`` CSVs).
        k_shot: answered dev examples in each prompt (0 = zero-shot).
        subjects: subjects to run (default: every ``<split>/*_<split>.csv``).
        batch_size: prompts per ``logits_fn`` call (a ``logits_fn`` only).
        max_length: longest prompt in tokens (shots are dropped to fit, then zero-shot
            prompts are cut from the left).
        max_questions_per_subject: evaluate only the first N questions of each subject.
        verbose: print one line per subject.
        split: ``"test"`` or ``"val"``.
        progress_file: makes the run resumable: subjects are scored one at a time and each
            finished subject's predictions are written to this JSON file (atomically);
            subjects already in it are not scored again. Without it all prompts are scored
            together (one batching across subjects).
        progress_key: what else must match for a progress file to be reused (model, dtype,
            scorer settings); ``k_shot``, ``split``, ``max_length`` and
            ``max_questions_per_subject`` are always part of it.

    Returns:
        An :class:`MMLUResult`; with a progress file its ``seconds`` add up every run's time
        and ``resumed_subjects`` counts the subjects taken from the file.

    Example:
        >>> from transformers import AutoTokenizer
        >>> tok = AutoTokenizer.from_pretrained("tests/fixtures/instruct/tokenizer")
        >>> always_a = lambda ids, mask: np.eye(len(tok))[np.full(ids.shape, 272)]  # " A"
        >>> r = evaluate_mmlu(always_a, tok, "tests/fixtures/mmlu")
        >>> r.subjects
        {'college_chemistry': 0.25, 'world_geography': 0.5}
    """
    t0 = time.time()
    if max_questions_per_subject is not None and max_questions_per_subject < 1:
        raise ValueError(
            f"max_questions_per_subject must be >= 1, got {max_questions_per_subject}."
        )
    scorer = model if hasattr(model, "choice_logits") else FullLogits(model, batch_size)
    subjects = list(subjects) if subjects is not None else list_subjects(data_dir, split)
    if not subjects:
        raise ValueError(f"No MMLU subjects found in {data_dir}/{split}.")
    choice_ids = choice_token_ids(tokenizer)
    if len(set(choice_ids)) != len(choice_ids):
        raise ValueError(f"The answer letters do not map to distinct tokens: {choice_ids}.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    questions: dict[str, list[Question]] = {}
    shots: dict[str, list[Question]] = {}
    for subject in subjects:
        path = os.path.join(data_dir, split, f"{subject}_{split}.csv")
        qs = load_csv(path)
        if not qs:
            raise ValueError(f"{path} has no questions.")
        questions[subject] = qs[:max_questions_per_subject]
        shots[subject] = []
        if k_shot > 0:
            dev_path = os.path.join(data_dir, "dev", f"{subject}_dev.csv")
            if not os.path.exists(dev_path):
                raise FileNotFoundError(f"--mmlu_k_shot {k_shot} needs {dev_path}.")
            shots[subject] = load_csv(dev_path)[:k_shot]
    key = dict(progress_key or {}) | {
        "k_shot": k_shot,
        "split": split,
        "max_length": max_length,
        "max_questions_per_subject": max_questions_per_subject,
    }
    key = json.loads(json.dumps(key))  # as it reads back from the file (tuples -> lists)
    done = load_progress(progress_file, key) if progress_file else {}
    for subject, rec in done.items():
        if subject in questions and len(rec["predictions"]) != len(questions[subject]):
            raise ValueError(
                f"{progress_file}: {subject} has {len(rec['predictions'])} predictions for "
                f"{len(questions[subject])} questions (the CSV changed?); delete it to start over."
            )
    todo = [s for s in subjects if s not in done]
    resumed = len(subjects) - len(todo)
    if verbose and progress_file and resumed:
        log.info(f"MMLU: {resumed}/{len(subjects)} subjects already scored in {progress_file}")
    chunks = [[s] for s in todo] if progress_file else ([todo] if todo else [])
    total_q = sum(len(questions[s]) for s in todo)
    scored_q = 0
    for chunk in chunks:
        tc = time.time()
        encoded: list[Encoded] = []
        groups: list[tuple[str, int]] = []
        for subject in chunk:
            for q in questions[subject]:
                e = encode_prompt(tokenizer, subject, q, shots[subject], max_length)
                encoded.append(e)
                groups.append((subject, e.shots))
        scores = scorer.choice_logits([e.ids for e in encoded], choice_ids, pad_id, groups)
        pred = np.asarray(scores).argmax(-1)
        i = 0
        for subject in chunk:
            n = len(questions[subject])
            es = encoded[i : i + n]
            done[subject] = {
                "predictions": "".join(CHOICES[j] for j in pred[i : i + n]),
                "fewer_shots": sum(e.shots < len(shots[subject]) for e in es),
                "truncated": sum(e.truncated for e in es),
                "prompt_tokens": sum(len(e.ids) for e in es),
                "max_prompt_tokens": max(len(e.ids) for e in es),
                "seconds": (time.time() - tc) * n / len(encoded),
            }
            i += n
        scored_q += len(encoded)
        if progress_file:
            write_json_atomic(progress_file, {"key": key, "subjects": done})
            if verbose:
                rate = scored_q / (time.time() - t0)
                n_done = sum(s in done for s in subjects)
                log.info(
                    f"MMLU progress: {n_done}/{len(subjects)} subjects, {scored_q}/{total_q} "
                    f"questions this run, {rate:.2f}/s, about "
                    f"{(total_q - scored_q) / max(rate, 1e-9) / 60:.0f} min left"
                )
    accs: dict[str, float] = {}
    preds_by_subject: dict[str, list[str]] = {}
    total_correct = total = 0
    for subject, qs in questions.items():
        letters = list(done[subject]["predictions"])
        correct = sum(p == q.answer for p, q in zip(letters, qs, strict=True))
        accs[subject] = correct / len(qs)
        preds_by_subject[subject] = letters
        total_correct += correct
        total += len(qs)
        if verbose:
            log.info(f"MMLU {subject}: {accs[subject]:.4f} ({correct}/{len(qs)})")
    recs = [done[s] for s in subjects]
    resumed_seconds = sum(done[s]["seconds"] for s in subjects if s not in todo)
    return MMLUResult(
        accs,
        total_correct / total,
        float(np.mean(list(accs.values()))),
        total,
        k_shot,
        preds_by_subject,
        num_fewer_shots=sum(r["fewer_shots"] for r in recs),
        num_truncated=sum(r["truncated"] for r in recs),
        max_length=max_length,
        split=split,
        seconds=time.time() - t0 + resumed_seconds,
        prompt_tokens=sum(r["prompt_tokens"] for r in recs),
        max_prompt_tokens=max(r["max_prompt_tokens"] for r in recs),
        resumed_subjects=resumed,
    )


def load_scorer_model(name: str, dtype: str = "float32", delta: str | None = None):
    """``(Pretrained decoder, tokenizer)`` of ``name`` with the SIFT ``delta`` merged in.

    Example:
        >>> m, tok = load_scorer_model("embedded:smollm2")  # doctest: +SKIP
    """
    from train.models.pretrained import load_pretrained

    model = load_pretrained(name, head="causal_lm", dtype=dtype, tokenizer="required")
    if delta:
        import sift_jax

        model.params = sift_jax.merge_delta(model.params, sift_jax.load_delta(delta))
    return model, model.tokenizer


@dataclass
class MMLUConfig:
    """``python -m train.mmlu`` flags."""

    mmlu_dir: str = cfg_flag("", "MMLU directory (dev/ and test/ CSVs). Required.")
    model_name_or_path: str = cfg_flag(
        "embedded:smollm2",
        "'embedded:smollm2' (the packaged SmolLM2-135M-Instruct), a .gguf file, or a local HF "
        "LLaMA-family directory.",
    )
    delta: str | None = cfg_flag(None, "A SIFT delta (.safetensors) to merge in.")
    dtype: str = cfg_flag(
        "float32",
        "Parameter and compute dtype (bfloat16 is much slower on CPU).",
        choices=["float32", "bfloat16"],
    )
    split: str = cfg_flag("test", "Which split to score.", choices=["test", "val"])
    mmlu_k_shot: int = cfg_flag(0, "Answered dev examples per prompt.")
    subjects: list[str] = cfg_flag([], "Subjects (default: all).")
    max_length: int = cfg_flag(
        2048,
        "Longest prompt in tokens: shots are dropped to fit (as the original code), then "
        "zero-shot prompts are cut from the left. Both are counted in the output.",
    )
    max_questions_per_subject: int | None = cfg_flag(None, "Cap the questions per subject.")
    tokens_per_batch: int = cfg_flag(
        1024, "Padded tokens per forward (on CPU 1024 is as fast as larger batches or faster)."
    )
    max_batch_size: int = cfg_flag(32, "Rows per forward at most.")
    padding_side: str = cfg_flag("right", "Prompt padding side.", choices=["right", "left"])
    no_prefix_cache: bool = cfg_flag(
        False, "Run every prompt in full instead of caching each subject's shared prefix."
    )
    full_logits: bool = cfg_flag(
        False,
        "The straightforward path (full [b, s, vocab] logits, file order, --batch_size rows): "
        "slow, for checking the fast one.",
    )
    batch_size: int = cfg_flag(8, "Rows per batch with --full_logits.")
    output_file: str | None = cfg_flag(None, "Write the results JSON here.")
    progress_file: str | None = cfg_flag(
        None,
        "Record each finished subject here and skip subjects already recorded, so an "
        "interrupted run resumes where it stopped (default with --output_file: "
        "<output_file>.partial.json, removed once the results are written; 'none' turns "
        "it off).",
    )

    def __post_init__(self):
        if not self.mmlu_dir:
            raise ValueError("--mmlu_dir is required (a directory with dev/ and test/ CSVs).")
        if self.mmlu_k_shot < 0 or self.max_length < 1:
            raise ValueError("--mmlu_k_shot must be >= 0 and --max_length >= 1.")


def _file_id(path: str | None) -> list | None:
    """``[size, mtime_ns]`` of a local file (so a progress file is not reused after the
    model or delta at the same path changed); ``None`` for a name that is not a file."""
    if path and os.path.isfile(path):
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]
    return None


def main(argv: Sequence[str] | None = None) -> dict:
    """``python -m train.mmlu --mmlu_dir DIR [--mmlu_k_shot 5] [--delta D] [--output_file F]``.

    Example:
        >>> main(["--mmlu_dir", "data/mmlu", "--delta", "d.safetensors"])  # doctest: +SKIP
    """
    args = parse_args(argv, MMLUConfig, description="MMLU evaluation of a (SIFT-tuned) decoder.")
    logs.setup()
    t0 = time.time()
    model, tok = load_scorer_model(args.model_name_or_path, args.dtype, args.delta)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and args.max_length > context:
        raise ValueError(
            f"--max_length {args.max_length} exceeds the model's context of {context}."
        )
    if args.full_logits:
        f = jax.jit(model.apply_fn)
        scorer: Any = FullLogits(
            lambda ids, mask: f(model.params, jnp.asarray(ids), jnp.asarray(mask)),
            args.batch_size,
        )
    else:
        scorer = DecoderScorer.from_model(
            model,
            tokens_per_batch=args.tokens_per_batch,
            max_batch_size=args.max_batch_size,
            padding_side=args.padding_side,
            prefix_cache=not args.no_prefix_cache,
            verbose=True,
        )
    load_seconds = time.time() - t0
    progress = args.progress_file
    if progress is None and args.output_file:
        progress = args.output_file + ".partial.json"
    if progress == "none":
        progress = None
    settings = {
        k: getattr(args, k)
        for k in ("tokens_per_batch", "max_batch_size", "padding_side", "batch_size")
    } | {"prefix_cache": not args.no_prefix_cache}
    scorer_name = "full_logits" if args.full_logits else "decoder"
    key = {
        "mmlu_dir": os.path.abspath(args.mmlu_dir),
        "model": args.model_name_or_path,
        "model_file": _file_id(args.model_name_or_path),
        "delta": args.delta,
        "delta_file": _file_id(args.delta),
        "dtype": args.dtype,
        "scorer": scorer_name,
        "settings": settings,
    }
    res = evaluate_mmlu(
        scorer,
        tok,
        args.mmlu_dir,
        args.mmlu_k_shot,
        args.subjects or None,
        args.batch_size,
        args.max_length,
        args.max_questions_per_subject,
        verbose=True,
        split=args.split,
        progress_file=progress,
        progress_key=key,
    )
    log.info(
        f"MMLU {args.split} {args.mmlu_k_shot}-shot average accuracy: {res.average:.4f} over "
        f"{res.num_questions} questions ({res.num_fewer_shots} with fewer shots, "
        f"{res.num_truncated} cut to --max_length {args.max_length}); {res.seconds:.0f} s, "
        f"{res.questions_per_second:.2f} questions/s"
    )
    out = res.as_dict()
    out.update(
        {
            "model": args.model_name_or_path,
            "delta": args.delta,
            "dtype": args.dtype,
            "scorer": scorer_name,
            "settings": settings,
            "load_seconds": round(load_seconds, 3),
            "scorer_stats": dict(getattr(scorer, "stats", {})),
            "jax_backend": jax.default_backend(),
            "predictions": {s: "".join(v) for s, v in res.predictions.items()},
        }
    )
    if args.output_file:
        write_json_atomic(args.output_file, out, sort_keys=False)
        if progress and os.path.exists(progress):
            os.remove(progress)
    return out


def cli() -> int:
    """The console entry point (``python -m train.mmlu``): :func:`main` with one-line errors."""
    from train.core.cli import run_main

    return run_main(main, prog="train.mmlu")
