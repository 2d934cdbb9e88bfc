"""Feature extraction at cluster scale: the frozen encoder over media shards, each rank taking whole shards.

    torchrun --nproc_per_node 8 -m data_shards.extract --shards shards/cc3m/train \\
        --encoder launch/configs/pretrain/cc3m_pt_L.yaml --out shards/cc3m/train_feats

Runs under torchrun, srun (launch/slurm/extract.sbatch), the deepspeed launcher, mpirun or alone. Writes the
shards `data_shards.build --encoder` writes (media + `feats.npy`, same names, order, manifest and
fingerprint), each atomically with a done-record; a re-run redoes only unfinished shards. Rank 0 writes the
manifest last, after every rank is done. Exit status: 0 done; 2 bad input, one `error:` line naming it: bad
arguments, --shards missing or unreadable, an --out that is not a directory or holds other features, an
encoder that cannot be built, weights that differ between ranks; 3 more than --max-skip-fraction of the
samples failed in the encoder (no manifest); 75 stopped by SIGTERM/SIGUSR1 after finishing the shards in
progress (re-run to resume); 1 a shard without its done-record at the end (an error in the run itself).

Considered: clip-retrieval's `inference` (multi-GPU, SLURM) writes pooled embeddings in its own layout, not
per-block [CLS] states in our shards; webdataset's ShardWriter numbers shards by count, not by input shard.
The reading is epalm.data.stream's (safe members only), the writing data_shards.writer's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import NoReturn

import torch

from data_shards import writer
from data_shards.extract_io import (
    Group,
    InFlight,
    ShardInputs,
    build_id,
    first_sample,
    join,
    plan,
    write_shard,
)
from data_shards.features import (
    BATCH_SIZE,
    BatchEncoder,
    check_weights,
    make_spec,
)
from epalm import atomic
from epalm.cli.common import HelpFormatter, fail
from epalm.data import schema
from epalm.data.stream import ShardList, load_manifest
from epalm.exit_codes import REQUEUE as EXIT_REQUEUE  # stopped by a signal: finished shards kept; re-run
from epalm.exit_codes import STOP_SIGNALS, USAGE

DTYPES = ("auto", "float32", "bfloat16", "float16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m data_shards.extract",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[1],
        formatter_class=HelpFormatter,
    )
    p.add_argument("--shards", required=True, type=Path, help="media shards (a data_shards.build output)")
    p.add_argument("--encoder", required=True, help="a run config YAML (model.encoder) or a timm ViT name")
    p.add_argument("--out", required=True, type=Path, help="output folder for the feature shards")
    p.add_argument("--encoder-layers", type=int, help="number of last blocks K (default: the config's)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="encoder batch, within a shard")
    p.add_argument("--workers", type=int, help="DataLoader workers per rank (default: min(8, cores))")
    p.add_argument("--device", help="default cuda:LOCAL_RANK when a GPU is visible, else cpu")
    p.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on a GPU, else the config's"
    )
    p.add_argument("--image-size", type=int, help="input size for a timm name (default: the shards')")
    p.add_argument("--max-skip-fraction", type=float, default=0.05, help="of the samples, encoder failures")
    p.add_argument("--timeout-minutes", type=int, default=600, help="how long ranks wait for each other")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS
    )  # the deepspeed launcher's
    args = p.parse_args(argv)
    if args.batch_size < 1 or (args.workers is not None and args.workers < 0):
        p.error("--batch-size must be >= 1 and --workers >= 0")
    if args.out.resolve() == args.shards.resolve():
        p.error("--out must differ from --shards")
    return args


# ----------------------------------------------------------------------------------- the run


def resolve_device(arg: str | None, local_rank: int) -> str:
    return arg or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")


def default_workers() -> int:
    return min(8, len(os.sched_getaffinity(0)))


def extract(args, group: Group, stop: dict) -> int:
    rank, world = group.info.rank, group.info.world_size

    def print0(*a, **k) -> None:  # rank 0 speaks for the job
        if rank == 0:
            print(*a, **k, flush=True)

    try:
        manifest, shards = load_manifest(args.shards)
        first = first_sample(shards)
    except (OSError, ValueError) as e:
        return fail(f"--shards {args.shards}: {e}")
    meta = json.loads(first[schema.JSON]) if schema.JSON in first else {}
    modality = meta.get("modality", "image")
    built = manifest.get("args") or {}
    num_frames = built.get("num_frames") or sum(k.startswith("frame") for k in first) or 8
    image_size = args.image_size or built.get("image_size") or 224
    device = resolve_device(args.device, group.info.local_rank)
    kind = torch.device(device).type
    dtype = None if args.dtype == "auto" and kind == "cpu" else args.dtype.replace("auto", "bfloat16")
    try:
        spec, encoder = make_spec(args.encoder, args.encoder_layers, modality, image_size, num_frames, dtype)
        error = None
    except Exception as e:  # a bad config, unknown model name, weights not downloadable offline, ...
        error = f"cannot build the encoder {args.encoder!r}: {type(e).__name__}: {e}"
    hashes = group.gather(error or spec["fingerprint"]["weights_hash"])
    if error or len(set(hashes)) > 1:  # rank 0 speaks for the job; `hashes` holds the others' errors
        return fail(error or f"encoder weights differ between ranks: {hashes}") if rank == 0 else USAGE
    fp = spec["fingerprint"]
    ids = [build_id(manifest, shards, j, fp, args.batch_size, kind) for j in range(len(shards.names))]
    todo: list[int] | str = []
    if rank == 0:
        try:
            todo = plan(args.out, manifest, shards, ids, fp)
        except ValueError as e:
            todo = str(e)
    todo = group.broadcast(todo)
    if isinstance(todo, str):
        return fail(f"{todo}; use another --out or delete it") if rank == 0 else USAGE
    mine = todo[rank::world]
    print0(
        f"extract: {len(shards.names)} shards, {len(shards.names) - len(todo)} already done, {len(todo)} "
        f"on {world} rank(s); {fp['encoder']} K={fp['layers']} on {kind}, batch {args.batch_size}"
    )
    encoder = encoder.to(device)
    check_weights(encoder, spec, f"rank {rank} on {device}")
    stopped = run_shards(args, shards, mine, ids, spec, encoder, device, rank == 0, world, stop)
    statuses = group.gather(stopped)  # the barrier: every rank is done (or stopped) here
    if any(statuses):
        print0(f"extract: stopped by a signal on rank(s) {[r for r, s in enumerate(statuses) if s]}; "
               f"finished shards are kept, re-run to resume")  # fmt: skip
        return EXIT_REQUEUE
    code = finish(args, manifest, shards, ids, fp, kind) if rank == 0 else 0
    return group.broadcast(code)


def run_shards(args, shards, mine, ids, spec, encoder, device, main, world, stop) -> bool:
    """Encode and write this rank's shards; returns True when a signal stopped it early."""
    from tqdm import tqdm

    workers = default_workers() if args.workers is None else args.workers
    data = ShardInputs(shards, mine, spec, args.batch_size)
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=None,
        num_workers=min(workers, len(mine)),
        pin_memory=torch.device(device).type == "cuda",
    )
    total = sum(shards.counts[j] for j in mine)
    bar = tqdm(total=total, unit="sample", desc=f"rank 0/{world}", disable=not main or args.no_progress)
    runner, inflight, finishing = BatchEncoder(encoder, device), {}, None
    written = 0
    items = iter(loader) if mine else iter(())
    for item in items:
        if stop["signal"] and finishing is None:
            finishing = set(inflight)
            if not finishing:
                break
        j = item["shard"]
        if finishing is not None and j not in finishing:
            continue
        state = inflight.setdefault(j, InFlight())
        state.samples += item["samples"]
        state.failed.update(item["failed"])
        _batch(runner, state, item, args.batch_size)
        bar.update(len(item["samples"]))
        if not item["last"]:
            continue
        if state.pending:
            runner.submit(
                [k for k, _ in state.pending], torch.stack([x for _, x in state.pending]), state.feats
            )
        runner.flush()
        del inflight[j]
        written += 1
        write_shard(args.out, shards.names[j], ids[j], spec["fingerprint"], state)
        if finishing is not None:
            finishing.discard(j)
            if not finishing:
                break
    bar.close()
    del items  # stops the loader's workers
    return bool(stop["signal"]) and written < len(mine)


def _batch(runner: BatchEncoder, state: InFlight, item: dict, batch_size: int) -> None:
    """Consecutive inputs of a shard in batches of `batch_size`, as data_shards.features.encode_inputs."""
    x = item["x"]
    if x is None:
        return
    if not state.pending and len(item["keys"]) == batch_size:
        runner.submit(item["keys"], x, state.feats)  # the usual case: the chunk is the batch
        return
    state.pending += list(zip(item["keys"], x.unbind(0)))
    while len(state.pending) >= batch_size:
        batch, state.pending = state.pending[:batch_size], state.pending[batch_size:]
        runner.submit([k for k, _ in batch], torch.stack([r for _, r in batch]), state.feats)


def finish(args, manifest: dict, shards: ShardList, ids: list[str], fp: dict, kind: str) -> int:
    """Rank 0, after every rank: check every shard's done-record, then write the manifest (last, once)."""
    done = []
    for j, name in enumerate(shards.names):
        record = writer.load_done(args.out, name, ids[j])
        if record is None:
            print(
                f"error: {args.out / name}: no current done-record after all ranks finished", file=sys.stderr
            )
            return 1
        done.append(record)
    recorded = {
        **(manifest.get("args") or {}),
        "encoder": args.encoder,
        "encoder_layers": args.encoder_layers,
        "extract": {"batch_size": args.batch_size, "device": kind},
    }
    out_manifest = writer.make_manifest(
        done,
        Counter(manifest.get("skipped") or {}),
        manifest.get("source"),
        manifest.get("split"),
        recorded,
        fp,
    )
    failed = sum(d["num_records"] - d["num_samples"] for d in done)
    examples = [s for d in done for s in d["skipped_samples"]][:5]
    print(f"extract: {out_manifest['num_samples']} samples in {len(out_manifest['shards'])} shards -> "
          f"{args.out}; {failed} failed in the encoder")  # fmt: skip
    for sid, reason, detail in examples:
        print(f"  skipped {sid!r}: {reason} {detail}")
    if failed > args.max_skip_fraction * max(shards.num_samples, 1):
        print(
            f"error: {failed}/{shards.num_samples} samples failed in the encoder, more than --max-skip-fraction "
            f"{args.max_skip_fraction}; no manifest written (finished shards are kept)",
            file=sys.stderr,
        )
        return 3
    atomic.write_json_atomic(args.out / schema.MANIFEST, out_manifest)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.shards.is_dir():  # before joining the other ranks: every rank sees the same arguments
        return fail(f"--shards {args.shards}: no such directory")
    if args.out.exists() and not args.out.is_dir():
        return fail(f"--out {args.out}: exists and is not a directory")
    stop = {"signal": None}

    def on_signal(signum, frame):  # finish the shards in progress, then exit 75
        stop["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    group = join(args.timeout_minutes)
    try:
        return extract(args, group, stop)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        from epalm.distributed import shutdown_distributed

        shutdown_distributed()


def entry() -> NoReturn:
    """The process's way out (also the `epalm-extract` console script): `main`, then `exit_process`."""
    from epalm.distributed import exit_process

    exit_process(main())  # every file is written: skip the gloo teardown that can abort (distributed.py)


if __name__ == "__main__":
    entry()
