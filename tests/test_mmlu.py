"""MMLU evaluator: exact prompt format, k-shot construction, answer scoring, accuracies."""

import csv
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from train.mmlu import (
    Question,
    build_prompt,
    choice_token_ids,
    encode_prompt,
    evaluate_mmlu,
    list_subjects,
    load_csv,
)

FIX = Path(__file__).parent / "fixtures"
MMLU = str(FIX / "mmlu")
REAL = FIX / "mmlu" / "real"  # rows cut byte for byte from the official files (see README.md)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(FIX / "instruct" / "tokenizer")


def fake_model(tok, answers: dict[str, str], seen: list[str] | None = None):
    """A logits function that answers ``answers[question]`` at the last real token only.

    Every other position (and padding) prefers a different letter, so reading the logits at
    the wrong position gives wrong answers.
    """
    letter_ids = dict(zip("ABCD", choice_token_ids(tok), strict=True))
    vocab = len(tok)

    def logits_fn(ids, mask):
        out = np.zeros(ids.shape + (vocab,), np.float32)
        for r in range(ids.shape[0]):
            n = int(mask[r].sum())
            text = tok.decode(ids[r, :n])
            if seen is not None and n > 1:
                seen.append(text)
            question = text.rsplit("\n\n", 1)[-1].split("\nA. ")[0]
            chosen = answers.get(question, "B")
            wrong = "D" if chosen != "D" else "C"
            out[r, :, letter_ids[wrong]] = 5.0
            out[r, n - 1] = 0.0
            out[r, n - 1, letter_ids[chosen]] = 5.0
        return out

    return logits_fn


def test_zero_shot_prompt_is_the_original_format():
    q = Question("What is 2+2?", ("1", "2", "3", "4"), "D")
    assert build_prompt("high_school_mathematics", q) == (
        "The following are multiple choice questions (with answers) about high school "
        "mathematics.\n\nWhat is 2+2?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
    )


def test_k_shot_prompt_puts_answered_dev_examples_first():
    dev = load_csv(f"{MMLU}/dev/world_geography_dev.csv")
    test = load_csv(f"{MMLU}/test/world_geography_test.csv")
    p = build_prompt("world_geography", test[0], dev[:2])
    assert p == (
        "The following are multiple choice questions (with answers) about world geography.\n\n"
        "What is the capital of Italy?\nA. Milan\nB. Rome\nC. Naples\nD. Turin\nAnswer: B\n\n"
        "Which continent is Kenya in?\nA. Asia\nB. Europe\nC. Africa\nD. Oceania\nAnswer: C\n\n"
        "What is the capital of France?\nA. Paris\nB. Lyon\nC. Marseille\nD. Nice\nAnswer:"
    )


def test_csv_parsing_keeps_quoted_commas_and_checks_rows(tmp_path):
    qs = load_csv(f"{MMLU}/test/world_geography_test.csv")
    assert qs[2].question == "Which ocean lies between Africa and Australia, west of India?"
    assert [q.answer for q in qs] == ["A", "C", "A", "D"]
    (tmp_path / "bad_test.csv").write_text("q,a,b,c,d,A\nq2,a,b,c,E\n")
    with pytest.raises(ValueError, match=r"bad_test\.csv, row 1: expected 6 columns"):
        load_csv(str(tmp_path / "bad_test.csv"))
    (tmp_path / "bad2_test.csv").write_text("q,a,b,c,d,E\n")
    with pytest.raises(ValueError, match="answer must be one of A/B/C/D, got 'E'"):
        load_csv(str(tmp_path / "bad2_test.csv"))
    with pytest.raises(FileNotFoundError, match="No MMLU test directory"):
        list_subjects(str(tmp_path))


def test_answer_tokens_are_the_letters_after_answer_colon(tok):
    ids = choice_token_ids(tok)
    assert tok.convert_ids_to_tokens(ids) == ["ĠA", "ĠB", "ĠC", "ĠD"]
    full = tok("Question?\nAnswer: C")["input_ids"]
    assert full[-1] == ids[2]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_accuracy_per_subject_and_average(tok, batch_size):
    answers = {
        # geography: 3 of 4 right (the Nile question answered A instead of C)
        "What is the capital of France?": "A",
        "Which is the longest river in Africa?": "A",
        "Which ocean lies between Africa and Australia, west of India?": "A",
        "Mount Everest lies on the border of Nepal and which country?": "D",
        # chemistry: 1 of 4 right
        "What is the chemical symbol for sodium?": "C",
        "How many protons does a carbon atom have?": "B",
        "Which gas, at room temperature, is a noble gas?": "A",
        "What is the pH of pure water at 25 C?": "A",
    }
    res = evaluate_mmlu(fake_model(tok, answers), tok, MMLU, batch_size=batch_size)
    assert res.subjects == {"college_chemistry": 0.25, "world_geography": 0.75}
    assert res.average == 4 / 8 and res.macro_average == 0.5 and res.num_questions == 8
    assert res.predictions["world_geography"] == ["A", "A", "A", "D"]
    m = res.as_dict()
    assert m["mmlu_average"] == 0.5 and m["mmlu_world_geography"] == 0.75


def test_k_shot_evaluation_sees_k_dev_examples(tok):
    seen: list[str] = []
    res = evaluate_mmlu(
        fake_model(tok, {}, seen), tok, MMLU, k_shot=3, subjects=["college_chemistry"]
    )
    assert res.k_shot == 3 and res.num_questions == 4
    assert len(seen) == 4
    for text in seen:
        assert text.startswith(
            "The following are multiple choice questions (with answers) about college chemistry."
        )
        assert text.count("Answer:") == 4 and text.endswith("Answer:")
        assert "What is H2O commonly called?" in text  # 3rd dev example
        assert "Which bond shares electrons" not in text  # 4th is not used
    # Always answering B: only the pH question is right.
    assert res.subjects["college_chemistry"] == 0.25


def test_shots_are_dropped_to_fit_max_length(tok):
    dev = load_csv(f"{MMLU}/dev/world_geography_dev.csv")
    q = load_csv(f"{MMLU}/test/world_geography_test.csv")[0]
    n0 = len(encode_prompt(tok, "world_geography", q, [], 10_000)[0])
    n2 = len(encode_prompt(tok, "world_geography", q, dev[:2], 10_000)[0])
    ids, k = encode_prompt(tok, "world_geography", q, dev, n2)
    assert k == 2 and len(ids) == n2
    ids, k = encode_prompt(tok, "world_geography", q, dev, n0 - 5)
    assert k == 0 and len(ids) == n0 - 5  # still too long: keeps the end ("...Answer:")
    assert tok.decode(ids).endswith("Answer:")


def _csv_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


@pytest.mark.parametrize(
    "name, n",
    [
        ("test/nutrition_test.csv", 4),
        ("test/college_mathematics_test.csv", 3),
        ("dev/nutrition_dev.csv", 5),
        ("dev/college_mathematics_dev.csv", 5),
    ],
)
def test_real_files_parse_row_for_row_like_csv_reader(name, n):
    rows = _csv_rows(REAL / name)
    qs = load_csv(str(REAL / name))
    assert len(qs) == len(rows) == n
    assert [[q.question, *q.options, q.answer] for q in qs] == rows


def test_crlf_file_with_quoted_multiline_fields_and_no_final_newline():
    raw = (REAL / "test/nutrition_test.csv").read_bytes()
    assert raw.count(b"\r\n") == 3 and not raw.endswith(b"\n")  # the quirks are in the fixture
    qs = load_csv(str(REAL / "test/nutrition_test.csv"))
    # the bare LF inside the quoted question is kept; the CRLF row ends are not in any field
    assert qs[0].question == (
        "Which foods tend to be consumed in lower quantities in Wales and Scotland (as of 2020)?\n"
    )
    assert qs[0].options == ("Meat", "Confectionary", "Fruits and vegetables", "Potatoes")
    assert not any("\r" in f for q in qs for f in (q.question, *q.options, q.answer))
    assert qs[2].question.startswith(
        'Which of the following is true about the diagnosis of "osteopenia" or "osteoporosis"'
    )
    assert [q.answer for q in qs] == ["C", "B", "A", "D"]
    assert qs[3].question == "Which statement about the oral phase of digestion is INCORRECT?\n"
    assert qs[3].options[3] == (
        "Salivary amylase digests the dextran film on tooth enamel formed from dietary sucrose"
    )
    # the prompt shows the question's own trailing newline before the options
    assert "(as of 2020)?\n\nA. Meat\nB. Confectionary\n" in build_prompt("nutrition", qs[0])


def test_lf_file_multiline_question_none_option_and_quoted_options():
    qs = load_csv(str(REAL / "test/college_mathematics_test.csv"))
    assert qs[0].question.split("\n") == [
        "Let V be a finite-dimensional real vector space and let P be a linear transformation "
        "of V such that P^2 = P. Which of the following must be true?",
        "I. P is invertible.",
        "II. P is diagonalizable.",
        "III. P is either the identity transformation or the zero transformation.",
    ]
    assert qs[0].options == ("None", "I only", "II only", "III only")  # text, not NaN
    assert qs[1].options[0] == "None" and qs[1].answer == "D"
    assert qs[2].options == ("(1, 6)", "(-1, 4)", "(3, 2)", "(-4, 3)") and qs[2].answer == "A"


def test_crlf_inside_a_quoted_field_is_kept_verbatim():
    # As the original code's pandas.read_csv keeps it (a 2-shot+ college_mathematics prompt
    # shows it); the file's own row ends are LF.
    qs = load_csv(str(REAL / "dev/college_mathematics_dev.csv"))
    assert qs[2].question.split("\r\n") == [
        "Let A be a real 2x2 matrix. Which of the following statements must be true?",
        "I. All of the entries of A^2 are nonnegative.",
        "II. The determinant of A^2 is nonnegative.",
        "III. If A has two distinct eigenvalues, then A^2 has two distinct eigenvalues.",
    ]
    assert [q.answer for q in qs] == ["D", "D", "B", "C", "B"]
    dev = load_csv(str(REAL / "dev/nutrition_dev.csv"))  # CRLF, no final newline
    assert dev[2].options[1] == (
        'Butyric acid, formed during colonic fibre fermentation stimulates "silencing" of the '
        "SLC5A8 tumour suppressor gene"
    )
    assert [q.answer for q in dev] == ["C", "A", "D", "C", "B"]


def test_empty_test_file_is_an_error(tmp_path, tok):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "empty_test.csv").write_text("")
    with pytest.raises(ValueError, match=r"empty_test\.csv has no questions"):
        evaluate_mmlu(lambda ids, mask: None, tok, str(tmp_path))
