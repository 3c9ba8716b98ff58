"""MMLU-style multiple-choice evaluation (zero- or k-shot) from local CSV files.

The layout is the original MMLU release's: ``<dir>/dev/<subject>_dev.csv`` (few-shot examples)
and ``<dir>/test/<subject>_test.csv``, no header, columns ``question, A, B, C, D, answer``.
Prompts are the original code's (Hendrycks et al.)::

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

and the prediction is the argmax over the next-token logits of the answer letters (``" A"``,
``" B"``, ...), as in the original code and the SIFT paper's evaluation. When a prompt is longer
than ``max_length`` the number of shots is reduced (as the original does), and a zero-shot
prompt that is still too long keeps its last ``max_length`` tokens.

Anything that maps ``(input_ids, attention_mask) -> [batch, seq, vocab]`` logits can be
evaluated, so a tiny random model or a fake function tests it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

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


def list_subjects(data_dir: str) -> list[str]:
    """Subjects with a ``test/<subject>_test.csv`` file, sorted.

    Example:
        >>> list_subjects("tests/fixtures/mmlu")
        ['college_chemistry', 'world_geography']
    """
    test_dir = os.path.join(data_dir, "test")
    if not os.path.isdir(test_dir):
        raise FileNotFoundError(
            f"No MMLU test directory {test_dir} (expected <dir>/test/<subject>_test.csv)."
        )
    return sorted(f[: -len("_test.csv")] for f in os.listdir(test_dir) if f.endswith("_test.csv"))


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


def encode_prompt(
    tokenizer, subject: str, question: Question, shots: Sequence[Question], max_length: int
) -> tuple[list[int], int]:
    """Token ids of the prompt, dropping shots while it exceeds ``max_length``.

    Returns:
        ``(ids, shots_used)``; a zero-shot prompt still too long keeps its last tokens.

    Example:
        >>> from transformers import AutoTokenizer
        >>> tok = AutoTokenizer.from_pretrained("tests/fixtures/instruct/tokenizer")
        >>> q = Question("2+2?", ("1", "2", "3", "4"), "D")
        >>> ids, k = encode_prompt(tok, "math", q, [q, q], max_length=10_000)
        >>> k, tok.decode(ids).endswith("Answer:")
        (2, True)
    """
    k = len(shots)
    while True:
        ids = list(tokenizer(build_prompt(subject, question, shots[:k]))["input_ids"])
        if len(ids) <= max_length:
            return ids, k
        if k == 0:
            return ids[-max_length:], 0
        k -= 1


@dataclass
class MMLUResult:
    """Accuracies: per subject, the question-weighted average (the original MMLU number) and
    the unweighted mean over subjects."""

    subjects: dict[str, float]
    average: float
    macro_average: float
    num_questions: int
    k_shot: int
    predictions: dict[str, list[str]] = field(default_factory=dict, repr=False)

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
        }
        out.update({f"mmlu_{s}": a for s, a in self.subjects.items()})
        return out


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def predict(
    logits_fn: LogitsFn,
    prompts: Sequence[list[int]],
    choice_ids: Sequence[int],
    pad_id: int,
    batch_size: int = 8,
    pad_to_multiple_of: int = 64,
) -> np.ndarray:
    """Index of the highest-scoring choice for each tokenized prompt.

    Batches are right-padded to a multiple of ``pad_to_multiple_of`` and to ``batch_size``
    rows (few distinct shapes for a jitted ``logits_fn``); the logits are read at each
    prompt's last real token.

    Example:
        >>> def logits_fn(ids, mask):  # favours token 7 everywhere
        ...     out = np.zeros(ids.shape + (10,)); out[..., 7] = 1.0; return out
        >>> predict(logits_fn, [[1, 2], [3]], choice_ids=[5, 6, 7, 8], pad_id=0).tolist()
        [2, 2]
    """
    preds = []
    choice_ids = np.asarray(choice_ids)
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        width = _round_up(max(len(p) for p in chunk), pad_to_multiple_of)
        ids = np.full((batch_size, width), pad_id, np.int32)
        mask = np.zeros((batch_size, width), np.int32)
        for r, p in enumerate(chunk):
            ids[r, : len(p)] = p
            mask[r, : len(p)] = 1
        mask[len(chunk) :, 0] = 1  # filler rows: one token, ignored
        logits = np.asarray(logits_fn(ids, mask))
        last = np.maximum(mask.sum(1) - 1, 0)
        scores = logits[np.arange(batch_size), last][:, choice_ids]
        preds.append(scores.argmax(-1)[: len(chunk)])
    return np.concatenate(preds) if preds else np.zeros(0, np.int64)


def evaluate_mmlu(
    logits_fn: LogitsFn,
    tokenizer,
    data_dir: str,
    k_shot: int = 0,
    subjects: Sequence[str] | None = None,
    batch_size: int = 8,
    max_length: int = 2048,
    max_questions_per_subject: int | None = None,
    verbose: bool = False,
) -> MMLUResult:
    """MMLU accuracy of a model given as ``logits_fn``.

    Args:
        logits_fn: ``(input_ids [b, s] int32, attention_mask [b, s]) -> [b, s, vocab]``.
        tokenizer: an HF tokenizer (its special tokens, e.g. BOS, are added to each prompt).
        data_dir: the MMLU directory (``dev/`` and ``test/`` CSVs).
        k_shot: answered dev examples in each prompt (0 = zero-shot).
        subjects: subjects to run (default: every ``test/*_test.csv``).
        batch_size: prompts per ``logits_fn`` call.
        max_length: longest prompt in tokens (shots are dropped to fit).
        max_questions_per_subject: evaluate only the first N test questions of each subject.
        verbose: print one line per subject.

    Returns:
        An :class:`MMLUResult`.

    Example:
        >>> from transformers import AutoTokenizer
        >>> tok = AutoTokenizer.from_pretrained("tests/fixtures/instruct/tokenizer")
        >>> always_a = lambda ids, mask: np.eye(len(tok))[np.full(ids.shape, 272)]  # " A"
        >>> r = evaluate_mmlu(always_a, tok, "tests/fixtures/mmlu")
        >>> r.subjects
        {'college_chemistry': 0.25, 'world_geography': 0.5}
    """
    subjects = list(subjects) if subjects is not None else list_subjects(data_dir)
    if not subjects:
        raise ValueError(f"No MMLU subjects found in {data_dir}/test.")
    choice_ids = choice_token_ids(tokenizer)
    if len(set(choice_ids)) != len(choice_ids):
        raise ValueError(f"The answer letters do not map to distinct tokens: {choice_ids}.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    accs: dict[str, float] = {}
    preds_by_subject: dict[str, list[str]] = {}
    total_correct = total = 0
    for subject in subjects:
        test_path = os.path.join(data_dir, "test", f"{subject}_test.csv")
        test = load_csv(test_path)
        if not test:
            raise ValueError(f"{test_path} has no questions.")
        if max_questions_per_subject is not None:
            test = test[:max_questions_per_subject]
        shots: list[Question] = []
        if k_shot > 0:
            dev_path = os.path.join(data_dir, "dev", f"{subject}_dev.csv")
            if not os.path.exists(dev_path):
                raise FileNotFoundError(f"--mmlu_k_shot {k_shot} needs {dev_path}.")
            shots = load_csv(dev_path)[:k_shot]
        prompts = [encode_prompt(tokenizer, subject, q, shots, max_length)[0] for q in test]
        pred = predict(logits_fn, prompts, choice_ids, pad_id, batch_size)
        letters = [CHOICES[i] for i in pred]
        correct = sum(p == q.answer for p, q in zip(letters, test, strict=True))
        accs[subject] = correct / max(len(test), 1)
        preds_by_subject[subject] = letters
        total_correct += correct
        total += len(test)
        if verbose:
            print(f"MMLU {subject}: {accs[subject]:.4f} ({correct}/{len(test)})")
    return MMLUResult(
        accs,
        total_correct / max(total, 1),
        float(np.mean(list(accs.values()))),
        total,
        k_shot,
        preds_by_subject,
    )


def main(argv: Sequence[str] | None = None) -> dict:
    """``python -m train.mmlu --mmlu_dir DIR [--model_name_or_path M] [--delta D]``.

    Example:
        >>> main(["--mmlu_dir", "data/mmlu", "--delta", "d.safetensors"])  # doctest: +SKIP
    """
    from train import generate as gen

    p = argparse.ArgumentParser(description="MMLU evaluation of a (SIFT-tuned) decoder.")
    gen.add_model_args(p)
    p.add_argument("--mmlu_dir", required=True, help="MMLU directory (dev/ and test/ CSVs).")
    p.add_argument("--mmlu_k_shot", type=int, default=0, help="Answered examples per prompt.")
    p.add_argument("--subjects", nargs="*", default=None, help="Subjects (default: all).")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--max_length", type=int, default=2048)
    p.add_argument("--max_questions_per_subject", type=int, default=None)
    p.add_argument("--output_file", default=None, help="Write the metrics JSON here.")
    args = p.parse_args(argv)
    model = gen.load_model(args)
    res = evaluate_mmlu(
        model.logits_fn,
        model.tokenizer,
        args.mmlu_dir,
        args.mmlu_k_shot,
        args.subjects,
        args.batch_size,
        args.max_length,
        args.max_questions_per_subject,
        verbose=True,
    )
    print(f"MMLU average accuracy: {res.average:.4f} over {res.num_questions} questions")
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump(res.as_dict(), f, indent=2)
    return res.as_dict()


if __name__ == "__main__":
    main()
