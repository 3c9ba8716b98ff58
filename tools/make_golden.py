"""Regenerates the golden outputs in ``tests/golden/`` with HF's PyTorch implementations.

Run in a SEPARATE venv that has torch (never the project's)::

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch==2.13.0 transformers safetensors gguf numpy accelerate
    /tmp/torchenv/bin/python tools/make_golden.py --minilm DIR --gguf FILE

Writes:
  tests/golden/minilm.npz          MiniLM-L6 (BERT) inputs, last hidden state, pooler output
  tests/golden/tiny_roberta/       random tiny RobertaForSequenceClassification (config +
                                   model.safetensors + a few tokenizer-free inputs)
  tests/golden/tiny_roberta.npz    its inputs, last hidden state and logits
  tests/golden/smollm2.npz         SmolLM2 GGUF (dequantized by transformers' own GGUF loader,
                                   which also undoes the q/k permutation): prompt ids, first
                                   layer output, final logits (sliced), HF greedy continuation
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minilm", required=True, help="the MiniLM HF directory")
    ap.add_argument("--gguf", required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf")
    a = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    minilm(a.minilm)
    tiny_roberta()
    smollm2(a.gguf)


if __name__ == "__main__":
    main()
