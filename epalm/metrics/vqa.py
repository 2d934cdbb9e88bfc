"""VQA v2 accuracy, reproducing GT-Vision-Lab/VQA `vqaEval.py` (master) number for number.

Also owns the answer normalisation and the JSON/id checks that the other scorers reuse.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Any, Literal

# The official tables, reproduced entry by entry: the scores depend on every one of them.
# Keys with capitals ("Im", "Ive", "Id've", "I'dve") can never match because words are
# lower-cased first; they are kept anyway so the table reads like the official one.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    # Official quirk: this entry maps *to* the unpunctuated form.
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
# Order matters: each character is handled in turn. Neither "'" nor ":" nor "." is here.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
               ">", "<", "@", "`", ",", "?", "!")  # fmt: skip
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a look-AHEAD for "<=digit"
# (not the look-behind it resembles) and never fires at a ".", so only "not followed by a
# digit" counts: "5.x" loses its period, "3.5" and "x.5" keep theirs.
_PERIOD = re.compile(r"\.(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
# The official call is `periodStrip.sub("", text, re.UNICODE)`: the flag lands in the `count`
# argument, so at most re.UNICODE == 32 periods are removed per answer.
_PERIOD_MAX_REMOVALS = int(re.UNICODE)


class MetricsInputError(ValueError):
    """A predictions/annotations file is malformed or does not match the other."""


def load_json(path: str | Path) -> Any:
    """Read a JSON file, turning a missing file or bad JSON into one clear error."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise MetricsInputError(f"{path}: no such file") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MetricsInputError(f"{path}: not valid JSON ({e})") from e


def require(record: Any, keys: Iterable[str], what: str) -> None:
    """Check that `record` is a dict holding `keys`; `what` names it in the error."""
    if not isinstance(record, dict):
        raise MetricsInputError(f"{what}: expected an object, got {type(record).__name__}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise MetricsInputError(f"{what}: missing key(s) {missing}; has {sorted(record)}")


def check_same_ids(predicted: Iterable[Hashable], expected: Iterable[Hashable], kind: str) -> None:
    """Raise unless the two id sets are equal, saying how many are missing/extra, with examples."""
    predicted, expected = set(predicted), set(expected)
    if predicted == expected:
        return
    missing, extra = expected - predicted, predicted - expected

    def examples(ids: set) -> str:
        try:
            shown = sorted(ids)[:5]
        except TypeError:  # mixed id types
            shown = sorted(ids, key=repr)[:5]
        return ", ".join(repr(i) for i in shown) + (", ..." if len(ids) > 5 else "")

    parts = []
    if missing:
        parts.append(
            f"{len(missing)} {kind} id(s) in the references have no prediction (e.g. {examples(missing)})"
        )
    if extra:
        parts.append(
            f"{len(extra)} predicted {kind} id(s) are not in the references (e.g. {examples(extra)})"
        )
    if {type(i) for i in predicted} != {type(i) for i in expected}:
        parts.append("note: the id types differ (e.g. str vs int)")
    raise MetricsInputError("predictions do not match the reference set: " + "; ".join(parts))


def clean_whitespace(text: str) -> str:
    """Tabs and newlines become spaces, then the ends are stripped (done to every answer)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """Official `processPunctuation`: drop or space out punctuation, then strip periods."""
    # Both tests look at the *input* text, not the partly processed one. A digit,digit
    # anywhere makes every listed character vanish instead of turning into a space.
    has_digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_MAX_REMOVALS)


def process_digit_article(text: str) -> str:
    """Official `processDigitArticle`: lower-case, number words to digits, drop articles, contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """Whitespace clean-up, then `process_punctuation`, then `process_digit_article`."""
    return process_digit_article(process_punctuation(clean_whitespace(text)))


def question_accuracy(
    prediction: str, answers: list[dict], rules: Literal["official", "legacy"] = "official"
) -> float:
    """One question's accuracy in [0, 1]: min(1, matches among the other annotators / 3), averaged.

    `rules="official"` follows GT-Vision-Lab/VQA master. `rules="legacy"` follows the older
    vqaEval.py that eP-ALM's `VQAEvaluator.evaluate_raw` (and LAVIS) copied: the prediction is
    always normalised, annotator answers only get `process_punctuation`, and only when they differ.
    """
    if rules == "official":
        answers = [{**a, "answer": clean_whitespace(a["answer"])} for a in answers]
        prediction = clean_whitespace(prediction)
        # When every annotator gave the same answer, neither the answers nor the prediction are
        # normalised (meant for OCR-like answers), so "Yes" scores 0 against ten "yes".
        if len({a["answer"] for a in answers}) > 1:
            answers = [{**a, "answer": normalize_answer(a["answer"])} for a in answers]
            prediction = normalize_answer(prediction)
    elif rules == "legacy":
        prediction = normalize_answer(prediction)
        if len({a["answer"] for a in answers}) > 1:
            answers = [{**a, "answer": process_punctuation(a["answer"])} for a in answers]
    else:
        raise ValueError(f"rules must be 'official' or 'legacy', not {rules!r}")
    accs = []
    for held_out in answers:
        # The official code leaves out every record *equal* to the held-out one (whole dict,
        # answer_id included), so we compare dicts the same way.
        matches = sum(1 for a in answers if a != held_out and a["answer"] == prediction)
        accs.append(min(1, matches / 3))
    return sum(accs) / len(accs)


def _index_annotations(annotations: Any) -> list[dict]:
    require(annotations, ["annotations"], "annotations file")
    anns = annotations["annotations"]
    if not isinstance(anns, list):
        raise MetricsInputError("annotations file: 'annotations' must be a list")
    seen = set()
    for i, ann in enumerate(anns):
        require(ann, ["question_id", "question_type", "answer_type", "answers"], f"annotation #{i}")
        if not isinstance(ann["answers"], list) or not ann["answers"]:
            raise MetricsInputError(f"annotation #{i}: 'answers' must be a non-empty list")
        for j, a in enumerate(ann["answers"]):
            require(a, ["answer"], f"annotation #{i} answer #{j}")
            if not isinstance(a["answer"], str):
                raise MetricsInputError(f"annotation #{i} answer #{j}: 'answer' must be a string")
        if ann["question_id"] in seen:
            raise MetricsInputError(f"annotations file: question id {ann['question_id']!r} appears twice")
        seen.add(ann["question_id"])
    return anns


def _index_results(results: Any, questions: Any) -> dict[Hashable, str]:
    if not isinstance(results, list):
        raise MetricsInputError("predictions: expected a JSON list of {question_id, answer} objects")
    require(questions, ["questions"], "questions file")
    if not isinstance(questions["questions"], list):
        raise MetricsInputError("questions file: 'questions' must be a list")
    for i, q in enumerate(questions["questions"]):
        require(q, ["question_id"], f"question #{i}")
    multiple_choice = questions.get("task_type") == "Multiple Choice"
    choices = {q.get("question_id"): q.get("multiple_choices") for q in questions["questions"]}
    by_id: dict[Hashable, str] = {}
    for i, r in enumerate(results):
        require(r, ["question_id", "answer"], f"prediction #{i}")
        if not isinstance(r["answer"], str):
            raise MetricsInputError(f"prediction #{i}: 'answer' must be a string")
        if multiple_choice and r["answer"] not in (choices.get(r["question_id"]) or []):
            raise MetricsInputError(f"prediction #{i}: answer is not one of the multiple choices")
        if r["question_id"] in by_id and by_id[r["question_id"]] != r["answer"]:
            # Like the official loader the last one wins, but disagreeing duplicates are a bug
            # upstream (e.g. a distributed gather) worth hearing about.
            warnings.warn(f"question id {r['question_id']!r} predicted twice; keeping the last", stacklevel=3)
        by_id[r["question_id"]] = r["answer"]
    return by_id


def _percent(values: list[float], ndigits: int) -> float:
    # Official: round(100 * mean, n) on the unrounded per-question values, summed in order.
    return round(100 * float(sum(values)) / len(values), ndigits)


def score_vqa(
    results: list[dict],
    questions: dict,
    annotations: dict,
    *,
    restrict_to_results: bool = False,
    rules: Literal["official", "legacy"] = "official",
    ndigits: int = 2,
) -> dict:
    """Official VQA accuracy: {"overall", "perQuestionType", "perAnswerType"} in percent.

    `results` is the official `[{"question_id", "answer"}]` list; `questions` and `annotations`
    are the parsed official question and annotation files. As in the official loader the
    predicted ids must equal the annotated ids. With `restrict_to_results`, the annotations are
    first cut down to the predicted ids (same as scoring against a filtered annotation file,
    e.g. for the Karpathy test split); predicted ids outside the annotations still fail.
    `rules` is passed to `question_accuracy` ("legacy" reproduces eP-ALM's own Karpathy numbers).
    """
    anns = _index_annotations(annotations)
    predictions = _index_results(results, questions)
    question_ids = {q["question_id"] for q in questions["questions"]}
    unknown = [a["question_id"] for a in anns if a["question_id"] not in question_ids]
    if unknown:
        raise MetricsInputError(
            f"{len(unknown)} annotated question id(s) are not in the questions file "
            f"(e.g. {unknown[:5]}): are the two files from the same split?"
        )
    if restrict_to_results:
        anns = [a for a in anns if a["question_id"] in predictions]
    check_same_ids(predictions, (a["question_id"] for a in anns), "question")
    if not anns:
        raise MetricsInputError("no questions to score")

    overall: list[float] = []
    per_qtype: dict[str, list[float]] = {}
    per_atype: dict[str, list[float]] = {}
    for ann in anns:  # annotation order, as the official getQuesIds() gives it
        acc = question_accuracy(predictions[ann["question_id"]], ann["answers"], rules)
        overall.append(acc)
        per_qtype.setdefault(ann["question_type"], []).append(acc)
        per_atype.setdefault(ann["answer_type"], []).append(acc)
    return {
        "overall": _percent(overall, ndigits),
        "perQuestionType": {k: _percent(v, ndigits) for k, v in per_qtype.items()},
        "perAnswerType": {k: _percent(v, ndigits) for k, v in per_atype.items()},
    }
