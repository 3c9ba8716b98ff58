"""Train-step memory of full FT, LoRA, SIFT (simple path) and SIFT (compact path), compile only.

Run: ``python -m bench.memory [--models bert-base roberta-large llama-7b] [--rate 0.01]``

Nothing is allocated: each model is built with ``nnx.eval_shape`` and the trainer's own jitted
step (``train.trainer.make_train_step``) is lowered and compiled for abstract inputs; XLA's
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

from train.config import TrainConfig
from train.methods import build_method, flatten_paths, make_schedule
from train.models.decoder import LlamaConfig, LlamaForCausalLM
from train.models.encoder import (
    EncoderConfig,
    EncoderForSequenceClassification,
    classifier_apply_fn,
)
from train.models.functional import functional_apply
from train.trainer import Task, make_train_step

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


def measure(spec, params, graphdef, ftype, rate, lora_rank=8, sift_path="compact"):
    cfg = TrainConfig(
        finetuning_type=ftype,
        sparse_rate=rate,
        sparse_module=[spec["sparse"]],
        sparse_exception=[spec["dense"]] if spec["dense"] else [],
        lora_targets=[spec["sparse"]],
        lora_exception=[spec["dense"]] if spec["dense"] else [],
        lora_rank=lora_rank,
        sift_path=sift_path,
        max_grad_norm=1.0,
    )
    method = build_method(params, cfg, make_schedule(1e-4, 100, 0.06), jax.random.key(0))
    abstract = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)
    trainable, frozen = abstract(method.trainable), abstract(method.frozen)
    opt_state = jax.eval_shape(method.optimizer.init, trainable)
    task, batch = make_task(spec, graphdef, spec["batch"], spec["seq"])
    step = make_train_step(method, task, 1)
    if method.post_update is not None:  # the compact path's donated merged-weight buffers
        mut, const = {k: v for k, v in frozen.items() if k != "base"}, {"base": frozen["base"]}
    else:
        mut, const = {}, frozen
    compiled = step.lower(trainable, opt_state, mut, const, batch, jax.random.key(0)).compile()
    mem = compiled.memory_analysis()
    grad_bytes = tree_bytes(trainable)  # what jax.grad returns (simple path: full tensors)
    n_train = method.num_trainable(opt_state)  # SIFT simple: counts the (abstract) indices
    opt_bytes = tree_bytes(opt_state)
    total = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )
    return dict(
        trainable=n_train,
        grad=grad_bytes,
        opt=opt_bytes,
        temp=mem.temp_size_in_bytes,
        total=total,
        weights=tree_bytes(params),
    )


def measure_selection(spec, params, graphdef, rate, in_backward: bool):
    """Compiled bytes of the compact path's selection step: top-k inside the backward
    (:func:`sift_jax.topk_probe`) vs the dense gradient of every targeted tensor."""
    import train.methods as methods_lib
    from train.trainer import make_accum_grads

    cfg = TrainConfig(
        finetuning_type="sift",
        sparse_rate=rate,
        sparse_module=[spec["sparse"]],
        sparse_exception=[spec["dense"]] if spec["dense"] else [],
    )
    method = build_method(params, cfg, make_schedule(1e-4, 100, 0.06), jax.random.key(0))
    abstract = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)
    trainable, frozen = abstract(method.trainable), abstract(method.frozen)
    opt_state = jax.eval_shape(method.optimizer.init, trainable)
    task, batch = make_task(spec, graphdef, spec["batch"], spec["seq"])
    mut, const = {k: v for k, v in frozen.items() if k != "base"}, {"base": frozen["base"]}
    score = (
        {}
        if in_backward
        else {
            p: jax.ShapeDtypeStruct(x.shape, jnp.float32)
            for p, x in flatten_paths(mut["w"]).items()
        }
    )
    orig = methods_lib.selection_needs_score
    methods_lib.selection_needs_score = lambda c: not in_backward
    try:
        step = methods_lib.make_selection_step(
            method,
            cfg,
            lambda p, b, r: task.loss_fn(task.apply_fn(p, b, r, True), b),
            make_accum_grads(1),
        )
        mem = (
            step.lower(trainable, opt_state, mut, const, score, batch, jax.random.key(0), True)
            .compile()
            .memory_analysis()
        )
    finally:
        methods_lib.selection_needs_score = orig
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
            "SIFT simple path": measure(spec, params, graphdef, "sift", rate, sift_path="simple"),
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
