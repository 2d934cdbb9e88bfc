"""Batch inference (`python -m epalm.cli.infer`) at batch 1 against the batched path, on one adapter and one set of
JPEGs and questions, in one process: inputs/s after the model is loaded (the command's own summary line), and
whether every answer is the same.

The adapter is a random OPT-125m-shaped LM (vocabulary cut to the offline tokenizer's 512 ids: no OPT tokenizer
without the network) and a random ViT-B/16 at 224 px, exported and read back as a trained one would be.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench._launch import machine_load

NUM_INPUTS, BATCH, BEAMS, NEW_TOKENS = 32, 16, 3, 8
WORDS = ["what", "is", "the", "person", "in", "the", "picture", "holding", "near", "red", "umbrella", "table"]
RUNS = [("batch 1", 1), (f"batch {BATCH}", BATCH)]  # (label, batch size)


def build_adapter(root: Path) -> Path:
    from epalm.config import build_config
    from epalm.data.tokenizer_trainer import save_tokenizer
    from epalm.model.epalm import build_model
    from epalm.run import layout
    from epalm.run.adapter import save_adapter

    tok = save_tokenizer([" ".join(WORDS)] * 50, root / "tok", vocab_size=500)
    tree = {
        "model": {
            "lm": {
                "name": "125m",
                "pretrained": False,
                "tokenizer": str(tok),
                "config_overrides": {"vocab_size": 512},
            },
            "encoder": {"name": "vit_base_patch16_224", "pretrained": False, "num_states": 6},
            "adapter": {"start_layer": 5, "end_layer": 11, "prompt_tokens": 10},
        },
        "data": {"image_size": 224, "num_workers": 0},
        "eval": {"num_beams": BEAMS, "max_new_tokens": NEW_TOKENS, "batch_size": BATCH},
    }
    cfg = build_config(tree)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    with torch.no_grad():  # the connector's initial output is tiny: make the image matter
        for _, p in model.trainable_named_parameters():
            p.normal_(0, 0.5)
    return save_adapter(model.adapter_state_dict(), cfg, root / layout.ADAPTER)


def write_inputs(root: Path) -> Path:
    """NUM_INPUTS JPEGs of 320x240 to 640x480 (smooth colour plus noise) and a JSONL asking 2..12-word questions."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    rows = []
    for i in range(NUM_INPUTS):
        h, w = int(rng.integers(240, 481)), int(rng.integers(320, 641))
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, int(rng.integers(0, 256)))], -1)
        pixels = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i:03d}.jpg", quality=90)
        question = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 13)))) + "?"
        rows.append({"media": f"images/{i:03d}.jpg", "question": question})
    jsonl = root / "inputs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return jsonl


def run_infer(adapter: Path, jsonl: Path, out: Path, batch: int) -> float:
    """Inputs per second after loading, as the command reports it."""
    from epalm.cli import infer

    argv = ["--adapter", str(adapter), "--inputs", str(jsonl), "--out", str(out), "--no-progress"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = infer.main([*argv, "--batch-size", str(batch), "--num-workers", "0", "--device", "cpu"])
    if code != 0:
        raise RuntimeError(f"epalm.cli.infer exited {code}: {err.getvalue()[-2000:]}")
    return float(re.search(r"\(([\d.]+) inputs/s\)", err.getvalue()).group(1))


def main() -> str:
    rows, answers = [], {}
    load = machine_load()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        adapter, jsonl = build_adapter(root), write_inputs(root)
        rates = {}
        for label, batch in RUNS:
            out = root / f"batch{batch}.jsonl"
            rates[label] = run_infer(adapter, jsonl, out, batch)
            answers[label] = [json.loads(line)["answer"] for line in out.read_text().splitlines()]
    first = RUNS[0][0]
    for label, _ in RUNS:
        same = sum(a == b for a, b in zip(answers[label], answers[first]))
        rows.append(
            f"| {label} | {rates[label]:.2f} | {rates[label] / rates[first]:.2f}x | {same}/{NUM_INPUTS} |"
        )
    table = "\n".join(rows)
    distinct = len(set(answers[first]))
    return f"""## Batch inference: batch 1 vs batched

Command: `python -m bench.run infer` ({torch.get_num_threads()} CPU thread(s), fp32, {load} at the start). It runs
`python -m epalm.cli.infer --adapter A --inputs inputs.jsonl --out preds.jsonl --batch-size B --num-workers 0`
in one process, once per row, on the same adapter and inputs (media decoded in the main process: decoding
workers are for machines with cores to spare): {NUM_INPUTS} JPEGs of 320x240 to 640x480 with
2..12-word questions; a random OPT-125m-shaped LM (hidden 768, 12 layers, vocabulary 512 to fit the offline
tokenizer) with injection into layers 5..10 and a 10-token prompt, a random ViT-B/16 at 224 px, {BEAMS} beams,
{NEW_TOKENS} new tokens. Inputs/s is the command's own figure: lines written over the time after the model is
loaded (decoding, encoder, generation, writing). "Same answers" compares each answer with the batch-1 run's
({distinct} distinct answers among the {NUM_INPUTS}).

| run | inputs/s | vs batch 1 | same answers as batch 1 |
|---|---|---|---|
{table}
"""


if __name__ == "__main__":
    print(main())
