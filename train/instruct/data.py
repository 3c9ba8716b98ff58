"""Instruction-tuning data: Alpaca / chat records -> fixed-length token arrays with a loss mask.

Records come in two formats:

* **Alpaca**: ``{"instruction": str, "input": str (optional), "output": str}``, rendered with
  the standard Alpaca prompt (:data:`PROMPT_WITH_INPUT` / :data:`PROMPT_NO_INPUT`) or, with
  ``template="chat"``, as a user/assistant exchange through the tokenizer's chat template.
* **Chat**: ``{"messages": [{"role": ..., "content": ...}, ...]}``, rendered with
  ``tokenizer.apply_chat_template``; every assistant turn is a response.

The loss is taken only on response tokens: ``labels`` is ``-100`` on every prompt, template and
padding token (the same convention as HF / Stanford Alpaca), and :func:`response_loss` shifts
``labels`` by one so position ``t`` predicts token ``t + 1``. Sequences are right-truncated to
``max_length`` and right-padded to one fixed length for the whole dataset (so ``jax.jit``
compiles once). With ``packing=True`` several examples share a row; ``segment_ids`` (1, 2, ...,
0 for padding) and per-segment ``positions`` then tell the model where one example ends, and
the model must mask attention across segments (see :func:`segment_attention_mask`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = -100

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
TEMPLATES = ("alpaca", "chat", "plain")


class RecordError(ValueError):
    """A malformed instruction record (the message names the source, the row and the key)."""


def render_alpaca(instruction: str, input: str = "", template: str = "alpaca") -> str:
    """The prompt of an Alpaca record (everything before the response).

    Args:
        instruction: the task.
        input: optional context; an empty/whitespace input selects the no-input variant.
        template: ``"alpaca"`` (the Stanford Alpaca prompt) or ``"plain"`` (instruction, a
            blank line and the input, then a newline).

    Example:
        >>> render_alpaca("Add.", "1+1").endswith("### Input:\\n1+1\\n\\n### Response:\\n")
        True
        >>> "### Input" in render_alpaca("Say hi.")
        False
    """
    has_input = bool(input and input.strip())
    if template == "plain":
        return instruction + (f"\n\n{input}" if has_input else "") + "\n"
    if has_input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def alpaca_to_messages(record: dict) -> list[dict]:
    """An Alpaca record as a user/assistant exchange (for chat-template rendering).

    Example:
        >>> alpaca_to_messages({"instruction": "Add.", "input": "1+1", "output": "2"})
        [{'role': 'user', 'content': 'Add.\\n\\n1+1'}, {'role': 'assistant', 'content': '2'}]
    """
    user = record["instruction"]
    if record.get("input") and str(record["input"]).strip():
        user = f"{user}\n\n{record['input']}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def record_format(record: dict) -> str:
    """``"chat"`` for records with ``messages``, else ``"alpaca"``.

    Example:
        >>> record_format({"messages": []}), record_format({"instruction": "x", "output": "y"})
        ('chat', 'alpaca')
    """
    return "chat" if "messages" in record else "alpaca"


def validate_record(record: Any, source: str, row: int) -> dict:
    """Checks one record and returns it normalised (``input`` defaults to ``""``).

    Raises:
        RecordError: naming ``source``, ``row`` and the missing / malformed key.

    Example:
        >>> validate_record({"instruction": "Hi", "output": "Hello"}, "d.json", 0)["input"]
        ''
        >>> try:
        ...     validate_record({"instruction": "Hi"}, "d.json", 3)
        ... except RecordError as e:
        ...     print(str(e)[:35])
        d.json, row 3: missing key 'output'
    """
    where = f"{source}, row {row}"
    if not isinstance(record, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    if record.get("messages") is not None:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise RecordError(f"{where}: 'messages' must be a non-empty list of {{role, content}}.")
        for j, m in enumerate(msgs):
            for key in ("role", "content"):
                if not isinstance(m, dict) or not isinstance(m.get(key), str):
                    raise RecordError(
                        f"{where}: messages[{j}] has no string {key!r} (each message needs "
                        "'role' and 'content')."
                    )
        if not any(m["role"] == "assistant" for m in msgs):
            raise RecordError(f"{where}: no 'assistant' message, so nothing to train on.")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}
    for key in ("instruction", "output"):
        if record.get(key) is None:
            raise RecordError(
                f"{where}: missing key {key!r} (Alpaca records need 'instruction' and 'output', "
                "optionally 'input'; chat records need 'messages')."
            )
        if not isinstance(record[key], str):
            raise RecordError(f"{where}: {key!r} must be a string, got {record[key]!r}.")
    inp = record.get("input") or ""
    if not isinstance(inp, str):
        raise RecordError(f"{where}: 'input' must be a string, got {inp!r}.")
    return {"instruction": record["instruction"], "input": inp, "output": record["output"]}


def load_records(
    data_path: str | Sequence[str], split: str = "train", max_samples: int | None = None
) -> list[dict]:
    """Loads and validates instruction records from local JSON/JSONL files or a hub dataset.

    Local files are read with ``datasets.load_dataset("json", data_files=...)``; anything that
    is not an existing path is treated as a hub dataset name (which needs internet).

    Args:
        data_path: a ``.json`` / ``.jsonl`` file, a list of them, a directory of them, or a hub
            dataset name such as ``"tatsu-lab/alpaca"``.
        split: the hub split to read.
        max_samples: keep only the first ``max_samples`` records.

    Returns:
        Validated records (see :func:`validate_record`).

    Example:
        >>> import json, tempfile, os
        >>> d = tempfile.mkdtemp(); p = os.path.join(d, "a.jsonl")
        >>> _ = open(p, "w").write(json.dumps({"instruction": "Hi", "output": "Yo"}) + "\\n")
        >>> load_records(p)
        [{'instruction': 'Hi', 'input': '', 'output': 'Yo'}]
    """
    import datasets

    paths = [data_path] if isinstance(data_path, str) else list(data_path)
    if all(os.path.exists(p) for p in paths):
        files: list[str] = []
        for p in paths:
            if os.path.isdir(p):
                files += sorted(
                    os.path.join(p, f) for f in os.listdir(p) if f.endswith((".json", ".jsonl"))
                )
            else:
                files.append(p)
        if not files:
            raise FileNotFoundError(f"No .json/.jsonl files in {paths}.")
        records: list[dict] = []
        for f in files:
            try:
                ds = datasets.load_dataset("json", data_files=f, split="train")
            except Exception as e:  # noqa: BLE001 - re-raised with the file named
                raise RecordError(f"{f}: could not be read as JSON/JSONL records: {e}") from e
            for i, rec in enumerate(ds):
                records.append(validate_record(rec, f, i))
                if max_samples is not None and len(records) >= max_samples:
                    return records
        return records
    missing = [p for p in paths if not os.path.exists(p)]
    looks_local = lambda p: p.endswith((".json", ".jsonl")) or p.startswith((".", "/", "~"))
    if len(paths) > 1 or any(looks_local(p) for p in missing):
        raise FileNotFoundError(f"--data_path: no such file(s): {missing}.")
    name = paths[0]
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(
            f"--data_path {name!r} is neither a local file nor a loadable hub dataset ({e}). "
            "Without internet, download the data elsewhere and pass the local JSON/JSONL file."
        ) from e
    out = []
    for i, rec in enumerate(ds):
        out.append(validate_record(rec, name, i))
        if max_samples is not None and len(out) >= max_samples:
            break
    return out


def _encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def chat_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """Splits a rendered chat into ``(text, is_response)`` pieces.

    Each assistant turn's piece is what the template adds for that message after the
    generation prompt (its content and end-of-turn marker); everything else is prompt.

    Example:
        >>> class T:
        ...     def apply_chat_template(self, m, tokenize, add_generation_prompt=False):
        ...         s = "".join(f"<{x['role']}>{x['content']}</s>" for x in m)
        ...         return s + ("<assistant>" if add_generation_prompt else "")
        >>> chat_segments(T(), [{"role": "user", "content": "hi"},
        ...                     {"role": "assistant", "content": "yo"}])
        [('<user>hi</s><assistant>', False), ('yo</s>', True)]
    """
    out: list[tuple[str, bool]] = []
    prev = ""
    for j, m in enumerate(messages):
        full = tokenizer.apply_chat_template(messages[: j + 1], tokenize=False)
        if m["role"] == "assistant":
            head = tokenizer.apply_chat_template(
                messages[:j], tokenize=False, add_generation_prompt=True
            )
            if not (head.startswith(prev) and full.startswith(head)):
                raise ValueError(
                    "The chat template does not render conversations prefix by prefix, so "
                    "response tokens cannot be located; use --prompt_template alpaca."
                )
            out.append((head[len(prev) :], False))
            out.append((full[len(head) :], True))
        else:
            if not full.startswith(prev):
                raise ValueError(
                    "The chat template does not render conversations prefix by prefix."
                )
            out.append((full[len(prev) :], False))
        prev = full
    merged: list[tuple[str, bool]] = []
    for t, r in out:
        if merged and merged[-1][1] == r:
            merged[-1] = (merged[-1][0] + t, r)
        elif t:
            merged.append((t, r))
    return merged


def encode_record(
    tokenizer, record: dict, template: str = "alpaca", max_length: int | None = None
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one record; labels are :data:`IGNORE_INDEX` off the response.

    Alpaca prompts are tokenized with the tokenizer's special tokens (e.g. a BOS) and the
    response without, then EOS is appended, so the prompt/response boundary is exact. Chat
    pieces are tokenized without special tokens (the template writes them). The result is
    right-truncated to ``max_length``.

    Example:
        >>> class Tok:
        ...     eos_token_id = 0
        ...     def __call__(self, text, add_special_tokens=True):
        ...         return {"input_ids": [len(w) for w in text.split()]}
        >>> encode_record(Tok(), {"instruction": "x", "input": "", "output": "ab c"}, "plain")
        ([1, 2, 1, 0], [-100, 2, 1, 0])
    """
    if template not in TEMPLATES:
        raise ValueError(f"Unknown prompt template {template!r}; use one of {TEMPLATES}.")
    if "messages" in record or template == "chat":
        msgs = record["messages"] if "messages" in record else alpaca_to_messages(record)
        ids: list[int] = []
        labels: list[int] = []
        for text, is_resp in chat_segments(tokenizer, msgs):
            t = _encode(tokenizer, text, add_special_tokens=False)
            ids += t
            labels += t if is_resp else [IGNORE_INDEX] * len(t)
    else:
        prompt = _encode(
            tokenizer, render_alpaca(record["instruction"], record["input"], template), True
        )
        resp = _encode(tokenizer, record["output"], add_special_tokens=False)
        if tokenizer.eos_token_id is not None:
            resp.append(tokenizer.eos_token_id)
        ids = prompt + resp
        labels = [IGNORE_INDEX] * len(prompt) + resp
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass
class InstructArrays:
    """A tokenized instruction dataset as fixed-shape numpy arrays (one row = one sequence).

    Attributes:
        input_ids: ``[rows, length]`` int32, padded with ``pad_id``.
        labels: ``[rows, length]`` int32, :data:`IGNORE_INDEX` on non-response tokens.
        attention_mask: ``[rows, length]`` int32, 1 on real tokens.
        segment_ids: ``[rows, length]`` int32, 1.. per packed example, 0 on padding.
        positions: ``[rows, length]`` int32 position ids (restart at 0 in each segment).
        num_examples: examples packed into the rows.
        num_dropped: examples dropped because truncation left no response token.
    """

    input_ids: np.ndarray
    labels: np.ndarray
    attention_mask: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    num_examples: int
    num_dropped: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, idx: np.ndarray, packed: bool = False) -> dict[str, np.ndarray]:
        """Rows ``idx`` as a batch dict (segments/positions only when ``packed``).

        Example:
            >>> a = build_arrays([([5, 6], [-100, 6])], 8, 0)
            >>> sorted(a.batch(np.array([0]), packed=True))
            ['attention_mask', 'input_ids', 'labels', 'positions', 'segment_ids']
        """
        out = {
            "input_ids": self.input_ids[idx],
            "labels": self.labels[idx],
            "attention_mask": self.attention_mask[idx],
        }
        if packed:
            out["segment_ids"] = self.segment_ids[idx]
            out["positions"] = self.positions[idx]
        return out


def build_arrays(
    examples: Sequence[tuple[list[int], list[int]]],
    max_length: int,
    pad_id: int,
    packing: bool = False,
    pad_to_multiple_of: int = 8,
) -> InstructArrays:
    """Pads (or packs) encoded examples into fixed-shape arrays.

    Without packing, the row length is the longest example rounded up to
    ``pad_to_multiple_of`` (at most ``max_length``): one shape per dataset. With packing, rows
    are exactly ``max_length`` long and examples are placed greedily in order, each whole
    example in one row (no example is split across rows). Examples with no response token
    left are dropped and counted.

    Example:
        >>> a = build_arrays([([5, 6, 7], [-100, 6, 7]), ([8, 9], [-100, 9])], 8, 0, True)
        >>> a.input_ids.tolist(), a.segment_ids.tolist(), a.positions.tolist()
        ([[5, 6, 7, 8, 9, 0, 0, 0]], [[1, 1, 1, 2, 2, 0, 0, 0]], [[0, 1, 2, 0, 1, 0, 0, 0]])
    """
    kept = [(i[:max_length], la[:max_length]) for i, la in examples]
    kept = [(i, la) for i, la in kept if any(x != IGNORE_INDEX for x in la)]
    dropped = len(examples) - len(kept)
    if not kept:
        raise ValueError(
            f"No example has a response token within --model_max_length {max_length} "
            f"({dropped} dropped); raise --model_max_length."
        )
    rows: list[list[tuple[list[int], list[int]]]] = []
    if packing:
        length = max_length
        fill = 0
        for ex in kept:
            if not rows or fill + len(ex[0]) > length:
                rows.append([])
                fill = 0
            rows[-1].append(ex)
            fill += len(ex[0])
    else:
        length = min(max_length, _round_up(max(len(i) for i, _ in kept), pad_to_multiple_of))
        rows = [[ex] for ex in kept]
    n = len(rows)
    ids = np.full((n, length), pad_id, np.int32)
    labels = np.full((n, length), IGNORE_INDEX, np.int32)
    seg = np.zeros((n, length), np.int32)
    pos = np.zeros((n, length), np.int32)
    for r, row in enumerate(rows):
        at = 0
        for s, (i, la) in enumerate(row, start=1):
            m = len(i)
            ids[r, at : at + m] = i
            labels[r, at : at + m] = la
            labels[r, at] = IGNORE_INDEX  # a segment's first token is never predicted
            seg[r, at : at + m] = s
            pos[r, at : at + m] = np.arange(m)
            at += m
    return InstructArrays(ids, labels, (seg > 0).astype(np.int32), seg, pos, len(kept), dropped)


def tokenize_records(
    tokenizer,
    records: Sequence[dict],
    max_length: int,
    template: str = "alpaca",
    packing: bool = False,
) -> InstructArrays:
    """Encodes records (:func:`encode_record`) and pads/packs them (:func:`build_arrays`).

    Example:
        >>> class Tok:
        ...     eos_token_id, pad_token_id = 0, 0
        ...     def __call__(self, text, add_special_tokens=True):
        ...         return {"input_ids": [len(w) for w in text.split()]}
        >>> a = tokenize_records(Tok(), [{"instruction": "x", "input": "", "output": "y"}], 16,
        ...                      "plain")
        >>> a.input_ids.shape, a.labels[0, :3].tolist()
        ((1, 8), [-100, 1, 0])
    """
    examples = [encode_record(tokenizer, r, template, max_length) for r in records]
    return build_arrays(examples, max_length, pad_token_id(tokenizer), packing)


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padding is masked out anyway).

    Example:
        >>> class T: pad_token_id, eos_token_id = None, 2
        >>> pad_token_id(T())
        2
    """
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if v is not None:
            return int(v)
    return 0


def segment_attention_mask(segment_ids: jax.Array) -> jax.Array:
    """``[batch, 1, q, k]`` bool mask: causal, within one segment, never to padding.

    Example:
        >>> m = segment_attention_mask(jnp.array([[1, 1, 2, 0]]))
        >>> m[0, 0].astype(int).tolist()
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    """
    n = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((n, n), bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    real = (segment_ids > 0)[:, None, :] & (segment_ids > 0)[:, :, None]
    return (causal[None] & same & real)[:, None]


def response_loss(
    logits: jax.Array, labels: jax.Array, reduction: str = "mean"
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Next-token cross-entropy on response tokens only (labels shifted by one inside).

    Args:
        logits: ``[batch, seq, vocab]``; position ``t`` predicts token ``t + 1``.
        labels: ``[batch, seq]`` with :data:`IGNORE_INDEX` where no loss is taken.
        reduction: ``"mean"`` (over all response tokens of the batch) or ``"sum"``, which
            returns ``(per_example_nll_sum, per_example_token_count)``.

    Example:
        >>> logits = jnp.zeros((1, 3, 4))
        >>> float(response_loss(logits, jnp.array([[-100, 1, 2]])))  # log(4)
        1.3862943649291992
    """
    lg = logits[:, :-1].astype(jnp.float32)
    tgt = labels[:, 1:]
    mask = tgt != IGNORE_INDEX
    logz = jax.nn.logsumexp(lg, axis=-1)
    picked = jnp.take_along_axis(lg, jnp.where(mask, tgt, 0)[..., None], axis=-1)[..., 0]
    nll = jnp.where(mask, logz - picked, 0.0)
    if reduction == "sum":
        return nll.sum(-1), mask.sum(-1)
    return nll.sum() / jnp.maximum(mask.sum(), 1)
