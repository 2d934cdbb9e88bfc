"""Normalised exact match for GQA / MSRVTT-QA / MSVD-QA, the reference formats it reads, and its CLI."""

import json

import pytest

from epalm.metrics.qa import normalize_qa_answer, score_qa
from epalm.metrics.vqa import MetricsInputError
from eval.qa import main


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The Dog.", "dog"),
        ("Two", "2"),
        (" a man\n", "man"),
        ("1,000", "1000"),
        ("red, blue", "red blue"),  # ", " -> comma dropped, no double comma left for the final strip
        ("dont", "don't"),
    ],
)
def test_normalize_qa_answer(raw, expected):
    assert normalize_qa_answer(raw) == expected


def test_normalised_exact_match_over_reference_formats():
    references = [
        {"question_id": "07333408", "sent": "What is on the wall?", "label": {"pipe": 1.0}},  # GQA
        {"question_id": 2, "video": "video7010.mp4", "answer": "two"},  # MSRVTT-QA plain answer
        {"question_id": 3, "answers": ["cat", "kitten"]},
        {"question_id": 4, "answers": [{"answer": "net", "score": 0.6}, {"answer": "nets", "score": 0.3}]},
        {"question_id": 5, "label": {"man": 1.0}},
    ]
    predictions = [
        {"question_id": 7333408, "answer": "Pipe."},  # int id matches the zero-padded string: 1.0
        {"question_id": 2, "answer": "2"},  # "two" -> "2": 1.0
        {"question_id": 3, "answer": "a kitten"},  # article dropped: 1.0
        {"question_id": 4, "answer": "Nets"},  # soft label: 0.3
        {"question_id": 5, "answer": "woman"},  # 0
    ]
    # (1 + 1 + 1 + 0.3 + 0) / 5 = 0.66 -> 66.0
    assert score_qa(predictions, references) == {"accuracy": 66.0, "num_questions": 5}


def test_accuracy_is_rounded_to_two_decimals():
    references = [{"question_id": i, "answer": "yes"} for i in range(3)]
    predictions = [{"question_id": i, "answer": a} for i, a in enumerate(["yes", "Yes!", "no"])]
    assert score_qa(predictions, references)["accuracy"] == 66.67  # 2/3


def test_mismatched_and_duplicate_ids_fail_clearly():
    references = [{"question_id": i, "answer": "yes"} for i in range(4)]
    predictions = [{"question_id": i, "answer": "yes"} for i in range(3)]
    with pytest.raises(
        MetricsInputError, match=r"1 question id\(s\) in the references have no prediction \(e.g. 3\)"
    ):
        score_qa(predictions, references)
    with pytest.raises(
        MetricsInputError, match=r"1 predicted question id\(s\) are not in the references \(e.g. 9\)"
    ):
        score_qa(
            [*predictions, {"question_id": 3, "answer": "x"}, {"question_id": 9, "answer": "x"}], references
        )
    with pytest.raises(MetricsInputError, match="appears twice"):
        score_qa([*predictions, {"question_id": 2, "answer": "x"}], references[:3])
    with pytest.raises(MetricsInputError, match="needs one of 'label', 'answers' or 'answer'"):
        score_qa(predictions[:1], [{"question_id": 0, "sent": "?"}])


def test_cli(tmp_path, capsys):
    pred, ref, out = tmp_path / "p.json", tmp_path / "r.json", tmp_path / "s.json"
    pred.write_text(json.dumps([{"question_id": 1, "answer": "Yes"}, {"question_id": 2, "answer": "3"}]))
    ref.write_text(json.dumps([{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "two"}]))
    assert main(["--predictions", str(pred), "--references", str(ref), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"accuracy": 50.0, "num_questions": 2} == json.loads(out.read_text())
    ref.write_text(json.dumps([{"question_id": 1, "answer": "yes"}]))
    assert main(["--predictions", str(pred), "--references", str(ref)]) == 2
    assert "are not in the references (e.g. 2)" in capsys.readouterr().err
