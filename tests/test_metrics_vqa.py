"""The VQA v2 scorer against hand-worked cases of the official vqaEval.py rules, and its CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from epalm.metrics.vqa import (
    MetricsInputError,
    load_json,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    question_accuracy,
    score_vqa,
)
from eval.vqa import main

REPO = Path(__file__).resolve().parents[1]


def answers(*pairs: tuple[str, int]) -> list[dict]:
    """Official-style answer records: answers(("red", 2), ("blue", 8)) -> 10 dicts, unique ids."""
    words = [w for w, n in pairs for _ in range(n)]
    return [{"answer": w, "answer_confidence": "yes", "answer_id": i + 1} for i, w in enumerate(words)]


def annotation(qid: int, qtype: str, atype: str, ans: list[dict]) -> dict:
    return {
        "question_id": qid,
        "image_id": qid // 1000,
        "question_type": qtype,
        "answer_type": atype,
        "multiple_choice_answer": ans[0]["answer"],
        "answers": ans,
    }


def questions_for(anns: list[dict]) -> dict:
    qs = [{"image_id": a["image_id"], "question": "?", "question_id": a["question_id"]} for a in anns]
    return {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "questions": qs}


# ---------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("yes!", "yes "),  # "!" not next to a space: becomes a space
        ("red/blue", "red blue"),
        ("red / blue", "red  blue"),  # "/" next to a space: removed, spaces stay
        ("1,000", "1000"),  # a digit,digit comma anywhere: every punctuation mark is removed
        ("1,000 (approx)", "1000 approx"),  # ... including the brackets, not spaced out
        ("red,blue", "red blue"),  # no digit,digit: comma becomes a space
        ("5.", "5"),  # period not followed by a digit goes
        ("3.5", "3.5"),  # period before a digit stays
        ("x.5", "x.5"),  # the official "(?!<=\d)" is a look-ahead: no digit needed before
        ("u.s.a.", "usa"),
        ("don't", "don't"),  # "'" is not in the master punctuation list
        ("a:b", "a:b"),  # nor is ":"
    ],
)
def test_process_punctuation(raw, expected):
    assert process_punctuation(raw) == expected


def test_period_strip_stops_after_32_periods():
    # The official passes re.UNICODE (== 32) as sub()'s count: only 32 of 40 periods go.
    assert process_punctuation("." * 40 + "a") == "." * 8 + "a"


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),
        ("none", "0"),
        ("ten dogs", "10 dogs"),
        ("eleven", "eleven"),  # the map stops at ten
        ("The Dog", "dog"),
        ("a an the cat", "cat"),
        ("dont", "don't"),
        ("couldn'tve", "couldn't've"),
        ("Im", "im"),  # capitalised official keys never match after lower-casing
        ("somebody'd", "somebodyd"),  # the official entry maps the other way round
        ("  many   spaces ", "many spaces"),
    ],
)
def test_process_digit_article(raw, expected):
    assert process_digit_article(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        (" Yes!\n", "yes"),
        ("\tTwo dogs.", "2 dogs"),
        ("what's up?", "what's up"),  # "whats" is a key, "what's" is not
        ("The U.S.A.", "usa"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


# ---------------------------------------------------------------- per-question accuracy


@pytest.mark.parametrize(
    "num_matching, expected",
    [
        # acc = mean over the 10 annotators of min(1, matches among the other 9 / 3), m matching:
        (0, 0.0),  # nobody matches
        (1, 0.3),  # 1 held out -> 0; 9 held out -> 1/3 each: 3/10
        (2, 0.6),  # 2 held out -> 1/3 each; 8 held out -> 2/3 each: (2/3 + 16/3)/10 = 6/10
        (3, 0.9),  # 3 held out -> 2/3 each; 7 held out -> 1 each: (2 + 7)/10
        (4, 1.0),  # 4 held out -> 1 (3 left); 6 held out -> 1
    ],
)
def test_leave_one_out_accuracy(num_matching, expected):
    ans = answers(("red", num_matching), ("blue", 10 - num_matching))
    assert question_accuracy("red", ans) == pytest.approx(expected, abs=1e-12)


def test_unanimous_answers_are_not_normalised():
    unanimous = answers(("yes", 10))
    assert question_accuracy("Yes", unanimous) == 0.0  # no lower-casing when annotators agree
    assert question_accuracy("yes!", unanimous) == 0.0
    assert question_accuracy(" yes\n", unanimous) == 1.0  # whitespace is always cleaned
    assert question_accuracy("dog", answers(("the dog", 10))) == 0.0  # article kept too
    assert question_accuracy("yes", answers(("yes.", 10))) == 0.0  # and the GT period


def test_disagreeing_answers_normalise_both_sides():
    # 9 "yes" + 1 "no" differ, so "Yes!" -> "yes" matches 9: 1.0
    assert question_accuracy("Yes!", answers(("yes", 9), ("no", 1))) == 1.0
    # "two" x3 and "2" x2 all become "2": 5 matches -> 1.0, whichever spelling is predicted
    ans = answers(("two", 3), ("2", 2), ("three", 5))
    assert question_accuracy("Two", ans) == 1.0
    assert question_accuracy("2", ans) == 1.0
    # "The dog" x2 vs "dog" x1 vs "cat" x7 -> "dog" x3: 0.9
    assert question_accuracy("a dog", answers(("The dog", 2), ("dog", 1), ("cat", 7))) == pytest.approx(0.9)


def test_legacy_rules_of_epalms_own_evaluator():
    # Legacy: the prediction is always normalised, so "Yes" matches ten "yes": 1.0 (official: 0).
    assert question_accuracy("Yes", answers(("yes", 10)), rules="legacy") == 1.0
    # Legacy annotator answers only get punctuation processing: "two" is not mapped to "2", so
    # the normalised prediction "2" matches none of the 4 "two": 0.0. Official maps both: 1.0.
    ans = answers(("two", 4), ("three", 6))
    assert question_accuracy("two", ans, rules="legacy") == 0.0
    assert question_accuracy("two", ans) == 1.0
    with pytest.raises(ValueError, match="rules"):
        question_accuracy("two", ans, rules="lenient")


# ---------------------------------------------------------------- whole-file scoring


@pytest.fixture
def vqa_case():
    anns = [
        annotation(1001, "what color", "other", answers(("red", 2), ("blue", 8))),  # "red" -> 0.6
        annotation(1002, "what color", "other", answers(("white", 10))),  # "white" -> 1.0
        annotation(2003, "is the", "yes/no", answers(("no", 1), ("yes", 9))),  # "no" -> 0.3
    ]
    results = [
        {"question_id": 1001, "answer": "Red."},
        {"question_id": 2003, "answer": "no"},
        {"question_id": 1002, "answer": "white"},
    ]
    return results, questions_for(anns), {"annotations": anns}


def test_score_vqa_overall_and_per_type(vqa_case):
    scores = score_vqa(*vqa_case)
    assert scores == {
        "overall": 63.33,  # (0.6 + 1.0 + 0.3) / 3 = 0.6333
        "perQuestionType": {"what color": 80.0, "is the": 30.0},  # (0.6 + 1.0) / 2; 0.3
        "perAnswerType": {"other": 80.0, "yes/no": 30.0},
    }


def test_rounding_happens_once_on_the_mean():
    # q1: no match -> 0. q2: two annotators "x", "y" (differ): holding out "x" leaves 0 matches,
    # holding out "y" leaves 1 -> 1/3; mean 1/6 = 16.666...%. Mean of both = 8.333... -> 8.33.
    # Rounding each question first would give (0 + 16.67) / 2 = 8.335 -> 8.34.
    anns = [
        annotation(1, "what", "other", answers(("a1", 10))),
        annotation(2, "what", "other", answers(("x", 1), ("y", 1))),
    ]
    results = [{"question_id": 1, "answer": "zzz"}, {"question_id": 2, "answer": "x"}]
    assert score_vqa(results, questions_for(anns), {"annotations": anns})["overall"] == 8.33


def test_missing_and_extra_ids_fail_clearly(vqa_case):
    results, questions, annotations = vqa_case
    with pytest.raises(
        MetricsInputError, match=r"1 question id\(s\) in the references have no prediction \(e.g. 1002\)"
    ):
        score_vqa(results[:2], questions, annotations)
    extra = [*results, {"question_id": 999, "answer": "x"}]
    with pytest.raises(
        MetricsInputError, match=r"1 predicted question id\(s\) are not in the references \(e.g. 999\)"
    ):
        score_vqa(extra, questions, annotations)
    as_str = [{**r, "question_id": str(r["question_id"])} for r in results]
    with pytest.raises(MetricsInputError, match="id types differ"):
        score_vqa(as_str, questions, annotations)


def test_subset_scores_only_predicted_questions(vqa_case):
    results, questions, annotations = vqa_case
    scores = score_vqa(results[:1], questions, annotations, restrict_to_results=True)
    assert scores["overall"] == 60.0  # just q1001: 0.6
    with pytest.raises(MetricsInputError, match="not in the references"):
        score_vqa([{"question_id": 5, "answer": "x"}], questions, annotations, restrict_to_results=True)


def test_malformed_inputs_fail_clearly(vqa_case, tmp_path):
    results, questions, annotations = vqa_case
    with pytest.raises(MetricsInputError, match=r"prediction #0: missing key\(s\) \['answer'\]"):
        score_vqa([{"question_id": 1001}], questions, annotations)
    with pytest.raises(MetricsInputError, match="expected a JSON list"):
        score_vqa({"question_id": 1001}, questions, annotations)
    with pytest.raises(MetricsInputError, match="'annotations'"):
        score_vqa(results, questions, {"anns": []})
    dup = {"annotations": annotations["annotations"] + annotations["annotations"][:1]}
    with pytest.raises(MetricsInputError, match="1001 appears twice"):
        score_vqa(results, questions, dup)
    with pytest.raises(MetricsInputError, match="not in the questions file"):
        score_vqa(results, {"questions": []}, annotations)
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(MetricsInputError, match="not valid JSON"):
        load_json(bad)


# ---------------------------------------------------------------- CLI


def write_case(tmp_path: Path, results, questions, annotations) -> list[str]:
    paths = {}
    for name, obj in [("pred", results), ("questions", questions), ("annotations", annotations)]:
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(obj))
    return [
        "--predictions", str(paths["pred"]),
        "--questions", str(paths["questions"]),
        "--annotations", str(paths["annotations"]),
    ]  # fmt: skip


def test_cli_prints_and_writes_scores(vqa_case, tmp_path, capsys):
    out = tmp_path / "scores.json"
    assert main([*write_case(tmp_path, *vqa_case), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["overall"] == 63.33
    assert printed["perAnswerType"] == {"other": 80.0, "yes/no": 30.0}
    assert json.loads(out.read_text()) == printed


def test_cli_legacy_rules(vqa_case, tmp_path, capsys):
    results, questions, annotations = vqa_case
    results = [{**r, "answer": "White"} if r["question_id"] == 1002 else r for r in results]
    assert main(write_case(tmp_path, results, questions, annotations)) == 0
    assert json.loads(capsys.readouterr().out)["overall"] == 30.0  # (0.6 + 0 + 0.3) / 3
    assert main([*write_case(tmp_path, results, questions, annotations), "--rules", "legacy"]) == 0
    assert json.loads(capsys.readouterr().out)["overall"] == 63.33  # (0.6 + 1.0 + 0.3) / 3


def test_cli_reports_id_mismatch(vqa_case, tmp_path, capsys):
    results, questions, annotations = vqa_case
    assert main(write_case(tmp_path, results[:2], questions, annotations)) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "1002" in err


def test_cli_runs_as_module(vqa_case, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "eval.vqa", *write_case(tmp_path, *vqa_case)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["perQuestionType"] == {"what color": 80.0, "is the": 30.0}
