"""Feature extraction at cluster scale: the frozen encoder over media shards, each rank taking whole shards.

    torchrun --nproc_per_node 8 -m data_shards.extract --shards shards/cc3m/train \\
        --encoder launch/configs/pretrain/cc3m_pt_L.yaml --out shards/cc3m/train_feats

Runs under torchrun, srun (launch/slurm/extract.sbatch), the deepspeed launcher, mpirun or alone. Writes the
shards `data_shards.build --encoder` writes (media + `feats.npy`, same names, order, manifest and
fingerprint), each atomically with a done-record; a re-run redoes only unfinished shards. Rank 0 writes the
manifest last, after every rank is done. Exit status: 0 done; 1 unreadable input shards; 2 bad arguments, an
encoder that cannot be built, weights that differ between ranks, or an --out holding other features; 3 more
than --max-skip-fraction of the samples failed in the encoder (no manifest); 75 stopped by SIGTERM/SIGUSR1
after finishing the shards in progress (re-run to resume).

Considered: clip-retrieval's `inference` (multi-GPU, SLURM) writes pooled embeddings in its own layout, not
per-block [CLS] states in our shards; webdataset's ShardWriter numbers shards by count, not by input shard.
The reading is epalm.data.stream's (safe members only), the writing data_shards.writer's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data_shards import writer
from data_shards.features import (
    BATCH_SIZE,
    BatchEncoder,
    check_weights,
    input_transform,
    make_spec,
    sample_input,
)
from epalm import atomic
from epalm.data import schema
from epalm.data.media import npy_bytes
from epalm.data.stream import ShardList, iter_range, load_manifest
from epalm.digest import file_sha256
from epalm.distributed import (
    DistInfo,
    broadcast_from_rank0,
    get_dist_info,
    slurm_env_exports,
    without_cpu_shm_op,
)
from epalm.exit_codes import (
    REQUEUE as EXIT_REQUEUE,  # stopped by a signal, finished shards kept; requeue, re-run
)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
DTYPES = ("auto", "float32", "bfloat16", "float16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data_shards.extract", description=__doc__.split("\n\n")[0])
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


# ----------------------------------------------------------------------------------- ranks


@dataclass(frozen=True)
class Group:
    """This process's place in the job; collectives are no-ops in a world of one."""

    info: DistInfo

    def gather(self, obj: object) -> list:
        if self.info.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.info.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: object) -> object:
        return broadcast_from_rank0(obj, self.info)


def join(timeout_minutes: int) -> Group:
    """A gloo group (only small objects travel: the encoder never needs NCCL) under any launcher."""
    import datetime

    import torch.distributed as dist

    os.environ.update(slurm_env_exports())
    info = get_dist_info()
    if info.world_size <= 1:
        return Group(DistInfo(0, 0, 1, info.source))
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if info.source == "mpi":  # DeepSpeed's MPI discovery fills RANK / MASTER_ADDR from mpi4py
        import deepspeed

        with without_cpu_shm_op():
            deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=True, timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return Group(DistInfo(dist.get_rank(), info.local_rank, dist.get_world_size(), info.source))


# ----------------------------------------------------------------------------------- the input side


def first_sample(shards: ShardList) -> dict[str, bytes]:
    if not shards.names:
        return {}
    return next(iter_range(shards, [(0, 0, 1)], lambda ext: True))[1].members


class ShardInputs(torch.utils.data.IterableDataset):
    """An IterableDataset: each DataLoader worker reads whole shards and yields chunks of `batch_size`
    samples, the stored members plus the eval-transformed inputs of those the transform takes."""

    def __init__(self, shards: ShardList, todo: list[int], spec: dict, batch_size: int):
        super().__init__()
        self.shards, self.todo, self.spec, self.batch_size = shards, todo, spec, batch_size

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        mine = self.todo[worker.id :: worker.num_workers] if worker else self.todo
        transform = input_transform(self.spec)
        for j in mine:
            chunk: list = []
            pieces = [(j, 0, self.shards.counts[j])]
            for _, sample in iter_range(self.shards, pieces, lambda ext: True):
                members = {k: v for k, v in sample.members.items() if k != schema.FEATURES}
                chunk.append((sample.key, members))
                if len(chunk) == self.batch_size:
                    yield self._item(j, chunk, transform, last=False)
                    chunk = []
            yield self._item(j, chunk, transform, last=True)

    def _item(self, shard: int, chunk: list, transform, last: bool) -> dict:
        keys, rows, failed = [], [], {}
        for key, members in chunk:
            try:
                rows.append(sample_input(members, self.spec, transform))
                keys.append(key)
            except Exception as e:  # a member the transform rejects: skip the sample, not the shard
                failed[key] = f"{type(e).__name__}: {e}"
        x = torch.stack(rows) if rows else None
        return {"shard": shard, "samples": chunk, "keys": keys, "x": x, "failed": failed, "last": last}


# ----------------------------------------------------------------------------------- the output side


def build_id(manifest: dict, shards: ShardList, j: int, fp: dict, batch_size: int, device: str) -> str:
    """A hash of what decides an output shard's bytes: its input shard, the encoder, batch and device kind."""
    payload = {
        "schema": schema.SCHEMA_VERSION,
        "input": {k: manifest.get(k) for k in ("source", "split", "args")},
        "shard": shards.names[j],
        "bytes": (Path(shards.root) / shards.names[j]).stat().st_size,
        "num_samples": shards.counts[j],
        "fingerprint": fp,
        "batch_size": batch_size,
        "device": device,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class InFlight:
    """An output shard being assembled from its chunks, which arrive in order."""

    samples: list = field(default_factory=list)
    pending: list = field(default_factory=list)  # (key, input) not yet in a full batch
    feats: dict = field(default_factory=dict)
    failed: dict = field(default_factory=dict)


def write_shard(out: Path, name: str, bid: str, fp: dict, state: InFlight) -> dict:
    """The builder's layout: the tar atomically, then its done-record; an empty shard is not written."""
    samples, skipped = [], []
    for key, members in state.samples:
        if key in state.feats:
            samples.append((key, {**members, schema.FEATURES: npy_bytes(state.feats[key])}))
        else:
            sid = json.loads(members[schema.JSON]).get("id") if schema.JSON in members else None
            skipped.append([sid, "encoder_error", state.failed.get(key, "no features")])
    if samples:
        tmp = out / f"{name}.{os.getpid()}.tmp"
        writer.write_tar(tmp, samples)
        os.replace(tmp, out / name)
    else:
        (out / name).unlink(missing_ok=True)
    done = {
        "name": name,
        "build_id": bid,
        "fingerprint": fp,
        "num_records": len(state.samples),
        "num_samples": len(samples),
        "bytes": (out / name).stat().st_size if samples else 0,
        "sha256": file_sha256(out / name) if samples else None,
        "skipped": dict(sorted(Counter(r for _, r, _ in skipped).items())),
        "skipped_samples": skipped,
    }
    atomic.write_json_atomic(out / schema.done_record_name(name), done)
    return done


def plan(out: Path, manifest: dict, shards: ShardList, ids: list[str], fp: dict) -> list[int]:
    """Rank 0, before any rank writes: drop the manifest and leftovers, return the shards to (re)do.
    Raises ValueError when --out holds shards of another encoder."""
    out.mkdir(parents=True, exist_ok=True)
    (out / schema.MANIFEST).unlink(missing_ok=True)  # no manifest while shards change
    names = set(shards.names) | {schema.done_record_name(n) for n in shards.names}
    for path in out.iterdir():
        if path.suffix == ".tmp" or (path.name.endswith((".tar", ".tar.json")) and path.name not in names):
            path.unlink(missing_ok=True)
    todo = []
    for j, name in enumerate(shards.names):
        try:
            old = json.loads((out / schema.done_record_name(name)).read_text()).get("fingerprint")
        except (OSError, ValueError):
            old = None
        if old is not None and old != fp:
            diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
            raise ValueError(f"{out / name} was extracted with another encoder (differs in {diff})")
        if writer.load_done(out, name, ids[j]) is None:
            todo.append(j)
    return todo


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
        print(f"error: {args.shards}: {e}", file=sys.stderr)
        return 1
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
    if error or len(set(hashes)) > 1:
        print(f"error: {error or 'encoder weights differ between ranks: ' + str(hashes)}", file=sys.stderr)
        return 2
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
        print(f"error: {todo}; use another --out or delete it", file=sys.stderr)
        return 2
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


if __name__ == "__main__":
    from epalm.distributed import exit_process

    exit_process(main())  # every file is written: skip the gloo teardown that can abort (distributed.py)
