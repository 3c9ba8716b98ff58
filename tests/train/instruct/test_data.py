"""Instruction data: templates, loss masks on real tokenizers, truncation, packing, errors."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from train.instruct.data import (
    IGNORE_INDEX,
    PROMPT_NO_INPUT,
    PROMPT_WITH_INPUT,
    RecordError,
    build_arrays,
    encode_record,
    load_records,
    render_alpaca,
    response_loss,
    segment_attention_mask,
    tokenize_records,
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "instruct"


@pytest.fixture(scope="module")
def bpe():
    """Tiny byte-level BPE (GPT-2 / SmolLM2 style) with a ChatML chat template."""
    return AutoTokenizer.from_pretrained(FIXTURES / "tokenizer")


@pytest.fixture(scope="module")
def words():
    """A word-level tokenizer that adds BOS (LLaMA style): every word/punct is one token."""
    vocab = ["<unk>", "<s>", "</s>", "<pad>"]
    text = (
        PROMPT_WITH_INPUT + PROMPT_NO_INPUT + " What is the capital of France ? Paris ."
    ).replace("{instruction}", "")
    for w in pre_tokenizers.Whitespace().pre_tokenize_str(text.replace("{input}", "")):
        if w[0] not in vocab:
            vocab.append(w[0])
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def test_alpaca_templates_are_the_standard_ones():
    assert render_alpaca("Name a fruit.") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a fruit.\n\n### Response:\n"
    )
    assert render_alpaca("Translate.", "Bonjour") == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate.\n\n### Input:\nBonjour\n\n### Response:\n"
    )
    # whitespace-only input counts as no input (as in Stanford Alpaca's data)
    assert render_alpaca("Name a fruit.", "  ") == render_alpaca("Name a fruit.")


def test_loss_mask_hand_checked_with_bos_tokenizer(words):
    rec = {"instruction": "What is the capital of France ?", "input": "", "output": "Paris ."}
    ids, labels = encode_record(words, rec, "alpaca")
    toks = words.convert_ids_to_tokens(ids)
    # Hand-counted: <s> + 31 prompt words/punctuation, then "Paris", "." and EOS.
    assert toks == (
        ["<s>", "Below", "is", "an", "instruction", "that", "describes", "a", "task", "."]
        + ["Write", "a", "response", "that", "appropriately", "completes", "the", "request", "."]
        + ["###", "Instruction", ":", "What", "is", "the", "capital", "of", "France", "?"]
        + ["###", "Response", ":", "Paris", ".", "</s>"]
    )
    n_prompt = 32
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    # The loss sees exactly the 3 response tokens: position t predicts labels[t + 1].
    logits = jnp.zeros((1, len(ids), len(words)))
    logits = logits.at[0, n_prompt - 1, ids[n_prompt]].set(100.0)  # "Paris" predicted
    nll, count = response_loss(logits, jnp.array([labels]), reduction="sum")
    assert int(count[0]) == 3
    expected = 2 * np.log(len(words))  # "." and "</s>" uniform, "Paris" ~free
    np.testing.assert_allclose(float(nll[0]), expected, rtol=1e-5)


def test_loss_mask_byte_bpe_boundary_is_exact(bpe):
    rec = {"instruction": "Add one and one:", "input": "", "output": "two."}
    ids, labels = encode_record(bpe, rec, "alpaca")
    prompt_ids = bpe(render_alpaca(rec["instruction"]))["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    resp = [i for i, la in zip(ids, labels, strict=True) if la != IGNORE_INDEX]
    assert bpe.decode(resp) == "two.<|im_end|>"
    assert labels.index(resp[0]) == len(prompt_ids)


def test_chat_records_train_only_assistant_turns(bpe):
    rec = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And the sky?"},
            {"role": "assistant", "content": "blue"},
        ]
    }
    ids, labels = encode_record(bpe, rec, "alpaca")  # chat records ignore the Alpaca template
    assert bpe.decode(ids) == bpe.apply_chat_template(rec["messages"], tokenize=False)
    mask = np.array(labels) != IGNORE_INDEX
    # The trained spans are exactly the two answers with their end-of-turn markers.
    spans, cur = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            spans.append(bpe.decode(cur))
            cur = []
    spans.append(bpe.decode(cur)) if cur else None
    assert spans == ["Paris.<|im_end|>\n", "blue<|im_end|>\n"]
    # Alpaca records rendered through the chat template: user = instruction + input.
    ids2, labels2 = encode_record(
        bpe, {"instruction": "Classify.", "input": "Great movie", "output": "positive"}, "chat"
    )
    assert bpe.decode(ids2) == (
        "<|im_start|>user\nClassify.\n\nGreat movie<|im_end|>\n<|im_start|>assistant\n"
        "positive<|im_end|>\n"
    )
    assert bpe.decode([i for i, la in zip(ids2, labels2, strict=True) if la >= 0]) == (
        "positive<|im_end|>\n"
    )


def test_truncation_and_fixed_padding(words):
    q = "What is the capital of France ?"  # 32 prompt tokens with <s>
    long = {"instruction": q, "input": "", "output": "Paris . " * 30}  # 32 + 61 tokens
    short = {"instruction": q, "input": "", "output": "Paris ."}  # 32 + 3 tokens
    arr = tokenize_records(words, [long, short], max_length=40)
    assert arr.input_ids.shape == (2, 40)  # longest example (truncated to 40) sets the width
    assert arr.attention_mask.sum(1).tolist() == [40, 35]
    assert (arr.labels[0, 32:] != IGNORE_INDEX).all()  # the truncated response keeps 8 tokens
    assert (arr.labels[0, :32] == IGNORE_INDEX).all()
    assert words.convert_ids_to_tokens(arr.input_ids[0, -2:].tolist()) == ["Paris", "."]
    assert (arr.labels[1, 35:] == IGNORE_INDEX).all() and (arr.input_ids[1, 35:] == 3).all()


def test_examples_with_no_response_left_are_dropped(words):
    short = {"instruction": "What is the capital of France ?", "input": "", "output": "Paris ."}
    with pytest.raises(ValueError, match="No example has a response token"):
        tokenize_records(words, [short], max_length=32)  # the prompt alone fills 32
    ok = {"instruction": "France ?", "input": "", "output": "Paris ."}  # 30 tokens
    arr = tokenize_records(words, [short, ok], max_length=32)
    assert (arr.num_examples, arr.num_dropped) == (1, 1)
    assert arr.input_ids.shape == (1, 32)  # 30 tokens, padded to a multiple of 8


def test_packing_segments_positions_and_mask(words):
    recs = [
        {"instruction": "France ?", "input": "", "output": "Paris ."},  # 27 + 3 tokens
        {"instruction": "France ?", "input": "", "output": "Paris . Paris ."},  # 27 + 5
        {"instruction": "capital ?", "input": "", "output": "Paris"},  # 27 + 2
    ]
    arr = tokenize_records(words, recs, max_length=64, packing=True)
    assert arr.input_ids.shape == (2, 64) and arr.num_examples == 3
    assert arr.segment_ids[0].tolist() == [1] * 30 + [2] * 32 + [0] * 2
    assert arr.segment_ids[1].tolist() == [1] * 29 + [0] * 35
    assert arr.positions[0, 30:34].tolist() == [0, 1, 2, 3]
    assert arr.labels[0, 30] == IGNORE_INDEX  # a segment never predicts across the boundary
    unpacked = tokenize_records(words, recs, max_length=64)
    # Same response tokens in total, whether packed or not.
    assert (arr.labels != IGNORE_INDEX).sum() == (unpacked.labels != IGNORE_INDEX).sum() == 10
    m = segment_attention_mask(jnp.asarray(arr.segment_ids))
    assert bool(m[0, 0, 31, 29]) is False and bool(m[0, 0, 31, 30]) is True
    assert bool(m[0, 0, 29, 30]) is False  # causal
    assert not bool(m[0, 0, 63].any())  # padding attends nowhere


def test_build_arrays_drops_only_responseless_examples():
    arr = build_arrays([([1, 2], [-100, -100]), ([1, 2, 3], [-100, 2, 3])], 8, 0)
    assert (arr.num_examples, arr.num_dropped) == (1, 1)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_load_local_jsonl_and_json(tmp_path):
    rows = [
        {"instruction": "a", "input": "b", "output": "c"},
        {"instruction": "d", "output": "e"},
    ]
    p = _write_jsonl(tmp_path / "d.jsonl", rows)
    assert load_records(p) == [
        {"instruction": "a", "input": "b", "output": "c"},
        {"instruction": "d", "input": "", "output": "e"},
    ]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert load_records(str(tmp_path / "d.json"), max_samples=1) == load_records(p)[:1]
    chat = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ]
    q = _write_jsonl(tmp_path / "c.jsonl", chat)
    assert load_records(q) == chat


def test_malformed_records_name_file_row_and_key(tmp_path):
    p = _write_jsonl(
        tmp_path / "bad.jsonl",
        [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "x"}],
    )
    with pytest.raises(RecordError, match=r"bad\.jsonl, row 1: missing key 'output'"):
        load_records(p)
    q = _write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}],
    )
    with pytest.raises(
        RecordError, match=r"chat\.jsonl, row 0: messages\[1\] has no string 'content'"
    ):
        load_records(q)
    r = _write_jsonl(tmp_path / "noasst.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(RecordError, match="no 'assistant' message"):
        load_records(r)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(RecordError, match=r"broken\.json: could not be read"):
        load_records(str(tmp_path / "broken.json"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_records(str(tmp_path / "missing.jsonl"))


def test_hub_name_offline_gives_a_clear_error():
    with pytest.raises(RuntimeError, match="neither a local file nor a loadable hub dataset"):
        load_records("no-such-org/no-such-dataset-xyz")
