"""Regenerates the golden outputs in ``tests/golden/`` with HF's PyTorch implementations.

Run in a SEPARATE venv that has torch (never the project's)::

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch==2.13.0 transformers safetensors gguf numpy accelerate
    /tmp/torchenv/bin/python tools/make_golden.py --minilm DIR --gguf FILE
    /tmp/torchenv/bin/python tools/make_golden.py --parts tiny_qwen2 tiny_mistral  # only those

Writes:
  tests/golden/minilm.npz          MiniLM-L6 (BERT) inputs, last hidden state, pooler output
  tests/golden/tiny_roberta/       random tiny RobertaForSequenceClassification (config +
                                   model.safetensors + a few tokenizer-free inputs)
  tests/golden/tiny_roberta.npz    its inputs, last hidden state and logits
  tests/golden/smollm2.npz         SmolLM2 GGUF (dequantized by transformers' own GGUF loader,
                                   which also undoes the q/k permutation): prompt ids, first
                                   layer output, final logits (sliced), HF greedy continuation
  tests/golden/tiny_qwen2/         random tiny Qwen2ForCausalLM (q/k/v biases, tied embeddings;
                                   weights rounded to and stored as float16, a few KB)
  tests/golden/tiny_mistral/       random tiny MistralForCausalLM (sliding_window=4, head_dim 8
                                   != hidden / heads, untied lm_head; float16 as above)
  tests/golden/tiny_{qwen2,mistral}.npz  a left-padded batch (ids, mask, HF logits with
                                   position_ids = cumsum(mask) - 1) and HF's greedy continuation
                                   of a prompt longer than the window
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parents[1] / "tests" / "golden"
SENTENCES = [
    "A man is playing a guitar.",
    "Someone is playing an instrument.",
    "The stock market fell sharply today.",
]
PROMPT = "The capital of France is"


def minilm(model_dir: str) -> None:
    from transformers import AutoTokenizer, BertModel

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = BertModel.from_pretrained(model_dir).eval()
    b = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**b)
    np.savez_compressed(
        OUT / "minilm.npz",
        input_ids=b["input_ids"].numpy().astype(np.int32),
        attention_mask=b["attention_mask"].numpy().astype(np.int32),
        token_type_ids=b["token_type_ids"].numpy().astype(np.int32),
        last_hidden_state=out.last_hidden_state.numpy().astype(np.float32),
        pooler_output=out.pooler_output.numpy().astype(np.float32),
    )


def tiny_roberta() -> None:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    cfg = RobertaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        layer_norm_eps=1e-5,
        num_labels=3,
    )
    model = RobertaForSequenceClassification(cfg).eval()
    with torch.no_grad():  # make every weight (LayerNorms, biases too) non-trivial
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] == 32 else 0))
    d = OUT / "tiny_roberta"
    model.save_pretrained(d, safe_serialization=True)
    ids = torch.tensor(
        [[0, 5, 17, 42, 99, 8, 2, 1, 1], [0, 33, 7, 2, 1, 1, 1, 1, 1], [0, 3, 4, 5, 6, 7, 8, 9, 2]]
    )
    mask = (ids != 1).long()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    np.savez_compressed(
        OUT / "tiny_roberta.npz",
        input_ids=ids.numpy().astype(np.int32),
        attention_mask=mask.numpy().astype(np.int32),
        last_hidden_state=out.hidden_states[-1].numpy().astype(np.float32),
        logits=out.logits.numpy().astype(np.float32),
    )


def smollm2(gguf_file: str) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    p = Path(gguf_file)
    tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    model = LlamaForCausalLM.from_pretrained(
        p.parent, gguf_file=p.name, torch_dtype=torch.float32
    ).eval()
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    logits = out.logits[0].numpy().astype(np.float32)
    np.savez_compressed(
        OUT / "smollm2.npz",
        input_ids=ids.numpy().astype(np.int32),
        layer1=out.hidden_states[1][0].numpy().astype(np.float32),  # output of layer 0
        logits_last=logits[-1],  # full vocab at the last position
        logits_head=logits[:, :2048],  # all positions, first 2048 vocab entries
        greedy=gen[0, ids.shape[1] :].numpy().astype(np.int32),
    )
    print("HF greedy:", repr(tok.decode(gen[0, ids.shape[1] :])))


TINY_DECODER = dict(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=1,
    attn_implementation="eager",
)
DECODER_IDS = [[3, 17, 5, 9, 30, 2, 11, 7, 21, 4, 13, 8], [0, 0, 0, 6, 19, 27, 3, 3, 10, 15, 2, 9]]
DECODER_PROMPT = [[3, 17, 5, 9, 30, 2, 11]]


def tiny_decoder(name: str, model_cls: type, cfg: object, seed: int) -> None:
    """A random tiny decoder (every weight, biases and norms too, non-trivial and exactly
    representable in float16), its HF directory (float16) and golden outputs (float32)."""
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            init = torch.randn_like(p) * (0.1 if n.endswith("bias") else 0.3)
            p.copy_((init + (1.0 if "norm" in n else 0.0)).half().float())
    ids = torch.tensor(DECODER_IDS)
    mask = (torch.arange(ids.shape[1])[None] >= torch.tensor([[0], [3]])).long()
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as HF's generate
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        model.generation_config.eos_token_id = None
        prompt = torch.tensor(DECODER_PROMPT)
        gen = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    model.half().save_pretrained(OUT / f"tiny_{name}", safe_serialization=True)
    np.savez_compressed(
        OUT / f"tiny_{name}.npz",
        input_ids=ids.numpy().astype(np.int32),
        attention_mask=mask.numpy().astype(np.int32),
        logits=logits.numpy().astype(np.float32),
        prompt=prompt.numpy().astype(np.int32),
        greedy=gen[0, prompt.shape[1] :].numpy().astype(np.int32),
    )


def tiny_qwen2() -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**TINY_DECODER, tie_word_embeddings=True, rope_theta=1000.0)
    tiny_decoder("qwen2", Qwen2ForCausalLM, cfg, seed=1)


def tiny_mistral() -> None:
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(**TINY_DECODER, head_dim=8, sliding_window=4, tie_word_embeddings=False)
    tiny_decoder("mistral", MistralForCausalLM, cfg, seed=2)


PARTS = ("minilm", "tiny_roberta", "smollm2", "tiny_qwen2", "tiny_mistral")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minilm", help="the MiniLM HF directory (part minilm)")
    ap.add_argument("--gguf", help="SmolLM2-135M-Instruct.Q4_1.gguf (part smollm2)")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    a = ap.parse_args()
    for part, arg in (("minilm", a.minilm), ("smollm2", a.gguf)):
        if part in a.parts and not arg:
            ap.error(f"part {part} needs --{'minilm' if part == 'minilm' else 'gguf'}")
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    if "minilm" in a.parts:
        minilm(a.minilm)
    if "tiny_roberta" in a.parts:
        tiny_roberta()
    if "smollm2" in a.parts:
        smollm2(a.gguf)
    if "tiny_qwen2" in a.parts:
        tiny_qwen2()
    if "tiny_mistral" in a.parts:
        tiny_mistral()


if __name__ == "__main__":
    main()
