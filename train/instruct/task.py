"""The instruction-tuning job: flags, data -> Task, run (see :mod:`train.instruct`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from train.core import logs
from train.core import mesh as mesh_lib
from train.core.config import TrainConfig, flag, parse_args
from train.core.fit import TrainResult, fit, log_errors, open_output_dir
from train.core.methods.sift import scan_layers_for
from train.core.outputs import write_json_atomic
from train.core.task import Task
from train.instruct import data as idata
from train.models.pretrained import Pretrained, load_pretrained

log = logging.getLogger("train")

PROJECTIONS = r"(q|k|v|o|gate|up|down)_proj"
REVIEW_INSTRUCTION = "Classify the sentiment of this movie review as positive or negative."
REVIEW_ANSWERS = ("negative", "positive")  # label 0, label 1
RESULTS_FILE = "instruct_results.json"
DEMO_TRAIN_SAMPLES = 480  # offline demo's training set size when --max_train_samples is unset


@dataclass
class InstructDataConfig:
    """Instruction data, held-out evaluation, MMLU."""

    task_name: str = flag("instruct", "Run name recorded in the results.")
    data_path: list[str] = flag(
        [],
        "Alpaca/chat JSON or JSONL file(s), or a hub dataset name (needs internet). "
        "Empty: the embedded review-sentiment instruction set.",
    )
    eval_data_path: list[str] = flag(
        [], "Held-out instruction file(s) (default: --val_set_size examples split off)."
    )
    val_set_size: int = flag(200, "Examples held out of the training data for evaluation.")
    model_max_length: int = flag(96, "Sequences are right-truncated to this many tokens.")
    prompt_template: str = flag(
        "chat",
        "How Alpaca records are rendered: chat (the tokenizer's chat template), alpaca (the "
        "Stanford Alpaca prompt) or plain. Chat records always use the chat template.",
        choices=list(idata.TEMPLATES),
    )
    packing: bool = flag(False, "Pack several examples into each row (segment-masked attention).")
    mmlu_dir: str | None = flag(None, "MMLU directory (dev/, test/ CSVs): evaluate before/after.")
    mmlu_k_shot: int = flag(0, "MMLU shots (0 = zero-shot, as in the paper).")
    mmlu_max_questions_per_subject: int | None = flag(None, "Cap MMLU questions per subject.")
    mmlu_before: bool = flag(True, "Also evaluate MMLU on the base model before tuning.")
    dtype: str = flag(
        "float32", "Parameter dtype: float32 | bfloat16.", choices=["float32", "bfloat16"]
    )
    max_train_samples: int | None = flag(
        None,
        "Keep only the first N training examples (0: all). Default: all of --data_path, "
        f"{DEMO_TRAIN_SAMPLES} for the offline review demo (59 steps of 8, ~10 min on 2 cores).",
    )
    max_eval_samples: int | None = flag(None, "Keep only the first N evaluation examples.")


@dataclass
class InstructConfig(TrainConfig, InstructDataConfig):
    """Trainer flags with instruction-tuning defaults (the paper's Llama recipe) and extras.

    Example:
        >>> cfg = InstructConfig(max_steps=2)
        >>> cfg.sparse_rate, cfg.learning_rate, cfg.prompt_template
        (0.05, 0.0002, 'chat')
    """

    model_name_or_path: str = flag(
        "embedded:smollm2",
        "'embedded:smollm2' (packaged SmolLM2-135M-Instruct GGUF), a .gguf file, or a local HF "
        "LLaMA-family directory.",
    )
    # --- the paper's Llama recipe (sparse on all projections, nothing dense)
    sparse_rate: float = flag(0.05, "SIFT: fraction of each targeted tensor that trains.")
    sparse_module: list[str] = flag(
        [PROJECTIONS], "SIFT: regexes of tensors with sparse increments (q/k/v/o/gate/up/down)."
    )
    sparse_exception: list[str] = flag([], "SIFT: regexes of tensors trained densely (none).")
    learning_rate: float = flag(2e-4, "Peak learning rate (AdamW).")
    weight_decay: float = flag(0.01, "AdamW weight decay.")
    warmup_ratio: float = flag(0.03, "Linear warmup fraction, then linear decay.")
    num_train_epochs: float = flag(1.0, "Epochs (the paper: 3 on Alpaca).")
    per_device_train_batch_size: int = flag(8, "Training sequences per device per step.")
    per_device_eval_batch_size: int = flag(16, "Evaluation sequences per device.")
    lora_targets: list[str] = flag([r"(q|v)_proj"], "LoRA: regexes of kernels with adapters.")
    lora_exception: list[str] = flag([], "LoRA: regexes of tensors trained densely.")
    output_dir: str = flag("outputs/instruct", "Where results, logs, checkpoints and the delta go.")
    logging_steps: int = flag(5, "Write a JSONL log line every N steps.")


# ----------------------------------------------------------------------------- data


def review_records(max_examples: int | None = None, seed: int = 0) -> tuple[list[dict], list[int]]:
    """The packaged review sentences as sentiment instructions, shuffled, and their labels.

    Example:
        >>> recs, labels = review_records(4)  # doctest: +SKIP
        >>> recs[0]["instruction"]  # doctest: +SKIP
        'Classify the sentiment of this movie review as positive or negative.'
    """
    from train.data import mr

    sentences, labels = mr.load_sentences()
    order = np.random.default_rng(seed).permutation(len(sentences))
    if max_examples is not None:
        order = order[:max_examples]
    recs = [make_review_record(sentences[i], int(labels[i])) for i in order]
    return recs, [int(labels[i]) for i in order]


def make_review_record(sentence: str, label: int) -> dict:
    """One review as an Alpaca record.

    Example:
        >>> make_review_record("A gem.", 1)["output"]
        'positive'
    """
    return {
        "instruction": REVIEW_INSTRUCTION,
        "input": f"Review: {sentence}",
        "output": REVIEW_ANSWERS[label],
    }


def answer_token_ids(tokenizer, template: str) -> tuple[int, int]:
    """First response token of ``negative`` and ``positive`` as training encodes them.

    Example:
        >>> from transformers import AutoTokenizer
        >>> tok = AutoTokenizer.from_pretrained("tests/fixtures/instruct/tokenizer")
        >>> n, p = answer_token_ids(tok, "chat"); tok.decode([n]), tok.decode([p])
        ('neg', 'p')
    """
    ids = []
    for ans in REVIEW_ANSWERS:
        x, la = idata.encode_record(
            tokenizer, make_review_record("x", REVIEW_ANSWERS.index(ans)), template
        )
        ids.append(next(t for t in la if t != idata.IGNORE_INDEX))
    if ids[0] == ids[1]:
        raise ValueError("'negative' and 'positive' start with the same token; cannot score.")
    return ids[0], ids[1]


@dataclass
class ClassificationSet:
    """Prompts (right-padded) to score by the answer tokens' logits at the last prompt token."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    last_index: np.ndarray
    labels: np.ndarray

    def batches(self, bs: int):
        """Batches of ``bs`` rows; the last is padded and ``example_mask`` marks real rows.

        Example:
            >>> c = ClassificationSet(np.zeros((3, 8), np.int32), np.ones((3, 8), np.int32),
            ...                       np.full(3, 7), np.array([0, 1, 1]))
            >>> [b["example_mask"].tolist() for b in c.batches(2)]
            [[1, 1], [1, 0]]
        """
        n = len(self.labels)
        for s in range(0, n, bs):
            idx = np.arange(s, min(s + bs, n))
            pad = bs - len(idx)
            take = lambda a: np.concatenate([a[idx], np.repeat(a[:1], pad, 0)])  # noqa: B023
            yield {
                "input_ids": take(self.input_ids),
                "attention_mask": take(self.attention_mask),
                "last_index": take(self.last_index),
                "label": take(self.labels),
                "example_mask": np.concatenate([np.ones(len(idx)), np.zeros(pad)]).astype(np.int32),
            }


def classification_set(
    tokenizer, records: Sequence[dict], labels: Sequence[int], template: str, max_length: int
) -> ClassificationSet:
    """Encodes each record's prompt exactly as training does (everything before the response).

    Prompts longer than ``max_length`` keep their last ``max_length`` tokens; rows are
    right-padded to a multiple of 8 and ``last_index`` is each prompt's last token.

    Example:
        >>> from transformers import AutoTokenizer
        >>> tok = AutoTokenizer.from_pretrained("tests/fixtures/instruct/tokenizer")
        >>> c = classification_set(tok, [make_review_record("Fun.", 1)], [1], "chat", 96)
        >>> tok.decode(c.input_ids[0, : c.last_index[0] + 1]).endswith("assistant\\n")
        True
    """
    prompts = []
    for r in records:
        ids, la = idata.encode_record(tokenizer, r, template)
        first = next(i for i, t in enumerate(la) if t != idata.IGNORE_INDEX)
        prompts.append(ids[:first][-max_length:])
    width = -(-max(len(p) for p in prompts) // 8) * 8
    pad = idata.pad_token_id(tokenizer)
    ids = np.full((len(prompts), width), pad, np.int32)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
        mask[i, : len(p)] = 1
    return ClassificationSet(ids, mask, mask.sum(1) - 1, np.asarray(labels, np.int32))


def score_classification(model: Pretrained, params, cset: ClassificationSet, answer_ids, bs: int):
    """Accuracy of ``argmax(logit[positive], logit[negative])`` at the last prompt token.

    Args:
        model: the decoder (its ``apply_fn`` is called with ``params``).
        params: the parameters to score.
        cset: prompts and labels from :func:`classification_set`.
        answer_ids: ``(negative, positive)`` first tokens, from :func:`answer_token_ids`.
        bs: prompts per forward.

    Example:
        >>> acc = score_classification(model, model.params, cset, answer_ids, 16)  # doctest: +SKIP
    """

    @jax.jit
    def margins(params, batch):
        logits = model.apply_fn(params, batch["input_ids"], batch["attention_mask"])
        last = jnp.take_along_axis(logits, batch["last_index"][:, None, None], axis=1)[:, 0]
        return last[:, answer_ids[1]] - last[:, answer_ids[0]]

    preds, labels = [], []
    for b in cset.batches(bs):
        keep = b["example_mask"].astype(bool)
        m = np.asarray(margins(params, {k: jnp.asarray(v) for k, v in b.items()}))
        preds.append((m[keep] > 0).astype(int))
        labels.append(b["label"][keep])
    p, y = np.concatenate(preds), np.concatenate(labels)
    return float((p == y).mean())


# ----------------------------------------------------------------------------- task


def _model_kwargs(batch, packing: bool) -> dict:
    if packing:
        return {"segment_ids": batch["segment_ids"], "positions": batch["positions"]}
    return {}


def build_task(
    model: Pretrained,
    cfg: InstructConfig,
    train_arrays: idata.InstructArrays,
    eval_arrays: idata.InstructArrays | None = None,
    cset: ClassificationSet | None = None,
    answer_ids: tuple[int, int] | None = None,
) -> Task:
    """The trainer :class:`~train.core.task.Task` for instruction tuning.

    Training minimises :func:`train.instruct.data.response_loss`; evaluation reports
    ``eval_loss`` / ``eval_perplexity`` on ``eval_arrays`` and ``eval_accuracy`` on the
    classification set ``cset`` (the review demo).

    Example:
        >>> arrays = idata.tokenize_records(model.tokenizer, records, 96, "chat")  # doctest: +SKIP
        >>> result = fit(cfg, build_task(model, cfg, arrays), model.params)  # doctest: +SKIP
    """
    packing = cfg.packing
    if packing and not model.supports_packing:
        raise ValueError(
            "--packing needs a model forward that takes segment_ids/positions; this one does not."
        )

    def apply_fn(params, batch, rng, train):
        del rng, train  # no dropout in these decoders
        return model.apply_fn(
            params, batch["input_ids"], batch["attention_mask"], **_model_kwargs(batch, packing)
        )

    def loss_fn(logits, batch):
        return idata.response_loss(logits, batch["labels"])

    n = len(train_arrays)

    def train_batches(epoch, start, bs):
        order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
        for b in range(start, n // bs):
            yield train_arrays.batch(order[b * bs : (b + 1) * bs], packing)

    eval_sets = {}
    if cset is not None:
        eval_sets["validation"] = cset.batches
    elif eval_arrays is not None:

        def eval_batches(bs):
            m = len(eval_arrays)
            for s in range(0, m, bs):
                idx = np.arange(s, min(s + bs, m))
                full = np.concatenate([idx, np.zeros(bs - len(idx), int)])
                b = eval_arrays.batch(full, packing)
                b["example_mask"] = (np.arange(bs) < len(idx)).astype(np.int32)
                yield b

        eval_sets["validation"] = eval_batches

    def eval_outputs(logits, batch):
        if cset is not None:
            last = jnp.take_along_axis(logits, batch["last_index"][:, None, None], axis=1)[:, 0]
            return last[:, answer_ids[1]] - last[:, answer_ids[0]]
        nll, cnt = idata.response_loss(logits, batch["labels"], reduction="sum")
        return jnp.stack([nll, cnt.astype(nll.dtype)], axis=-1)

    def metrics_fn(name, outs, batches):
        if cset is not None:
            labels = np.concatenate([b["label"] for b in batches])
            return {"eval_accuracy": float(((outs > 0).astype(int) == labels).mean())}
        loss = float(outs[:, 0].sum() / max(outs[:, 1].sum(), 1))
        return {"eval_loss": loss, "eval_perplexity": float(np.exp(min(loss, 50.0)))}

    return Task(apply_fn, loss_fn, n, train_batches, eval_sets, metrics_fn, eval_outputs)


# ----------------------------------------------------------------------------- run


def _split(records: list, size: int, seed: int) -> tuple[list, list]:
    if size <= 0:
        return records, []
    if size >= len(records):
        raise ValueError(f"--val_set_size {size} leaves no training data ({len(records)} records).")
    order = np.random.default_rng(seed).permutation(len(records))
    held = set(order[:size].tolist())
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def _mmlu(cfg, model: Pretrained, params) -> dict:
    from train.mmlu import evaluate_mmlu

    f = jax.jit(model.apply_fn)
    res = evaluate_mmlu(
        lambda ids, mask: f(params, jnp.asarray(ids), jnp.asarray(mask)),
        model.tokenizer,
        cfg.mmlu_dir,
        cfg.mmlu_k_shot,
        batch_size=cfg.per_device_eval_batch_size,
        max_questions_per_subject=cfg.mmlu_max_questions_per_subject,
    )
    return res.as_dict()


def run(cfg: InstructConfig, model: Pretrained | None = None) -> dict:
    """Builds the data, evaluates the base model, fine-tunes, evaluates again, saves.

    The output directory is locked before anything is loaded; the fine-tuning itself, the
    SIFT delta, the merged export and the results files are the shared fit loop's
    (:func:`train.core.fit.fit`), with the decoder placed on the mesh by its logical axes
    (``--mesh fsdp=N`` shards weights and optimizer state).

    Args:
        cfg: the configuration.
        model: a ready decoder (default: load ``cfg.model_name_or_path``).

    Returns:
        The results dict (also written to ``<output_dir>/instruct_results.json``):
        ``before`` / ``after`` metrics, ``train`` metrics, the ``delta`` path, ``wall_time_s``.

    Example:
        >>> res = run(InstructConfig(max_steps=2, output_dir="/tmp/x"))  # doctest: +SKIP
        >>> res["before"]["eval_accuracy"], res["after"]["eval_accuracy"]  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    mesh_lib.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    logs.setup(primary=jax.process_index() == 0)
    mesh = mesh_lib.parse_mesh(cfg.mesh)
    with open_output_dir(cfg) as out, log_errors(out):
        return _run(cfg, model, mesh, out, t0)


def _run(cfg: InstructConfig, model, mesh, out, t0) -> dict:
    dtype = "bfloat16" if cfg.bf16 else cfg.dtype
    model = model or load_pretrained(
        cfg.model_name_or_path,
        head="causal_lm",
        dtype=dtype,
        remat=cfg.gradient_checkpointing,
        scan_layers=scan_layers_for(cfg),  # SIFT: view and selection per layer in the scan
    )
    tok = model.tokenizer
    cset = answer_ids = eval_arrays = None
    max_train = cfg.max_train_samples
    if max_train is None and not cfg.data_path:
        max_train = DEMO_TRAIN_SAMPLES
    if max_train is not None and max_train <= 0:
        max_train = None
    if cfg.data_path:
        recs = idata.load_records(cfg.data_path, max_samples=None)
        if cfg.eval_data_path:
            eval_recs = idata.load_records(cfg.eval_data_path)
        else:
            recs, eval_recs = _split(recs, cfg.val_set_size, cfg.seed)
        labels = None
    else:
        total = None if max_train is None else max_train + cfg.val_set_size
        recs, labels = review_records(total, cfg.seed)
        eval_recs, eval_labels = recs[: cfg.val_set_size], labels[: cfg.val_set_size]
        recs = recs[cfg.val_set_size :]
    if max_train is not None:
        recs = recs[:max_train]
    if cfg.max_eval_samples is not None:
        eval_recs = eval_recs[: cfg.max_eval_samples]
    train_arrays = idata.tokenize_records(
        tok, recs, cfg.model_max_length, cfg.prompt_template, cfg.packing
    )
    log.info(
        "Instruction data: %d training examples in %d rows of %d tokens (%d dropped: no "
        "response within --model_max_length), %d held out.",
        train_arrays.num_examples,
        len(train_arrays),
        train_arrays.input_ids.shape[1],
        train_arrays.num_dropped,
        len(eval_recs),
    )
    before: dict[str, Any] = {}
    if labels is not None:
        answer_ids = answer_token_ids(tok, cfg.prompt_template)
        cset = classification_set(
            tok, eval_recs, eval_labels[: len(eval_recs)], cfg.prompt_template, cfg.model_max_length
        )
        before["eval_accuracy"] = score_classification(
            model, model.params, cset, answer_ids, cfg.per_device_eval_batch_size
        )
        log.info("Zero-shot accuracy before tuning: %.4f", before["eval_accuracy"])
    elif eval_recs:
        eval_arrays = idata.tokenize_records(
            tok, eval_recs, cfg.model_max_length, cfg.prompt_template, cfg.packing
        )
    if cfg.mmlu_dir and cfg.mmlu_before:
        before.update(_mmlu(cfg, model, model.params))
        log.info("MMLU before tuning: %.4f", before["mmlu_average"])

    task = build_task(model, cfg, train_arrays, eval_arrays, cset, answer_ids)
    meta = {"base_model": cfg.model_name_or_path, "task": cfg.task_name}
    results: dict[str, Any] = {}

    def finish(result: TrainResult) -> list[str]:
        # Part of fit's epilogue: the run is marked complete only once this file exists.
        after = {k: v for k, v in result.metrics.items() if k.startswith("eval_")}
        if cfg.mmlu_dir:
            after.update(_mmlu(cfg, model, result.params))
            log.info("MMLU after tuning: %.4f", after["mmlu_average"])
        delta = out.path / "sift_delta.safetensors"
        results.update(
            {
                "export": str(out.path / "model") if "model" in result.outputs else None,
                "before": before,
                "after": after,
                "train": {k: v for k, v in result.metrics.items() if not k.startswith("eval_")},
                "delta": str(delta) if delta.name in result.outputs else None,
                "wall_time_s": time.perf_counter() - t0,
            }
        )
        if jax.process_index() == 0:
            write_json_atomic(out.path / RESULTS_FILE, results)
        return [RESULTS_FILE]

    fit(cfg, task, model.params, model=model, mesh=mesh, out=out, metadata=meta, finish=finish)
    after = results["after"]
    if "eval_accuracy" in before:
        log.info(
            "Accuracy: zero-shot %.4f -> after %s %.4f",
            before["eval_accuracy"],
            cfg.finetuning_type,
            after.get("eval_accuracy", float("nan")),
        )
    log.info(
        "Total wall time %.1fs; results in %s/instruct_results.json",
        results["wall_time_s"],
        out.path,
    )
    return results


def main(argv: Sequence[str] | None = None) -> dict:
    """Parses flags (see ``--help``) and runs :func:`run`.

    Example:
        >>> main(["--max_steps", "2", "--output_dir", "/tmp/x"])  # doctest: +SKIP
    """
    from train import instruct

    cfg = parse_args(argv, InstructConfig, description=instruct.__doc__.split("\n\n")[0])
    return run(cfg)


def cli() -> int:
    """The console entry point (``python -m train.instruct``): :func:`main` with one-line errors
    (``--debug`` shows the traceback)."""
    from train.core.cli import run_main

    return run_main(main, prog="train.instruct")
