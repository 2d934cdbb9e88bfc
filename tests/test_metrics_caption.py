"""The caption scorer equals pycocoevalcap's COCOEvalCap on the same files; SPICE-less runs report it.

Needs java (PTB tokenizer, METEOR). Each full scoring starts METEOR's JVM (~9 s on 2 cores), and this
file does it three times.
"""

import json
import shutil

import pytest

import epalm.metrics.caption as caption
from epalm.metrics.caption import score_captions, spice_status
from epalm.metrics.vqa import MetricsInputError
from eval.caption import main

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs java")

REFERENCES = {
    "info": {},
    "licenses": [],
    "type": "captions",
    "images": [{"id": 42}, {"id": 7}, {"id": 19}],
    "annotations": [
        {"image_id": 42, "id": 1, "caption": "A man riding a horse on a beach."},
        {"image_id": 42, "id": 2, "caption": "A person rides a brown horse along the shore."},
        {"image_id": 7, "id": 3, "caption": "Two dogs playing with a red ball in the grass."},
        {"image_id": 7, "id": 4, "caption": "Dogs chase a ball across a green lawn."},
        {"image_id": 7, "id": 5, "caption": "two dogs and a ball on grass"},
        {"image_id": 19, "id": 6, "caption": "A plate of food with broccoli and rice."},
        {"image_id": 19, "id": 7, "caption": "A dinner plate holding rice, broccoli and chicken."},
    ],
}
PREDICTIONS = [
    {"image_id": 7, "caption": "Two dogs play with a ball on the grass."},
    {"image_id": 42, "caption": "a man rides a horse on the beach"},
    {"image_id": 19, "caption": "a plate of rice and broccoli"},
]
KEYS = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]


@pytest.fixture
def no_spice(monkeypatch):
    """Make SPICE look uninstalled, and fail loudly if anything still builds it (it would download)."""
    monkeypatch.setattr(caption, "_CORENLP_JARS", ("no-such-corenlp.jar",))

    def forbidden(*args, **kwargs):
        raise AssertionError("Spice() was constructed")

    monkeypatch.setattr("pycocoevalcap.spice.spice.Spice", forbidden)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("captions")
    (root / "refs.json").write_text(json.dumps(REFERENCES))
    (root / "preds.json").write_text(json.dumps(PREDICTIONS))
    return root / "preds.json", root / "refs.json"


@pytest.fixture(scope="module")
def official_scores(files):
    """COCO + COCOEvalCap exactly as the COCO caption toolkit is used, minus SPICE."""
    from pycocoevalcap import eval as coco_eval
    from pycocotools.coco import COCO

    class SkippedSpice:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    preds, refs = files
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(coco_eval, "Spice", SkippedSpice)
        coco = COCO(str(refs))
        evaluator = coco_eval.COCOEvalCap(coco, coco.loadRes(str(preds)))
        evaluator.evaluate()
    return {k: evaluator.eval[k] for k in KEYS}


def test_matches_coco_eval_cap(official_scores, no_spice):
    ours = score_captions(PREDICTIONS, REFERENCES)
    assert list(ours) == KEYS  # no SPICE key when it cannot run
    assert ours == official_scores  # bit-identical, not approximately equal
    assert all(type(v) is float for v in ours.values())
    assert 0.0 < ours["Bleu_4"] < ours["Bleu_1"] <= 1.0  # fractions, not percent


def test_cli_prints_same_scores_and_reports_spice(files, official_scores, no_spice, tmp_path, capfd):
    preds, refs = files
    out = tmp_path / "scores.json"
    assert main(["--predictions", str(preds), "--references", str(refs), "--out", str(out)]) == 0
    captured = capfd.readouterr()
    assert json.loads(captured.out) == official_scores == json.loads(out.read_text())
    assert "SPICE unavailable" in captured.err


def test_spice_status_names_the_missing_jars(no_spice):
    available, reason = spice_status()
    assert not available and "no-such-corenlp.jar" in reason
    with pytest.raises(RuntimeError, match="SPICE unavailable"):
        score_captions(PREDICTIONS, REFERENCES, spice=True)


def test_spice_runs_when_installed(monkeypatch):
    """With the jars present, SPICE's score is reported under its own key (scorer stubbed: no JVM)."""

    class Stub:
        def __init__(self, value):
            self.value = value

        def compute_score(self, gts, res):
            assert list(gts) == [42, 7, 19] and list(res) == [42, 7, 19]  # references' image order
            return self.value, [self.value] * len(gts)

    monkeypatch.setattr(caption, "_CORENLP_JARS", ("guava-19.0.jar",))  # a jar that is in spice/lib
    monkeypatch.setattr("pycocoevalcap.spice.spice.Spice", lambda: Stub(0.25))
    monkeypatch.setattr("pycocoevalcap.meteor.meteor.Meteor", lambda: Stub(0.5))
    assert spice_status()[0]
    scores = score_captions(PREDICTIONS, REFERENCES)
    assert list(scores) == [*KEYS, "SPICE"]
    assert scores["SPICE"] == 0.25 and scores["METEOR"] == 0.5
    assert "SPICE" not in score_captions(PREDICTIONS, REFERENCES, spice=False)


def test_id_mismatch_fails_before_any_scoring():
    with pytest.raises(
        MetricsInputError, match=r"1 image id\(s\) in the references have no prediction \(e.g. 19\)"
    ):
        score_captions(PREDICTIONS[:2], REFERENCES)
    extra = [*PREDICTIONS, {"image_id": 5, "caption": "x"}]
    with pytest.raises(
        MetricsInputError, match=r"1 predicted image id\(s\) are not in the references \(e.g. 5\)"
    ):
        score_captions(extra, REFERENCES)
    with pytest.raises(MetricsInputError, match="more than one caption"):
        score_captions([*PREDICTIONS, PREDICTIONS[0]], REFERENCES)
    no_caption = {**REFERENCES, "images": [*REFERENCES["images"], {"id": 3}]}
    with pytest.raises(MetricsInputError, match=r"have no caption \(e.g. \[3\]\)"):
        score_captions(PREDICTIONS, no_caption)
