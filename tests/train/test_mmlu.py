"""MMLU evaluator: exact prompt format, k-shot construction, answer scoring, accuracies."""

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from transformers import AutoTokenizer

from train import mmlu
from train.mmlu import (
    DecoderScorer,
    FullLogits,
    Question,
    build_prompt,
    choice_token_ids,
    encode_prompt,
    evaluate_mmlu,
    list_subjects,
    load_csv,
    plan_batches,
    truncate_left,
)
from train.models.decoder import DecoderApply, LlamaConfig, LlamaForCausalLM

FIX = Path(__file__).resolve().parents[1] / "fixtures"
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
    ids, k, cut = encode_prompt(tok, "world_geography", q, dev, n2)
    assert k == 2 and len(ids) == n2 and not cut
    ids, k, cut = encode_prompt(tok, "world_geography", q, dev, n0 - 5)
    assert k == 0 and len(ids) == n0 - 5 and cut  # still too long: keeps the end ("...Answer:")
    assert tok.decode(ids).endswith("Answer:")


def test_fewer_shots_and_truncation_are_counted(tok):
    dev = load_csv(f"{MMLU}/dev/world_geography_dev.csv")
    test = load_csv(f"{MMLU}/test/world_geography_test.csv")
    n0 = [len(encode_prompt(tok, "world_geography", q, [], 10_000).ids) for q in test]
    n1 = [len(encode_prompt(tok, "world_geography", q, dev[:1], 10_000).ids) for q in test]
    limit = max(n0) - 1  # the longest question is cut; no prompt keeps a shot
    assert min(n1) > limit
    res = evaluate_mmlu(fake_model(tok, {}), tok, MMLU, 3, ["world_geography"], max_length=limit)
    assert res.num_fewer_shots == 4 and res.num_truncated == sum(n > limit for n in n0) > 0
    assert res.max_prompt_tokens == limit and res.max_length == limit
    m = res.as_dict()
    assert m["mmlu_num_truncated"] == res.num_truncated and m["mmlu_num_fewer_shots"] == 4
    assert m["mmlu_seconds"] > 0 and m["mmlu_questions_per_second"] > 0


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


# ----------------------------------------------------------------------------- fast path

# the fixture tokenizer's vocab; a wide init so the answer logits are far from ties
CFG = LlamaConfig.tiny(vocab_size=512, max_position_embeddings=4096, initializer_range=0.2)


@pytest.fixture(scope="module")
def tiny():
    graphdef, state = nnx.split(LlamaForCausalLM(CFG, rngs=nnx.Rngs(0)), nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def full_logits_fn(tiny):
    graphdef, params = tiny
    f = jax.jit(DecoderApply(graphdef))
    return lambda ids, mask: f(params, jnp.asarray(ids), jnp.asarray(mask))


def encoded(tok, data_dir, k_shot, max_length=10_000):
    prompts, groups = [], []
    for subject in list_subjects(data_dir):
        dev = load_csv(f"{data_dir}/dev/{subject}_dev.csv")[:k_shot]
        for q in load_csv(f"{data_dir}/test/{subject}_test.csv"):
            e = encode_prompt(tok, subject, q, dev, max_length)
            prompts.append(e.ids)
            groups.append((subject, e.shots))
    return prompts, groups


@pytest.mark.parametrize("data_dir", [MMLU, str(REAL)])
@pytest.mark.parametrize("k_shot", [0, 3])
@pytest.mark.parametrize(
    "kw",
    [
        dict(padding_side="right"),
        dict(padding_side="left", tokens_per_batch=256),  # several widths, filler rows
        dict(padding_side="right", tokens_per_batch=64, min_prefix=8),  # one row per batch
        dict(padding_side="left", prefix_cache=False),
    ],
)
def test_fast_scorer_matches_full_logits_on_a_tiny_decoder(tok, tiny, data_dir, k_shot, kw):
    prompts, groups = encoded(tok, data_dir, k_shot)
    ids = choice_token_ids(tok) + list(range(3, 512, 5))  # more columns than the 4 letters
    ref = FullLogits(full_logits_fn(tiny), batch_size=3).choice_logits(prompts, ids, 0)
    scorer = DecoderScorer(*tiny, **kw)
    fast = scorer.choice_logits(prompts, ids, 0, groups)
    np.testing.assert_allclose(fast, ref, rtol=1e-4, atol=1e-4)
    assert (fast.argmax(-1) == ref.argmax(-1)).all()
    assert np.ptp(ref, axis=0).max() > 0.05  # the rows differ (each its own last token)
    assert scorer.stats["questions"] == len(prompts)
    # each token is run once: in its question's forward or in its subject's cached prefix
    cached = shared = 0
    for g in set(groups):
        rows = [p for p, h in zip(prompts, groups, strict=True) if h == g]
        p = min(mmlu.common_prefix_length(rows), min(map(len, rows)) - 1)
        if kw.get("prefix_cache", True) and p >= kw.get("min_prefix", 64):
            cached, shared = cached + 1, shared + p * (len(rows) - 1)
    assert scorer.stats["prefixes"] == cached
    if k_shot and kw.get("prefix_cache", True):
        assert cached == 2  # one per subject: the header and the 3 answered examples
    total = scorer.stats["tokens"] + scorer.stats["prefix_tokens"] + shared
    assert total == sum(map(len, prompts))


def test_fast_and_full_paths_give_the_same_mmlu_result(tok, tiny):
    # prompts that lose shots to max_length form their own (subject, shots) prefix groups
    prompts, _ = encoded(tok, str(REAL), 5)
    limit = sorted(map(len, prompts))[len(prompts) // 2]
    full = evaluate_mmlu(full_logits_fn(tiny), tok, str(REAL), 5, max_length=limit)
    scorer = DecoderScorer(*tiny, tokens_per_batch=512, min_prefix=16)
    fast = evaluate_mmlu(scorer, tok, str(REAL), 5, max_length=limit)
    assert 0 < fast.num_fewer_shots < fast.num_questions == 7
    assert fast.predictions == full.predictions and fast.subjects == full.subjects
    assert fast.num_fewer_shots == full.num_fewer_shots
    assert scorer.stats["prefixes"] >= 3  # some subject has prompts at two shot counts


def test_fast_path_does_not_compute_logits_at_every_position(tiny):
    graphdef, params = tiny
    ids = jnp.ones((4, 64), jnp.int32)
    last = jnp.full((4,), 63, jnp.int32)
    cids = jnp.arange(4)
    fast = mmlu._last_token_logits.lower(graphdef, params, ids, ids, last, cids).compile()
    full = jax.jit(DecoderApply(graphdef)).lower(params, ids, ids).compile()
    assert "f32[4,64,512]" in full.as_text()
    assert "f32[4,64,512]" not in fast.as_text()


def test_plan_batches_covers_every_prompt_once_in_few_shapes():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 700, 500).tolist()
    batches = plan_batches(lengths, tokens_per_batch=1024, max_batch_size=16)
    rows = [r for b in batches for r in b.rows]
    assert sorted(rows) == list(range(500))
    assert all(lengths[r] <= b.width for b in batches for r in b.rows)
    assert all(0 < len(b.rows) <= b.size <= 16 for b in batches)
    shapes = {(b.size, b.width) for b in batches[:-1]}  # one row count per width ...
    widths = {mmlu.bucket_width(n) for n in range(1, 700)}
    assert len(shapes) == len({b.width for b in batches[:-1]}) <= len(widths) == 14
    assert all(len(b.rows) == b.size for b in batches[:-1])  # ... and no filler rows
    last = batches[-1]  # ... but the last batch: the next power of two rows
    assert last.size == min(16, 1024 // last.width, 1 << (len(last.rows) - 1).bit_length())
    padded = sum(b.size * b.width for b in batches)
    assert padded < 1.5 * sum(lengths)


def test_left_truncation_keeps_bos_and_the_question_end():
    assert truncate_left([1, 2, 3, 4, 5], 3, bos_id=1) == [1, 4, 5]
    assert truncate_left([7, 2, 3, 4, 5], 3, bos_id=1) == [3, 4, 5]
    assert truncate_left([1, 2], 3, bos_id=1) == [1, 2]


def test_main_writes_the_results_json(tmp_path, monkeypatch, tok, tiny):
    graphdef, params = tiny
    fake = SimpleNamespace(
        graphdef=graphdef, params=params, config=CFG, apply_fn=DecoderApply(graphdef)
    )
    monkeypatch.setattr(mmlu, "load_scorer_model", lambda name, dtype, delta: (fake, tok))
    out = tmp_path / "mmlu.json"
    argv = ["--mmlu_dir", str(REAL), "--mmlu_k_shot", "5", "--output_file", str(out)]
    res = mmlu.main(argv + ["--max_length", "1000"])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(res))
    assert saved["mmlu_k_shot"] == 5 and saved["mmlu_num_questions"] == 7
    assert saved["mmlu_max_length"] == 1000 and "mmlu_num_truncated" in saved
    assert set(saved) >= {"mmlu_nutrition", "mmlu_college_mathematics", "mmlu_average"}
    assert saved["mmlu_questions_per_second"] > 0 and saved["scorer"] == "decoder"
    assert len(saved["predictions"]["nutrition"]) == 4
    assert saved["scorer_stats"]["prefixes"] >= 2
    assert not (tmp_path / "mmlu.json.partial.json").exists()  # removed once results are out
    full = mmlu.main(argv + ["--max_length", "1000", "--full_logits"])
    assert full["predictions"] == saved["predictions"]
    with pytest.raises(ValueError, match="exceeds the model's context"):
        mmlu.main(argv + ["--max_length", "5000"])  # beyond the model's 4096 positions


GEO = {"What is the capital of France?": "A", "What is the chemical symbol for sodium?": "C"}


def test_interrupted_run_resumes_from_the_progress_file(tok, tmp_path):
    progress = str(tmp_path / "mmlu.partial.json")
    full = evaluate_mmlu(fake_model(tok, GEO), tok, MMLU, k_shot=2, max_length=300)
    fn = fake_model(tok, GEO)

    def crashes_on_geography(ids, mask):
        if "geography" in tok.decode(ids[0]):
            raise KeyboardInterrupt  # the run is stopped in its second subject
        return fn(ids, mask)

    with pytest.raises(KeyboardInterrupt):
        evaluate_mmlu(crashes_on_geography, tok, MMLU, 2, max_length=300, progress_file=progress)
    saved = json.loads(Path(progress).read_text())
    assert list(saved["subjects"]) == ["college_chemistry"]  # the finished subject is kept
    seen: list[str] = []
    res = evaluate_mmlu(
        fake_model(tok, GEO, seen), tok, MMLU, 2, max_length=300, progress_file=progress
    )
    assert seen and all("geography" in t for t in seen)  # chemistry is not scored again
    assert res.resumed_subjects == 1 and res.as_dict()["mmlu_resumed_subjects"] == 1
    assert res.predictions == full.predictions and res.subjects == full.subjects
    assert (res.average, res.num_fewer_shots, res.num_truncated, res.prompt_tokens) == (
        full.average,
        full.num_fewer_shots,
        full.num_truncated,
        full.prompt_tokens,
    )
    assert res.seconds >= saved["subjects"]["college_chemistry"]["seconds"]
    again = evaluate_mmlu(lambda *a: 1 / 0, tok, MMLU, 2, max_length=300, progress_file=progress)
    assert again.predictions == full.predictions  # everything recorded: nothing scored


def test_progress_file_of_other_settings_is_refused(tok, tmp_path):
    progress = str(tmp_path / "p.json")
    evaluate_mmlu(fake_model(tok, {}), tok, MMLU, 0, ["world_geography"], progress_file=progress)
    with pytest.raises(ValueError, match=r"p\.json holds MMLU progress .*k_shot: 0 there, 3 now"):
        evaluate_mmlu(fake_model(tok, {}), tok, MMLU, 3, progress_file=progress)
    with pytest.raises(ValueError, match="model: 'a' there, 'b' now"):
        p2 = str(tmp_path / "p2.json")
        evaluate_mmlu(fake_model(tok, {}), tok, MMLU, progress_file=p2, progress_key={"model": "a"})
        evaluate_mmlu(fake_model(tok, {}), tok, MMLU, progress_file=p2, progress_key={"model": "b"})
    p3, key = str(tmp_path / "p3.json"), {"settings": ("a", 1)}  # a tuple reads back a list
    for _ in range(2):
        evaluate_mmlu(fake_model(tok, {}), tok, MMLU, progress_file=p3, progress_key=key)
    with pytest.raises(ValueError, match="max_questions_per_subject must be >= 1"):
        evaluate_mmlu(fake_model(tok, {}), tok, MMLU, max_questions_per_subject=0)
    Path(progress).write_text('{"key": {}, "subjects": {"world_geography": {}}}')
    with pytest.raises(ValueError, match="not an MMLU progress file"):
        evaluate_mmlu(fake_model(tok, {}), tok, MMLU, progress_file=progress)
    Path(progress).write_text("{not json")
    with pytest.raises(ValueError, match="not an MMLU progress file.*delete it"):
        evaluate_mmlu(fake_model(tok, {}), tok, MMLU, progress_file=progress)
