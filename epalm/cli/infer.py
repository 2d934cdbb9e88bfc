"""Batch inference: answer questions about (or caption) every media file of a folder, a glob or a JSONL list,
one JSON line per input, resumable, on one process or many:

    python -m epalm.cli.infer --adapter DIR --inputs photos/ --out preds.jsonl --question "what is this?"
    python -m epalm.cli.infer --adapter DIR --inputs "clips/**/*.mp4" --out captions.jsonl --batch-size 16
    python -m epalm.cli.infer --adapter DIR --inputs questions.jsonl --out answers.jsonl --num-workers 4
    torchrun --nproc_per_node 8 -m epalm.cli.infer --adapter DIR --inputs questions.jsonl --out answers.jsonl

A JSONL line is {"media": path (relative to the JSONL's folder, or to --media-root), "question"?: str, "id"?: str};
a line without "id" is named by its line number. A folder or glob gives every file with a media extension of the
adapter's modality, sorted, named by its path relative to the folder. Each input gets one line in --out:
{"id", "media", "question", "answer"}, {"id", "media", "caption"} without a question, or {"id", "media",
"error"} when the media cannot be read. Lines are appended and flushed per batch; run the same command again
after an interruption (even kill -9) and the inputs already in --out are skipped, not recomputed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from epalm.cli.common import HelpFormatter, configure_logging, fail
from epalm.cli.generate import add_decoding_arguments, decoding_options, load_predictor

EXTENSIONS = {
    "image": (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"),
    "video": (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg"),
    "audio": (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif"),
}


@dataclass(frozen=True)
class Item:
    index: int  # position in the input list: output order
    id: str
    media: str  # as the input names it (written back)
    path: Path  # where it is read from
    question: str | None


def _is_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def _files(spec: str, modality: str) -> tuple[Path, list[Path]]:
    """(base folder, media files under it) of a folder or a glob."""
    if _is_glob(spec):
        import glob

        parts = Path(spec).parts
        base = Path(*parts[: next(i for i, p in enumerate(parts) if _is_glob(p))] or ".")
        found = [Path(p) for p in glob.glob(spec, recursive=True)]
    else:
        base = Path(spec)
        found = list(base.rglob("*"))
    files = [p for p in found if p.suffix.lower() in EXTENSIONS[modality] and p.is_file()]
    if not files:
        raise ValueError(f"no {modality} files ({' '.join(EXTENSIONS[modality])}) in {spec}")
    return base, files


def _jsonl_items(path: Path, media_root: Path | None, question: str | None) -> list[Item]:
    items = []
    root = media_root or path.parent
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("media"), str):
                raise ValueError('expected an object with a "media" path')
            q = row.get("question", question)
            if q is not None and not isinstance(q, str):
                raise ValueError('"question" must be a string')
        except ValueError as e:
            raise ValueError(f"{path}: line {n}: {e}") from e
        media = row["media"]
        items.append(Item(len(items), str(row.get("id", n)), media, root / media, q))
    return items


def collect_inputs(spec: str, modality: str, media_root: Path | None, question: str | None) -> list[Item]:
    """The inputs, in output order; ValueError for a missing input, a malformed JSONL line or a repeated id."""
    path = Path(spec)
    if path.is_file():
        items = _jsonl_items(path, media_root, question)
    elif path.is_dir() or _is_glob(spec):
        base, files = _files(spec, modality)
        named = sorted((p.relative_to(base).as_posix(), p) for p in files)
        items = [Item(i, name, str(p), p, question) for i, (name, p) in enumerate(named)]
    else:
        raise ValueError(f"{spec}: no such folder or JSONL file, and not a glob")
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise ValueError(f'{spec}: id {item.id!r} appears twice; give each line a unique "id"')
        seen.add(item.id)
    if not items:
        raise ValueError(f"{spec}: no inputs")
    return items


def read_done(out: Path) -> set[str]:
    """The ids an earlier run wrote to `out`. A torn last line (killed mid-write) is cut off the file."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        with open(out, "r+b") as f:
            f.truncate(keep)
    done = set()
    for n, line in enumerate(data[:keep].splitlines(), 1):
        try:
            done.add(str(json.loads(line)["id"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{out}: line {n} is not a line this command writes ({e}); choose another --out"
            ) from e
    return done


class MediaFiles:
    """A map-style dataset of this rank's inputs: (item, tensor, None) or (item, None, why it cannot be read),
    built by the API's function (`epalm.data.media_input.media_tensor`) in the DataLoader's workers."""

    def __init__(self, items: list[Item], cfg, modality: str):
        self.items, self.cfg, self.modality = items, cfg, modality

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from epalm.data.media import SkipSample
        from epalm.data.media_input import media_tensor

        item = self.items[i]
        if not item.path.is_file():
            return item, None, f"{item.path}: no such file"
        try:
            return item, media_tensor(self.cfg, self.modality, item.path), None
        except SkipSample as e:
            return item, None, str(e)
        except Exception as e:  # any other decoding failure is this input's, not the run's
            return item, None, f"{type(e).__name__}: {e}"


def _record(item: Item, text: str | None, error: str | None) -> dict:
    if error is not None:
        return {"id": item.id, "media": item.media, "error": error}
    if item.question is None:
        return {"id": item.id, "media": item.media, "caption": text}
    return {"id": item.id, "media": item.media, "question": item.question, "answer": text}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m epalm.cli.infer", description=__doc__, formatter_class=HelpFormatter
    )
    unset = argparse.SUPPRESS  # no "(default: None)" in --help where there is none to show
    adapter_help = "adapter export directory, or a Hub id org/name[@revision]"
    p.add_argument("--adapter", required=True, type=Path, default=unset, help=adapter_help)
    p.add_argument("--inputs", required=True, default=unset, help="a folder, a quoted glob or a .jsonl file")
    p.add_argument(
        "--out", required=True, type=Path, default=unset, help="JSONL to write (appended to on a rerun)"
    )
    p.add_argument(
        "--question", help="ask every input this (a JSONL line's own question wins); none: caption"
    )
    p.add_argument(
        "--media-root", type=Path, help="JSONL media paths are relative to this; none: the JSONL's folder"
    )
    p.add_argument(
        "--batch-size", type=int, help="inputs per generate call and rank; none: the config's eval.batch_size"
    )
    p.add_argument(
        "--num-workers",
        type=int,
        help="media-decoding processes per rank; none: the config's data.num_workers",
    )
    add_decoding_arguments(p)
    p.add_argument("--device", help="none: cuda:<local rank> when CUDA is available, else cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # the deepspeed launcher passes --local_rank; LOCAL_RANK in the environment says the same
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", default=unset, help="config overrides key=value")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    from epalm.distributed import broadcast_from_rank0, get_dist_info, shutdown_distributed

    info = get_dist_info()
    configure_logging(info.rank)
    if not (_is_glob(args.inputs) or Path(args.inputs).exists()):
        return fail(f"--inputs {args.inputs}: no such folder or file, and not a glob")
    if (args.batch_size is not None and args.batch_size < 1) or (args.num_workers or 0) < 0:
        return fail("--batch-size must be >= 1 and --num-workers >= 0")
    if info.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")  # gloo carries the CPU object gathers, whatever the device
    device = torch.device(args.device or (f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        predictor = load_predictor(args.adapter, getattr(args, "overrides", []), device)
        options = decoding_options(args)
        seed = options.pop("seed", None)
        decoding = predictor.decoding(**options)
    except ValueError as e:
        return fail(str(e))
    plan: tuple | str | None = (
        None  # rank 0 lists the inputs and reads --out; every rank gets its plan or error
    )
    if info.rank == 0:
        try:
            items = collect_inputs(args.inputs, predictor.modality, args.media_root, args.question)
            plan = (items, read_done(args.out))
        except (OSError, ValueError) as e:
            plan = str(e)
    plan = broadcast_from_rank0(plan, info)
    if isinstance(plan, str):
        return fail(plan)
    items, done = plan
    pending = [i for i in items if i.id not in done]
    if info.rank == 0 and done:
        print(
            f"resuming: {len(items) - len(pending)} of {len(items)} inputs already in {args.out}, skipped",
            file=sys.stderr,
        )
    batch_size = args.batch_size or predictor.cfg.eval.batch_size
    mine = pending[info.rank :: info.world_size]  # strided: each step's lines are the next slice of `pending`
    loader = DataLoader(
        MediaFiles(mine, predictor.cfg, predictor.modality),
        batch_size=batch_size,
        num_workers=predictor.cfg.data.num_workers if args.num_workers is None else args.num_workers,
        collate_fn=list,
    )
    steps = -(-len(pending[0 :: info.world_size]) // batch_size)  # rank 0 has the most batches
    generator = predictor.generator(decoding, seed)
    bar = None
    if info.rank == 0 and not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), initial=len(items) - len(pending), desc="infer", unit="input")
    if info.rank == 0:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    out = open(args.out, "a", encoding="utf-8") if info.rank == 0 else None  # noqa: SIM115 (closed below)
    written = errors = 0
    start = time.perf_counter()
    batches = iter(loader)
    for _ in range(steps):
        rows = next(batches, [])
        ok = [(item, tensor) for item, tensor, _ in rows if tensor is not None]
        texts = []
        if ok:
            media = torch.stack([t for _, t in ok])
            texts = predictor.generate(media, [i.question for i, _ in ok], decoding, generator)
        answer = {item.index: text for (item, _), text in zip(ok, texts)}
        records = [(item.index, _record(item, answer.get(item.index), err)) for item, _, err in rows]
        if info.world_size > 1:
            parts: list = [None] * info.world_size
            dist.all_gather_object(parts, records)
            records = [r for part in parts for r in part]
        if out is not None:
            lines = [json.dumps(r, ensure_ascii=False) + "\n" for _, r in sorted(records, key=lambda x: x[0])]
            out.write("".join(lines))
            out.flush()  # a kill -9 loses at most this batch's last line, which a rerun cuts off and redoes
            written, errors = written + len(lines), errors + sum("error" in r for _, r in records)
        if bar is not None:
            bar.update(len(records))
    if bar is not None:
        bar.close()
    if out is not None:
        out.close()
        seconds = time.perf_counter() - start
        print(
            f"wrote {written} lines ({errors} unreadable media) to {args.out} in {seconds:.2f} s after loading "
            f"({written / max(seconds, 1e-9):.2f} inputs/s)",
            file=sys.stderr,
        )
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from epalm.distributed import exit_process

    exit_process(main())
