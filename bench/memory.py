"""Train-step memory of full FT, LoRA, SIFT (simple path) and SIFT (compact path), compile only.

Run: ``python -m bench.memory [--models bert-base roberta-large llama-7b] [--rate 0.01]``

Nothing is allocated: each model is built with ``nnx.eval_shape`` and the trainer's own setup
(``train.core.fit.setup``: the method, its optimizer state and the jitted train step) is
lowered and compiled for abstract inputs; XLA's
``memory_analysis()`` gives argument, output, alias and temporary bytes. Gradient and optimizer
state bytes are the sizes of the trees ``jax.grad`` and ``optimizer.init`` produce. LoRA's rank
is chosen so its trainable parameter count matches SIFT's. Ratios are against full FT of the same
model in the same process.

The Llama-7B-shaped model is built with ``--llama_layers`` layers (default 2) and every
per-layer byte count is extrapolated linearly to 32 layers (embeddings and head counted once).
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sift_jax.paths import flatten_paths
from train.core.config import TrainConfig
from train.core.fit import setup
from train.core.mesh import parse_mesh
from train.core.task import Task
from train.models.decoder import LlamaConfig, LlamaForCausalLM
from train.models.encoder import (
    EncoderConfig,
    EncoderForSequenceClassification,
    classifier_apply_fn,
)
from train.models.functional import functional_apply

MODELS = {
    "bert-base": dict(
        kind="encoder",
        cfg=EncoderConfig(),
        batch=32,
        seq=128,
        sparse=r"attention/(query|key|value|output)/",
        dense="classifier",
    ),
    "roberta-large": dict(
        kind="encoder",
        cfg=EncoderConfig(
            model_type="roberta",
            vocab_size=50265,
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            max_position_embeddings=514,
            type_vocab_size=1,
            pad_token_id=1,
            layer_norm_eps=1e-5,
        ),
        batch=8,
        seq=128,
        sparse=r"attention/(query|key|value|output)/",
        dense="classifier",
    ),
    "llama-7b": dict(
        kind="decoder",
        cfg=LlamaConfig(param_dtype="bfloat16", dtype="bfloat16"),
        batch=1,
        seq=2048,
        sparse=r"(q|k|v|o|gate|up|down)_proj",
        dense=None,
    ),
}


def tree_bytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def abstract_model(spec, layers: int | None, remat: bool):
    cfg = spec["cfg"]
    if layers is not None:
        cfg = dataclasses.replace(cfg, num_hidden_layers=layers)
    cfg = dataclasses.replace(cfg, remat=remat)
    cls = EncoderForSequenceClassification if spec["kind"] == "encoder" else LlamaForCausalLM
    model = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model, nnx.Param)
    return cfg, graphdef, nnx.to_pure_dict(state)


def make_task(spec, graphdef, batch, seq):
    if spec["kind"] == "encoder":
        apply_fn = classifier_apply_fn(graphdef, dropout=False)

        def loss_fn(logits, b):
            return optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"]).mean()

        shapes = {
            "input_ids": (batch, seq),
            "attention_mask": (batch, seq),
            "token_type_ids": (batch, seq),
            "labels": (batch,),
        }
    else:

        def apply_fn(p, b, rng, train):
            return functional_apply(
                graphdef, p, None, b["input_ids"], b["attention_mask"], deterministic=True
            )

        def loss_fn(logits, b):
            return optax.softmax_cross_entropy_with_integer_labels(
                logits[:, :-1].astype(jnp.float32), b["input_ids"][:, 1:]
            ).mean()

        shapes = {"input_ids": (batch, seq), "attention_mask": (batch, seq)}
    task = Task(apply_fn, loss_fn, 1, None)
    return task, {k: jax.ShapeDtypeStruct(v, jnp.int32) for k, v in shapes.items()}


def method_config(spec, ftype, rate, lora_rank=8, **kw) -> TrainConfig:
    """The trainer config of a benchmark row (paper recipe targets for the model family)."""
    return TrainConfig(
        finetuning_type=ftype,
        sparse_rate=rate,
        sparse_module=[spec["sparse"]],
        sparse_exception=[spec["dense"]] if spec["dense"] else [],
        lora_targets=[spec["sparse"]],
        lora_exception=[spec["dense"]] if spec["dense"] else [],
        lora_rank=lora_rank,
        max_grad_norm=1.0,
        mesh="data=1",
        per_device_train_batch_size=spec["batch"],
        max_steps=100,
        **kw,
    )


def _setup(spec, params, graphdef, cfg):
    task, batch = make_task(spec, graphdef, spec["batch"], spec["seq"])
    mesh = parse_mesh("data=1", jax.devices()[:1])
    return setup(cfg, task, params, mesh, train_size=spec["batch"]), batch


def _total(mem) -> int:
    return (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )


def measure(spec, params, graphdef, ftype, rate, lora_rank=8):
    """Compiled bytes of the trainer's own train step for one method (abstract inputs)."""
    s, batch = _setup(spec, params, graphdef, method_config(spec, ftype, rate, lora_rank))
    st = s.state
    compiled = s.train_step.lower(
        st.trainable, st.opt_state, st.buffers, s.frozen, batch, jax.random.key(0)
    ).compile()
    mem = compiled.memory_analysis()
    return dict(
        trainable=s.method.num_trainable,
        grad=tree_bytes(st.trainable),  # what jax.grad returns
        opt=tree_bytes(st.opt_state),
        temp=mem.temp_size_in_bytes,
        total=_total(mem),
        weights=tree_bytes(params),
    )


def measure_selection(spec, params, graphdef, rate, in_backward: bool):
    """Compiled bytes of the SIFT selection step: top-k inside the backward (the default) vs
    an accumulated dense ``|g|`` score (``--selection_steps 2``'s last step)."""
    kw = {} if in_backward else {"selection_steps": 2}
    s, batch = _setup(spec, params, graphdef, method_config(spec, "sift", rate, **kw))
    st = s.state
    score = {} if in_backward else jax.eval_shape(s.method.plan.zero_score, st.buffers)
    step = s.phase_step("select").jitted
    mem = (
        step.lower(
            st.trainable,
            st.opt_state,
            st.buffers,
            s.frozen,
            score,
            batch,
            jax.random.key(0),
            0,
            last=True,
        )
        .compile()
        .memory_analysis()
    )
    return mem.temp_size_in_bytes + mem.argument_size_in_bytes


def lora_rank_matching(params, spec, target_params: int) -> int:
    import re

    per_rank = sum(
        x.shape[0] + math.prod(x.shape[1:])
        for p, x in flatten_paths(params).items()
        if re.search(spec["sparse"], p) and p.endswith("kernel")
    )
    dense = sum(
        math.prod(x.shape)
        for p, x in flatten_paths(params).items()
        if spec["dense"] and re.search(spec["dense"], p)
    )
    return max(1, round((target_params - dense) / per_rank))


def run_model(name, rate, llama_layers, remat):
    spec = MODELS[name]
    layers = llama_layers if spec["kind"] == "decoder" else None
    full_layers = spec["cfg"].num_hidden_layers
    results = {}
    for nl in [layers, layers * 2] if layers else [None]:
        cfg, graphdef, params = abstract_model(spec, nl, remat)
        sift = measure(spec, params, graphdef, "sift", rate)
        r = lora_rank_matching(params, spec, sift["trainable"])
        rows = {
            "full FT": measure(spec, params, graphdef, "full", rate),
            f"LoRA (r={r})": measure(spec, params, graphdef, "lora", rate, lora_rank=r),
            "SIFT compact path": sift,
        }
        results[nl] = rows
    if layers:  # extrapolate per layer: f(L) = a + b L from L and 2L
        out = {}
        for key in results[layers]:
            lo, hi = results[layers][key], results[layers * 2][key]
            out[key] = {f: lo[f] + (hi[f] - lo[f]) / layers * (full_layers - layers) for f in lo}
        return out, f"{full_layers} layers extrapolated from {layers} and {2 * layers}"
    return results[None], f"{full_layers} layers"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--rate", type=float, default=0.01)
    ap.add_argument("--llama_layers", type=int, default=2)
    ap.add_argument("--remat", action="store_true", help="gradient checkpointing per layer")
    ap.add_argument(
        "--selection",
        action="store_true",
        help="also compare the selection step: top-k in backward vs dense gradient",
    )
    args = ap.parse_args(argv)
    gb = 2**30
    print(
        f"backend: {jax.devices()[0].platform} ({jax.devices()[0].device_kind}); rate {args.rate}; "
        f"remat {args.remat}"
    )
    all_rows = {}
    for name in args.models:
        rows, note = run_model(name, args.rate, args.llama_layers, args.remat)
        spec = MODELS[name]
        print(f"\n{name} ({note}), batch {spec['batch']} x seq {spec['seq']}")
        print(
            f"{'method':22s} {'trainable':>12s} {'grads GB':>9s} {'opt GB':>8s} "
            f"{'grad+opt':>9s} {'step total GB':>14s} {'total':>7s}"
        )
        base = rows["full FT"]
        for key, r in rows.items():
            go = (r["grad"] + r["opt"]) / (base["grad"] + base["opt"])
            print(
                f"{key:22s} {r['trainable']:12,.0f} {r['grad'] / gb:9.3f} {r['opt'] / gb:8.3f} "
                f"{go:8.4f}x {r['total'] / gb:14.3f} {r['total'] / base['total']:6.3f}x",
                flush=True,
            )
        all_rows[name] = rows
        if args.selection and MODELS[name]["kind"] == "encoder":
            _, graphdef, params = abstract_model(MODELS[name], None, args.remat)
            a = measure_selection(MODELS[name], params, graphdef, args.rate, True)
            b = measure_selection(MODELS[name], params, graphdef, args.rate, False)
            print(
                f"selection step (args + temp): top-k in backward {a / gb:.3f} GB vs dense "
                f"gradient + score {b / gb:.3f} GB = {a / b:.3f}x"
            )
    return all_rows


if __name__ == "__main__":
    main()
