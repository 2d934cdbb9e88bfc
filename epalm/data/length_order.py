"""Eval batches re-cut by prompt length: a window of loader batches is sorted by prompt length and cut again into
batches of the same sizes, so left padding wastes little; each sample carries its loader position, so predictions
can be put back in manifest order.

transformers' `LengthGroupedSampler` (and torch samplers generally) need every sample's length before loading, a
map-style dataset; the streaming loader only knows a length once a sample is decoded, so the sort is done here on
a bounded window (host memory holds `window` batches of media at once).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

IDS, MASK = "input_ids", "attention_mask"


def length_sorted(
    batches: Iterable[dict], window: int, pad_token_id: int
) -> Iterator[tuple[dict, list[int]]]:
    """(batch, loader position of each row): `window` batches at a time, re-cut shortest prompts first.

    The batch sizes and their number are the loader's, so every rank still makes the same number of generate
    calls. `window <= 1` keeps the loader's batches as they are.
    """
    start, buffer = 0, []
    for batch in batches:
        buffer.append(batch)
        if len(buffer) >= max(1, window):
            yield from _recut(buffer, start, pad_token_id)
            start += sum(len(b[IDS]) for b in buffer)
            buffer = []
    if buffer:
        yield from _recut(buffer, start, pad_token_id)


def _per_row(value: object, size: int) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() >= 1 and value.shape[0] == size
    return isinstance(value, list) and len(value) == size


def _can_merge(batches: list[dict]) -> bool:
    """Same keys, per-row fields per row, and equal shapes and shared values (one dataset's batches)."""
    first = batches[0]
    for b in batches:
        size = len(b[IDS])
        if b.keys() != first.keys():
            return False
        for key, value in b.items():
            if key in (IDS, MASK):
                continue
            if _per_row(value, size) != _per_row(first[key], len(first[IDS])):
                return False
            if isinstance(value, torch.Tensor) and _per_row(value, size):
                if value.shape[1:] != first[key].shape[1:] or value.dtype != first[key].dtype:
                    return False
            elif not _per_row(value, size) and not _same(value, first[key]):
                return False
    return True


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def _left_pad(t: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value)


def _recut(batches: list[dict], start: int, pad_token_id: int) -> Iterator[tuple[dict, list[int]]]:
    sizes = [len(b[IDS]) for b in batches]
    if len(batches) == 1 or not _can_merge(batches):
        for b, size in zip(batches, sizes):
            yield b, list(range(start, start + size))
            start += size
        return
    width = max(b[IDS].shape[1] for b in batches)
    ids = torch.cat([_left_pad(b[IDS], width, pad_token_id) for b in batches])
    mask = torch.cat([_left_pad(b[MASK], width, 0) for b in batches])
    order = torch.argsort(mask.sum(dim=1), stable=True)
    first = batches[0]
    rows = {
        k: torch.cat([b[k] for b in batches])
        if isinstance(v, torch.Tensor)
        else [x for b in batches for x in b[k]]
        for k, v in first.items()
        if k not in (IDS, MASK) and _per_row(v, sizes[0])
    }
    offset = 0
    for size in sizes:
        index = order[offset : offset + size]
        offset += size
        keep = int(mask[index].sum(dim=1).max())  # the longest prompt in this batch: drop all-pad columns
        batch = {k: v for k, v in first.items() if k not in rows}
        batch[IDS], batch[MASK] = ids[index, width - keep :], mask[index, width - keep :]
        for k, v in rows.items():
            batch[k] = v[index] if isinstance(v, torch.Tensor) else [v[i] for i in index.tolist()]
        yield batch, [start + i for i in index.tolist()]
