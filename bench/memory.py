"""Train-step memory of full FT, LoRA and SIFT (compact path), compile only, next to the
analytic model of :mod:`bench.memory_model`.

Run: ``python -m bench.memory [--models bert-base roberta-large llama-7b] [--rate 0.01]
[--remat] [--gpu_like]``

Nothing is allocated: each model is built with ``nnx.eval_shape`` and the trainer's own setup
(``train.core.fit.setup``: the method, its optimizer state and the jitted train step) is
lowered and compiled for abstract inputs; XLA's ``memory_analysis()`` gives argument, output,
alias and temporary bytes. Gradient and optimizer state bytes are the sizes of the trees
``jax.grad`` and ``optimizer.init`` produce. LoRA's rank is chosen so its trainable parameter
count matches SIFT's. Ratios are against full FT of the same model in the same process.

``--remat`` builds the models as the trainers' ``--gradient_checkpointing`` does
(:func:`train.core.methods.sift.scan_layers_for`): SIFT gets a scanned, rematerialised layer
stack with the compact view applied per layer inside the scan; full FT and LoRA keep the
unscanned model with per-layer remat.

The Llama-7B-shaped model is built with ``--llama_layers`` layers (default 2) and every
per-layer byte count is extrapolated linearly to 32 layers (embeddings and head counted once).
Its rows are printed next to the analytic table (:func:`bench.memory_model.step_memory`, the
``xla_cpu_ours`` / ``xla_gpu_like`` profiles of the current step), row by row with the
difference explained.

XLA:CPU is not XLA:GPU: by default it upcasts every bf16 dot to fp32 (an fp32 copy of each
bf16 weight) and removes remat's optimization barriers before scheduling (so an unscanned
per-layer remat recomputes nothing; a scanned stack still does). ``--gpu_like`` compiles with
those passes off (``xla_disable_hlo_passes=cse_barrier_expander,float-normalization-bf16``, as
per-compile XLA options: the same as setting them in ``XLA_FLAGS`` before JAX starts): the buffer
assignment is then the GPU-transferable one. Codegen of bf16 dots fails on the CPU afterwards,
so the numbers come from the dumped buffer assignment (every allocation: parameters, outputs,
the preallocated temp). With a dump (the default; ``--no_dump`` skips it) the buffers live at the
peak are grouped by what they hold (arguments by their jit path: weights, trained values,
indices, moments; temporaries by shape: k-sized, activations, attention blocks, logits,
weight-shaped) and extrapolated like the totals (dropped when the peak is another phase at 2
and at 4 layers).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import math
import os
import re
import shutil
import tempfile

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bench import memory_model as mm
from sift_jax.paths import flatten_paths
from train.core.config import TrainConfig
from train.core.fit import setup
from train.core.mesh import parse_mesh
from train.core.methods.sift import scan_layers_for
from train.core.task import Task
from train.models.decoder import LlamaConfig, LlamaForCausalLM
from train.models.encoder import (
    EncoderConfig,
    EncoderForSequenceClassification,
    classifier_apply_fn,
)
from train.models.functional import functional_apply

GiB = 2**30
#: the XLA:CPU passes that XLA:GPU does not run (or runs after scheduling)
GPU_LIKE_PASSES = "cse_barrier_expander,float-normalization-bf16"

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


def abstract_model(spec, layers: int | None, remat: bool, scan: bool = False):
    cfg = spec["cfg"]
    if layers is not None:
        cfg = dataclasses.replace(cfg, num_hidden_layers=layers)
    cfg = dataclasses.replace(cfg, remat=remat, scan_layers=scan)
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
    """The trainer config of a benchmark row (paper recipe targets for the model family).

    Example:
        >>> method_config(MODELS["llama-7b"], "sift", 0.05, gradient_checkpointing=True).sparse_rate
        0.05
    """
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


# ----------------------------------------------------------------------------- XLA dumps


_ALLOC = re.compile(r"^allocation \d+: size (\d+), (.*)$")
_VALUE = re.compile(r"^ value: <\d+ (\S+)(?: \(phi\))? @\d+> \(size=\d+,offset=\d+\): (\S+)")


def read_buffer_assignment(text: str) -> dict:
    """Bytes of an XLA buffer-assignment dump: ``args`` (parameter allocations, donated ones
    included), ``out`` (output allocations that are not parameters), ``temp`` (the
    preallocated temp), ``total`` (their sum: what ``memory_analysis()`` calls arguments +
    outputs - aliases + temps) and ``shapes`` (``{value name: shape}``).

    Example:
        >>> read_buffer_assignment('''allocation 0: size 12, parameter 0, shape |f32[3]|:
        ...  value: <4 x.1 @0> (size=12,offset=0): f32[3]{0}
        ... allocation 1: size 8, preallocated-temp:
        ... allocation 2: size 1, thread-local:''')["total"]
        20
    """
    args = out = temp = 0
    shapes = {}
    for line in text.splitlines():
        m = _ALLOC.match(line)
        if m:
            size, kind = int(m.group(1)), m.group(2)
            if kind.startswith("parameter"):
                args += size
            elif kind.startswith("preallocated-temp"):
                temp += size
            elif kind.startswith("output"):
                out += size
            continue
        v = _VALUE.match(line)
        if v:
            shapes[v.group(1)] = v.group(2).split("{")[0]
    return dict(args=args, out=out, temp=temp, total=args + out + temp, shapes=shapes)


def read_peak(text: str) -> list[tuple[str, int]]:
    """``(value, bytes)`` live at the peak of an XLA ``*-live-range.txt`` dump.

    Example:
        >>> read_peak('''  Live ranges at 3 (peak):
        ...     a.1{}: 12 bytes (cumulative: 12 bytes)
        ...   Stack trace breakdown''')
        [('a.1', 12)]
    """
    out, on = [], False
    for line in text.splitlines():
        if "Live ranges at" in line and "(peak)" in line:
            on = True
            continue
        if on:
            m = re.match(r"^\s+(\S+?)(\{[\d,]*\})?: (\d+) bytes", line)
            if not m:
                break
            out.append((m.group(1) + (m.group(2) or "").replace("{}", ""), int(m.group(3))))
    return out


#: jit argument paths (the entry parameters' ``op_name``) -> groups of
#: :data:`bench.memory_model.ROW_GROUPS`
_ARG_GROUPS = (
    ("buffers.weights", "weights"),
    ("frozen", "weights"),
    ("buffers.indices", "sift_idx"),
    ("opt_state", "moments"),
    ("trainable", "trainable"),
    ("batch", "batch"),
)
_PARAM = re.compile(r'^\s*%(\S+) = \S+ parameter\(\d+\), .*?op_name="([^"]*)"')


def entry_parameter_paths(hlo_text: str) -> dict[str, str]:
    """``{entry parameter name: jit argument path}`` of an optimized HLO dump (the names are
    sanitised and may be ambiguous, the paths in the metadata are not).

    Example:
        >>> entry_parameter_paths('''ENTRY %main (a: f32[2]) -> f32[2] {
        ...   %w.1 = f32[2]{0} parameter(0), metadata={op_name="trainable[\\'w\\']"}''')
        {'w.1': "trainable['w']"}
    """
    out, on = {}, False
    for line in hlo_text.splitlines():
        if line.startswith("ENTRY"):
            on = True
            continue
        if on:
            m = _PARAM.match(line)
            if m:
                out[m.group(1)] = m.group(2).replace("\\'", "'")
    return out


def _dims(shape: str) -> tuple[int, ...]:
    m = re.match(r"^\w+\[([\d,]*)\]", shape)
    return tuple(int(d) for d in m.group(1).split(",") if d) if m else ()


def classify(name: str, shape: str, dims: dict, arg_path: str | None = None) -> str:
    """The group of one buffer live at the peak: arguments by their jit path (``arg_path``),
    temporaries by shape (``dims``: hidden, inter, vocab, seq, heads, the per-leaf ``ks`` and
    LoRA's ``rank``).

    Example:
        >>> d = dict(hidden=8, inter=16, vocab=32, seq=4, heads=2, ks={5})
        >>> classify("mu.1", "f32[5]", d, "opt_state[1]"), classify("fusion.3", "f32[1,4,32]", d)
        ('moments', 'logits')
    """
    core = tuple(x for x in _dims(shape) if x != 1)
    h, i, v, s = dims["hidden"], dims["inter"], dims["vocab"], dims["seq"]
    size = math.prod(core) if core else 1
    weightish = any(size % w == 0 for w in (h * h, h * i, h * v))
    if arg_path is not None:
        for prefix, group in _ARG_GROUPS:
            if arg_path.startswith(prefix):
                if group == "trainable" and weightish:
                    return "weights"  # full FT: the trained weights themselves
                return group
        return "small"
    if v in core and (s in core or s - 1 in core):
        return "logits"
    if len(core) >= 2 and core[-1] == s and dims["heads"] in core:
        return "attention"  # scores / probabilities of a query block, [b, h, block, s]
    # tokens first ([s, ...], or query blocks [n, block, ...] with n * block = s)
    lead = [math.prod(core[: j + 1]) for j in range(len(core))]
    if s in core or s in lead:
        return "activations"
    if weightish:
        return "weight_shaped"  # dense dW, one layer's weight slices, scatter buffers
    if any(x in dims["ks"] for x in core) or dims.get("rank") in core:
        return "k_temps"  # k-sized (SIFT) / adapter-sized (LoRA) gradients and update temps
    return "small"


def peak_groups(dump_dir: str, prefix: str, dims: dict) -> dict[str, float] | None:
    """Bytes per group of the buffers live at the peak of the dumped module ``prefix`` (None
    when the backend dumps no live ranges)."""
    ba = open(_one(dump_dir, prefix, "buffer-assignment.txt")).read()
    try:
        lr = open(_one(dump_dir, prefix, "live-range.txt")).read()
        hlo = open(_one(dump_dir, prefix, "after_optimizations.txt")).read()
    except FileNotFoundError:
        return None
    shapes = read_buffer_assignment(ba)["shapes"]
    paths = entry_parameter_paths(hlo)
    out: dict[str, float] = {}
    for name, nbytes in read_peak(lr):
        g = classify(name, shapes.get(name, ""), dims, paths.get(name))
        out[g] = out.get(g, 0) + nbytes
    return out


def _one(dump_dir: str, prefix: str, suffix: str) -> str:
    hits = glob.glob(os.path.join(dump_dir, f"{prefix}*{suffix}"))
    hits = [h for h in hits if not h.endswith("-values.txt")]
    if not hits:
        raise FileNotFoundError(f"no {prefix}*{suffix} in {dump_dir}")
    return max(hits, key=os.path.getsize)


def compile_options(dump_dir: str | None, gpu_like: bool) -> dict:
    """XLA debug options for one compile (the ``XLA_FLAGS`` of the same names, per compile):
    the module's HLO, buffer assignment and live ranges dumped into ``dump_dir``; with
    ``gpu_like`` the CPU-only passes :data:`GPU_LIKE_PASSES` off.

    Example:
        >>> compile_options(None, True)
        {'xla_disable_hlo_passes': 'cse_barrier_expander,float-normalization-bf16'}
    """
    out: dict = {}
    if dump_dir:
        out.update(xla_dump_to=dump_dir, xla_dump_hlo_as_text=True)
    if gpu_like:
        out["xla_disable_hlo_passes"] = GPU_LIKE_PASSES
    return out


def compile_memory(
    lowered, dump_root: str | None = None, dims: dict | None = None, gpu_like: bool = False
) -> dict:
    """``{args, out, alias, temp, total, source}`` bytes of ``lowered``'s compiled step:
    ``memory_analysis()``, or, when codegen fails (``gpu_like`` on XLA:CPU: bf16 dots), the
    dumped buffer assignment (which XLA writes before codegen); with a dump (``dump_root``)
    also ``groups``: the buffers live at the peak, grouped (``dims`` as :func:`classify`)."""
    if gpu_like and dump_root is None:
        raise ValueError("gpu_like compiles read the dumped buffer assignment: pass dump_root")
    dump_dir = tempfile.mkdtemp(dir=dump_root) if dump_root else None
    try:
        mem = lowered.compile(compiler_options=compile_options(dump_dir, gpu_like))
        mem = mem.memory_analysis()
        out = dict(
            args=mem.argument_size_in_bytes,
            out=mem.output_size_in_bytes,
            alias=mem.alias_size_in_bytes,
            temp=mem.temp_size_in_bytes,
            total=_total(mem),
            source="memory_analysis",
        )
    except Exception as e:  # noqa: BLE001  (XLA:CPU codegen of bf16 dots with gpu_like)
        if dump_dir is None:
            raise
        out = {"source": f"buffer assignment ({type(e).__name__} at codegen)"}
    if dump_dir is None:
        return out
    try:
        path = _one(dump_dir, "", "buffer-assignment.txt")
    except FileNotFoundError:
        if out["source"] != "memory_analysis":
            raise RuntimeError("compile failed and no buffer assignment was dumped") from None
        return out
    prefix = os.path.basename(path).split(".")[0]  # module_0012
    if out["source"] != "memory_analysis":
        ba = read_buffer_assignment(open(path).read())
        out.update(args=ba["args"], out=ba["out"], alias=0, temp=ba["temp"], total=ba["total"])
    groups = None if dims is None else peak_groups(dump_dir, prefix, dims)
    if groups is not None:
        out["groups"] = groups
    shutil.rmtree(dump_dir, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- steps


def _model_dims(spec, params, cfg, rate: float) -> dict:
    ks = set()
    for p, x in flatten_paths(params).items():
        if re.search(spec["sparse"], p):
            n = math.prod(x.shape[1:] if cfg.scan_layers else x.shape)
            ks.add(max(1, math.ceil(rate * n - 1e-9)))
    c = cfg
    return dict(
        hidden=c.hidden_size,
        inter=c.intermediate_size,
        vocab=c.vocab_size,
        seq=spec["seq"],
        heads=c.num_attention_heads,
        ks=ks,
    )


def measure(
    spec,
    params,
    graphdef,
    ftype,
    rate,
    lora_rank=8,
    *,
    dump_dir: str | None = None,
    gpu_like: bool = False,
    cfg=None,
    mu_dtype: str | None = None,
    **kw,
):
    """Compiled bytes of the trainer's own train step for one method (abstract inputs);
    ``mu_dtype``: AdamW's first moment in that dtype (the trainer's ``--adam_mu_dtype``)."""
    if mu_dtype is not None:
        kw["adam_mu_dtype"] = mu_dtype
    s, batch = _setup(spec, params, graphdef, method_config(spec, ftype, rate, lora_rank, **kw))
    st, step = s.state, s.train_step
    if ftype == "sift" and cfg is not None and cfg.scan_layers:
        assert s.method.plan.layer_views, "scanned SIFT step without per-layer views"
    dims = None
    if dump_dir and cfg is not None:
        dims = _model_dims(spec, params, cfg, rate) | (
            {"rank": lora_rank} if ftype == "lora" else {}
        )
    lowered = step.lower(st.trainable, st.opt_state, st.buffers, s.frozen, batch, jax.random.key(0))
    mem = compile_memory(lowered, dump_dir, dims, gpu_like)
    return dict(
        trainable=s.method.num_trainable,
        grad=tree_bytes(st.trainable),  # what jax.grad returns
        opt=tree_bytes(st.opt_state),
        weights=tree_bytes(params),
        **mem,
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


def _scan_for(ftype: str, remat: bool) -> bool:
    # as the trainers' --gradient_checkpointing: scanned for SIFT, unscanned remat otherwise
    return scan_layers_for(TrainConfig(finetuning_type=ftype, gradient_checkpointing=remat))


def run_model(name, rate, llama_layers, remat, dump_dir=None, mu_dtype=None, gpu_like=False):
    """``({row: bytes dict}, note)``: full FT, matched LoRA and SIFT (and SIFT with
    ``mu_dtype`` moments) of one model, Llama extrapolated to its 32 layers."""
    spec = MODELS[name]
    layers = llama_layers if spec["kind"] == "decoder" else None
    full_layers = spec["cfg"].num_hidden_layers
    results = {}
    for nl in [layers, layers * 2] if layers else [None]:
        built = {}

        def model(ftype, nl=nl, built=built):
            scan = _scan_for(ftype, remat)
            if scan not in built:
                built[scan] = abstract_model(spec, nl, remat, scan)
            return built[scan]

        kw = dict(dump_dir=dump_dir, gpu_like=gpu_like)
        cfg, graphdef, params = model("sift")
        sift = measure(spec, params, graphdef, "sift", rate, cfg=cfg, **kw)
        cfg_u, graphdef_u, params_u = model("lora")
        r = lora_rank_matching(params_u, spec, sift["trainable"])
        rows = {
            "full FT": measure(spec, params_u, graphdef_u, "full", rate, cfg=cfg_u, **kw),
            f"LoRA (r={r})": measure(
                spec, params_u, graphdef_u, "lora", rate, lora_rank=r, cfg=cfg_u, **kw
            ),
            "SIFT": sift,
        }
        if mu_dtype:
            rows[f"SIFT, mu {mu_dtype}"] = measure(
                spec, params, graphdef, "sift", rate, cfg=cfg, mu_dtype=mu_dtype, **kw
            )
        results[nl] = rows
    if layers:  # extrapolate per layer: f(L) = a + b L from L and 2L
        out = {}
        for key in results[layers]:
            lo, hi = results[layers][key], results[layers * 2][key]
            out[key] = _extrapolate(lo, hi, layers, full_layers)
            if any(v < -(2**20) for v in out[key].get("groups", {}).values()):
                # the peak is another phase at 2 and at 4 layers: only totals extrapolate
                del out[key]["groups"]
                out[key]["source"] += "; peak phase moved with the layer count: totals only"
        return out, f"{full_layers} layers extrapolated from {layers} and {2 * layers}"
    return results[None], f"{full_layers} layers"


def _extrapolate(lo: dict, hi: dict, n: int, to: int) -> dict:
    """Each number of ``lo`` (``n`` layers) and ``hi`` (``2n``) extrapolated linearly to ``to``
    layers (nested dicts: the union of their keys).

    Example:
        >>> _extrapolate({"a": 3, "g": {"x": 1.0}}, {"a": 5, "g": {"y": 2.0}}, 2, 32)
        {'a': 33.0, 'g': {'x': -14.0, 'y': 30.0}}
    """
    out = {}
    for f, a in lo.items():
        b = hi[f]
        if isinstance(a, dict):
            keys = list(a) + [g for g in b if g not in a]
            out[f] = {
                g: a.get(g, 0.0) + (b.get(g, 0.0) - a.get(g, 0.0)) / n * (to - n) for g in keys
            }
        elif isinstance(a, int | float) and not isinstance(a, bool):
            out[f] = a + (b - a) / n * (to - n)
        else:
            out[f] = a
    return out


# ----------------------------------------------------------------------------- analytic


def analytic(name: str, row: str, rate: float, remat: bool, gpu_like: bool):
    """The :mod:`bench.memory_model` breakdown of a Llama row as the trainer builds the step
    (:func:`bench.memory_model.current_step`) with the profile of the backend the row was
    compiled for (``jax_gpu`` on a GPU).

    Example:
        >>> round(analytic("llama-7b", "SIFT", 0.05, True, True).total / GiB, 1)
        20.2
    """
    spec = MODELS[name]
    method = "full" if row.startswith("full") else "lora" if row.startswith("LoRA") else "sift"
    if jax.devices()[0].platform == "gpu":
        profile = "jax_gpu"
    else:
        profile = "xla_gpu_like" if gpu_like else "xla_cpu_now"
    rank = re.search(r"r=(\d+)", row)
    return mm.current_step(
        mm.Shape.from_config(spec["cfg"]),
        method,
        remat="full" if remat else "none",
        profile=profile,
        rate=rate,
        lora_rank=int(rank.group(1)) if rank else 8,
        batch=spec["batch"],
        seq=spec["seq"],
        attn_block=spec["cfg"].attention_chunk,
        mu_bytes=2 if "mu bfloat16" in row else None,
    )


def measured_groups(r: dict) -> dict[str, float]:
    """XLA's bytes (GiB) for the analytic table: the peak groups of a dump (if any), the rest
    of the allocation (heap packing, buffers not live at the peak) as ``unattributed``.

    Example:
        >>> measured_groups({"total": 3 * GiB, "groups": {"weights": 2 * GiB}})
        {'weights': 2.0, 'unattributed': 1.0, 'total': 3.0}
    """
    if "groups" not in r:
        return {"total": r["total"] / GiB}
    g = {k: v / GiB for k, v in r["groups"].items()}
    g["unattributed"] = r["total"] / GiB - sum(g.values())
    g["total"] = r["total"] / GiB
    return g


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--rate", type=float, default=0.01)
    ap.add_argument("--llama_layers", type=int, default=2)
    ap.add_argument(
        "--remat",
        action="store_true",
        help="gradient checkpointing as the trainers build it (SIFT: scanned, view per layer)",
    )
    ap.add_argument(
        "--gpu_like",
        action="store_true",
        help=f"XLA:CPU without its CPU-only passes ({GPU_LIKE_PASSES}): GPU-transferable",
    )
    ap.add_argument(
        "--no_dump",
        action="store_true",
        help="no HLO dump (then only totals, no per-group attribution of the peak)",
    )
    ap.add_argument(
        "--mu_dtype",
        default=None,
        help="also measure SIFT with AdamW's first moment in this dtype (e.g. bfloat16)",
    )
    ap.add_argument(
        "--selection",
        action="store_true",
        help="also compare the selection step: top-k in backward vs dense gradient",
    )
    args = ap.parse_args(argv)
    if args.gpu_like and args.no_dump:
        ap.error("--gpu_like reads the dumped buffer assignment (bf16 dots fail at codegen)")
    dump_dir = None if args.no_dump else tempfile.mkdtemp(prefix="bench_memory_")
    try:
        return _report(args, dump_dir)
    finally:
        if dump_dir:
            shutil.rmtree(dump_dir, ignore_errors=True)


def _report(args, dump_dir):
    print(
        f"backend: {jax.devices()[0].platform} ({jax.devices()[0].device_kind}); rate {args.rate}; "
        f"remat {args.remat}; "
        + (f"GPU-like (passes off: {GPU_LIKE_PASSES})" if args.gpu_like else "XLA:CPU default")
    )
    all_rows = {}
    for name in args.models:
        rows, note = run_model(
            name, args.rate, args.llama_layers, args.remat, dump_dir, args.mu_dtype, args.gpu_like
        )
        spec = MODELS[name]
        print(f"\n{name} ({note}), batch {spec['batch']} x seq {spec['seq']}")
        print(
            f"{'method':22s} {'trainable':>12s} {'grads GB':>9s} {'opt GB':>8s} "
            f"{'grad+opt':>9s} {'step total GB':>14s} {'total':>7s}  source"
        )
        base = rows["full FT"]
        for key, r in rows.items():
            go = (r["grad"] + r["opt"]) / (base["grad"] + base["opt"])
            print(
                f"{key:22s} {r['trainable']:12,.0f} {r['grad'] / GiB:9.3f} {r['opt'] / GiB:8.3f} "
                f"{go:8.4f}x {r['total'] / GiB:14.3f} {r['total'] / base['total']:6.3f}x  "
                f"{r['source']}",
                flush=True,
            )
        all_rows[name] = rows
        if spec["kind"] == "decoder":
            for key, r in rows.items():
                b = analytic(name, key, args.rate, args.remat, args.gpu_like)
                print(f"\n-- {name} {key}: analytic model (GiB) vs XLA")
                print(mm.format_table(b, measured_groups(r)))
        if args.selection and MODELS[name]["kind"] == "encoder":
            _, graphdef, params = abstract_model(MODELS[name], None, args.remat)
            a = measure_selection(MODELS[name], params, graphdef, args.rate, True)
            b = measure_selection(MODELS[name], params, graphdef, args.rate, False)
            print(
                f"selection step (args + temp): top-k in backward {a / GiB:.3f} GB vs dense "
                f"gradient + score {b / GiB:.3f} GB = {a / b:.3f}x"
            )
    return all_rows


if __name__ == "__main__":
    main()
