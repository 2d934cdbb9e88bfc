"""COCO-style caption metrics through pycocoevalcap, exactly as its `COCOEvalCap.evaluate` runs them.

Scores stay 0-1 fractions as pycocoevalcap reports them (CIDEr may exceed 1). SPICE runs only
when the Stanford CoreNLP jars it needs are already installed: it never downloads.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Hashable
from pathlib import Path

from epalm.metrics.vqa import MetricsInputError, check_same_ids, require

# pycocoevalcap's Spice() fetches these from nlp.stanford.edu when they are missing.
_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def spice_status() -> tuple[bool, str]:
    """(available, reason): SPICE needs java and the CoreNLP 3.6.0 jars in pycocoevalcap's spice/lib."""
    if shutil.which("java") is None:
        return False, "SPICE unavailable: no java on PATH"
    import pycocoevalcap.spice.spice as spice_module

    lib = Path(spice_module.__file__).parent / "lib"
    missing = [j for j in _CORENLP_JARS if not (lib / j).is_file()]
    if missing:
        return False, (
            f"SPICE unavailable: {', '.join(missing)} not in {lib} (pycocoevalcap would download "
            "Stanford CoreNLP 3.6.0 at first use; install it there to enable SPICE)"
        )
    return True, "SPICE available"


def _collect(predictions: list[dict], references: dict) -> tuple[dict, dict]:
    """{image_id: [{"caption"}]} for references and predictions, in the references' image order."""
    require(references, ["images", "annotations"], "references file")
    image_ids = []
    for i, img in enumerate(references["images"]):
        require(img, ["id"], f"references image #{i}")
        image_ids.append(img["id"])
    gts: dict[Hashable, list[dict]] = {i: [] for i in image_ids}
    for i, ann in enumerate(references["annotations"]):
        require(ann, ["image_id", "caption"], f"reference annotation #{i}")
        if not isinstance(ann["caption"], str):
            raise MetricsInputError(f"reference annotation #{i}: 'caption' must be a string")
        # As in pycocotools, annotations of images outside `images` are not scored.
        if ann["image_id"] in gts:
            gts[ann["image_id"]].append({"caption": ann["caption"]})
    empty = [i for i, caps in gts.items() if not caps]
    if empty:
        raise MetricsInputError(f"{len(empty)} reference image(s) have no caption (e.g. {empty[:5]})")

    if not isinstance(predictions, list):
        raise MetricsInputError("predictions: expected a JSON list of {image_id, caption} objects")
    res: dict[Hashable, list[dict]] = {}
    for i, p in enumerate(predictions):
        require(p, ["image_id", "caption"], f"prediction #{i}")
        if not isinstance(p["caption"], str):
            raise MetricsInputError(f"prediction #{i}: 'caption' must be a string")
        if p["image_id"] in res:
            # pycocoevalcap would fail on an assert deep inside BLEU.
            raise MetricsInputError(f"predictions: image id {p['image_id']!r} has more than one caption")
        res[p["image_id"]] = [{"caption": p["caption"]}]
    check_same_ids(res, gts, "image")
    if not gts:
        raise MetricsInputError("references: no images to score")
    return gts, {i: res[i] for i in gts}


def score_captions(predictions: list[dict], references: dict, *, spice: bool | None = None) -> dict:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE) under pycocoevalcap's own key names.

    `predictions` is the COCO results list `[{"image_id", "caption"}]`, one per reference image;
    `references` a COCO caption annotation dict. `spice=None` runs SPICE when `spice_status()`
    says it can, False never runs it, True requires it.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts, res = _collect(predictions, references)
    if spice is not False:
        available, reason = spice_status()
        if spice and not available:
            raise RuntimeError(reason)
        spice = available

    # The scorers print progress (BLEU its ratios) on stdout; keep stdout for the caller's output.
    with contextlib.redirect_stdout(sys.stderr):
        tokenizer = PTBTokenizer()
        gts_tok, res_tok = tokenizer.tokenize(gts), tokenizer.tokenize(res)
        if gts_tok.keys() != gts.keys() or res_tok.keys() != res.keys():
            raise MetricsInputError("PTB tokenisation lost captions (a caption with a stray line break?)")
        scorers = [
            (Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]),
            (Meteor(), ["METEOR"]),
            (Rouge(), ["ROUGE_L"]),
            (Cider(), ["CIDEr"]),
        ]
        if spice:
            from pycocoevalcap.spice.spice import Spice

            scorers.append((Spice(), ["SPICE"]))
        scores: dict[str, float] = {}
        for scorer, names in scorers:
            value, _ = scorer.compute_score(gts_tok, res_tok)
            values = value if isinstance(value, list) else [value]
            scores.update({n: float(v) for n, v in zip(names, values, strict=True)})
    return scores
