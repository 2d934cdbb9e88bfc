"""Eval batches re-cut by prompt length: the same rows, fewer pad tokens, and predictions in the loader's order,
equal to those of the unsorted loader."""

from __future__ import annotations

import torch

from epalm.data.length_order import length_sorted
from testing.length_fixtures import write_varied_vqa_shards

PAD = 1


def _batches(sizes: list[int], seed: int = 0) -> list[dict]:
    """Left-padded batches of random prompt lengths 1..12, with a per-row media tensor and meta list."""
    g = torch.Generator().manual_seed(seed)
    out, position = [], 0
    for size in sizes:
        lengths = torch.randint(1, 13, (size,), generator=g)
        width = int(lengths.max())
        ids = torch.full((size, width), PAD)
        mask = torch.zeros(size, width, dtype=torch.long)
        for i, n in enumerate(lengths.tolist()):
            ids[i, width - n :] = 1000 * (position + i) + torch.arange(n) + 2  # row-identifying tokens
            mask[i, width - n :] = 1
        media = torch.arange(position, position + size, dtype=torch.float32)[:, None, None].expand(-1, 3, 2)
        meta = [{"question_id": position + i} for i in range(size)]
        out.append(
            {"input_ids": ids, "attention_mask": mask, "media": media, "meta": meta, "modality": "image"}
        )
        position += size
    return out


def _pads(batches) -> int:
    return sum(int((b["attention_mask"] == 0).sum()) for b in batches)


def test_recut_keeps_every_row_with_its_position_and_removes_padding():
    sizes = [8, 8, 8, 8, 8, 3]
    original = _batches(sizes)
    recut = list(length_sorted(original, window=4, pad_token_id=PAD))
    assert [
        len(b["input_ids"]) for b, _ in recut
    ] == sizes  # same batch count and sizes: ZeRO-3 lockstep holds
    positions = [p for _, ps in recut for p in ps]
    assert sorted(positions) == list(range(sum(sizes)))
    flat = {}
    for b in original:
        for i, meta in enumerate(b["meta"]):
            flat[meta["question_id"]] = (b["input_ids"][i][b["attention_mask"][i] == 1], b["media"][i])
    for b, ps in recut:
        assert (b["attention_mask"][:, -1] == 1).all()  # still left-padded
        assert (b["attention_mask"].sum(dim=1).max()) == b["input_ids"].shape[1]  # no all-pad column
        assert b["modality"] == "image"
        for i, p in enumerate(ps):
            ids, media = flat[p]
            assert b["meta"][i]["question_id"] == p
            assert torch.equal(b["input_ids"][i][b["attention_mask"][i] == 1], ids)
            assert torch.equal(b["media"][i], media)
            assert (b["input_ids"][i][b["attention_mask"][i] == 0] == PAD).all()
    assert _pads(b for b, _ in recut) < _pads(original) / 2


def test_window_of_one_or_mixed_batches_keep_the_loader_order():
    original = _batches([4, 4, 2])
    same = list(length_sorted(original, window=1, pad_token_id=PAD))
    assert [ps for _, ps in same] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert all(b is o for (b, _), o in zip(same, original))
    mixed = _batches([4, 4])
    mixed[1]["modality"] = "video"  # two datasets: never merged
    assert [ps for _, ps in length_sorted(mixed, window=8, pad_token_id=PAD)] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_predict_with_sorting_equals_loader_order(tmp_path):
    """On shards of 3..18-word questions, eval with re-cut batches gives the records of eval without, in order."""
    from dataclasses import replace

    from epalm.config import EvalConfig
    from epalm.data.loader import DatasetSpec, LoaderSettings, build_eval_loader
    from epalm.evaluation.predict import load_eval_model, predict
    from tests.test_eval_run import make_adapter

    model, tokenizer, _ = load_eval_model(make_adapter(tmp_path))
    shards = write_varied_vqa_shards(tmp_path / "shards", [13, 11])
    loader = build_eval_loader(
        DatasetSpec(shards, "qa", "image"),
        tokenizer,
        LoaderSettings(batch_size=4, rank=0, world_size=1, image_size=16),
    )
    decoding = EvalConfig(num_beams=1, max_new_tokens=3)
    sorted_records = predict(
        model, loader, tokenizer, task="vqav2", decoding=replace(decoding, sort_window=16)
    )
    plain = predict(model, loader, tokenizer, task="vqav2", decoding=replace(decoding, sort_window=0))
    assert [r["question_id"] for r in sorted_records] == [1000 + i for i in range(24)]
    assert sorted_records == plain
    padded = [_pads([b]) for b in loader]
    recut = [_pads([b]) for b, _ in length_sorted(loader, 16, tokenizer.pad_token_id)]
    assert sum(recut) < sum(padded)
