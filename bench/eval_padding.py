"""Left padding in eval batches with and without the prompt-length re-cut (`epalm.data.length_order`), on the demo's
digit VQA and caption val sets and on VQA shards whose questions vary in length (3..18 words).

Counts prompt slots (batch x width, summed over batches) and the pad tokens among them: the prefill work that the
re-cut saves. No model runs.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

from epalm.data.length_order import length_sorted
from epalm.data.loader import DatasetSpec, LoaderSettings, build_eval_loader
from epalm.data.text import build_tokenizer
from epalm.data.tokenizer_trainer import save_tokenizer

BATCH, WINDOW, VARIED = 16, 16, 1000


def _digit_shards(root: Path) -> dict[str, Path]:
    from data_shards import build
    from data_shards.demo import tasks, write_digits

    write_digits(root / "raw" / "digits", 32)
    out = {}
    for task in ("digits_vqa", "digits_caption"):
        args = [str(a) for a in tasks(root / "raw")[task]["val"]]
        args += ["--split", "val", "--out", str(root / task), "--no-progress", "--workers", "1"]
        with contextlib.redirect_stdout(io.StringIO()):
            assert build.main(args + ["--image-size", "32"]) == 0
        out[task] = root / task
    return out


def _count(batches) -> tuple[int, int, int]:
    slots = pads = n = 0
    for b in batches:
        mask = b["attention_mask"]
        slots, pads, n = slots + mask.numel(), pads + int((mask == 0).sum()), n + len(mask)
    return n, slots, pads


def main() -> str:
    from data_shards.demo import DIGIT_QUESTION
    from testing.length_fixtures import WORDS, write_varied_vqa_shards

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        texts = [DIGIT_QUESTION, "a handwritten digit seven", " ".join(WORDS)] * 20
        tokenizer = build_tokenizer(str(save_tokenizer(texts, root / "tok", vocab_size=300)))
        sets = {
            f"demo {k} val": (p, "caption" if "caption" in k else "qa")
            for k, p in _digit_shards(root).items()
        }
        sets[f"VQA, {VARIED} questions of 3..18 words"] = (
            write_varied_vqa_shards(root / "varied", [VARIED]),
            "qa",
        )
        for name, (path, task) in sets.items():
            loader = build_eval_loader(
                DatasetSpec(path, task, "image"),
                tokenizer,
                LoaderSettings(batch_size=BATCH, rank=0, world_size=1, image_size=32),
            )
            n, slots, pads = _count(loader)
            _, slots2, pads2 = _count(b for b, _ in length_sorted(loader, WINDOW, tokenizer.pad_token_id))
            rows.append(
                f"| {name} | {n} | {slots} / {pads} ({100 * pads / slots:.1f}%) "
                f"| {slots2} / {pads2} ({100 * pads2 / slots2:.1f}%) | {100 * (pads - pads2) / max(pads, 1):.0f}% |"
            )
    table = "\n".join(rows)
    return f"""## Eval padding: batches re-cut by prompt length

Command: `python -m bench.run eval_padding`. Eval loader batches of {BATCH}, `eval.sort_window: {WINDOW}` (batches
re-cut at a time), a byte-level BPE trained on the demo's texts (no OPT tokenizer offline). Prompt slots are
batch x width summed over batches, the tokens the prefill processes; pads are the left padding among them.

| set | samples | slots / pads, loader order | slots / pads, re-cut | pads removed |
|---|---|---|---|---|
{table}

The demo sets ask one fixed question (VQA) or prompt with BOS only (captions), so they have no padding to remove;
real question sets vary in length, as the third row's do.
"""


if __name__ == "__main__":
    print(main())
