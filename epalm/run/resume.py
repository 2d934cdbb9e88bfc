"""Which checkpoint a run continues from: `--resume auto` takes the newest step of this run's lineage that
verifies (skipping and logging the others), an explicit step must verify; the chosen step becomes the head of
the line (`latest`), and newer steps are moved aside to `checkpoints/set_aside/` so later saves can take their
place. A fresh start into a directory that holds a run is refused, or (`--move-aside`) moves that run away."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from epalm.config import ConfigError
from epalm.distributed import DistInfo, broadcast_from_rank0
from epalm.run.layout import (
    ADAPTER,
    BEST,
    CHECKPOINTS,
    EVAL,
    LATEST,
    LINEAGE,
    LOCK,
    METRICS,
    MOVED_ASIDE,
    RUN_ID,
    SET_ASIDE,
    SUMMARY,
    TAG,
    TRAINER_STATE,
    tag_for,
)
from epalm.run.manifest import read_trainer_state, verify_checkpoint

log = logging.getLogger(__name__)


def committed_steps(root: Path) -> list[Path]:
    """Step directories under `root`, newest first (temporary `.tmp-*` ones never count)."""
    if not root.is_dir():
        return []
    steps = [p for p in root.iterdir() if p.is_dir() and TAG.match(p.name)]
    return sorted(steps, key=lambda p: int(TAG.match(p.name).group(1)), reverse=True)


def read_latest(root: Path) -> str | None:
    pointer = root / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def agreed_resume(
    resume: str | None, run_dir: str | Path, info: DistInfo, move_aside: bool = False
) -> Path | None:
    """`resolve_resume` on rank 0 (which holds the run lock, so it also makes the head), its answer on every
    rank: one verification, and the same checkpoint, or the same ConfigError, everywhere. A fresh start
    (`resume` None) goes through `fresh_start` the same way."""
    outcome: tuple[str | None, list[str], str] = (None, [], "config")
    if info.rank == 0:
        try:
            if resume is None:
                fresh_start(run_dir, move_aside)
                path = None
            else:
                path = resolve_resume(resume, run_dir, make_head=True)
            outcome = (None if path is None else str(path), [], "config")
        except ConfigError as e:
            outcome = (None, e.problems, e.source)
        except Exception as e:  # never leave the other ranks waiting in the broadcast
            outcome = (None, [f"--resume {resume}: {type(e).__name__}: {e}"], "config")
    path, problems, source = broadcast_from_rank0(outcome, info)
    if problems:
        raise ConfigError(problems, source)
    return None if path is None else Path(path)


def run_contents(run_dir: str | Path) -> list[str]:
    """What in `run_dir` belongs to a run a fresh start would overwrite or mix with: checkpoints, logged
    metrics, exports. The lock, config files and heartbeats alone (a start that trained nothing) do not count."""
    run_dir, found = Path(run_dir), []
    root = run_dir / CHECKPOINTS
    steps = [int(TAG.match(p.name).group(1)) for p in committed_steps(root)]
    if steps:
        found.append(
            f"{CHECKPOINTS}/ of step{'s' if len(steps) > 1 else ''} {', '.join(map(str, sorted(steps)))}"
        )
    elif (root / LATEST).is_file() or (root / SET_ASIDE).is_dir():
        found.append(f"{CHECKPOINTS}/")
    metrics = run_dir / METRICS
    if metrics.is_file() and metrics.stat().st_size:
        found.append(
            f"{METRICS} ({sum(1 for line in metrics.read_text().splitlines() if line.strip())} rows)"
        )
    found += [f"{name}/" for name in (ADAPTER, BEST, EVAL) if (run_dir / name).is_dir()]
    found += [name for name in (SUMMARY,) if (run_dir / name).is_file()]
    return found


def fresh_start(run_dir: str | Path, move_aside: bool) -> Path | None:
    """Refuse (ConfigError) a fresh start into a directory holding a run, before anything is written; with
    `move_aside` move that run to a sibling directory instead (returned), deleting nothing. Rank 0, holding
    the run lock (which stays in place)."""
    run_dir = Path(run_dir)
    found = run_contents(run_dir)
    if not found:
        return None
    if not move_aside:
        raise ConfigError(
            [
                f"{run_dir} holds a run ({'; '.join(found)}): a fresh start would overwrite it and mix the two. "
                f"Continue it with --resume auto, or start a new run here with --move-aside (moves the old one "
                f"to {MOVED_ASIDE.format(name=run_dir.name, stamp='<time>')}/ beside it, deleting nothing), "
                "or choose another run_dir"
            ],
            "run directory",
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = run_dir.with_name(MOVED_ASIDE.format(name=run_dir.name, stamp=stamp)), 1
    while target.exists():
        target, n = run_dir.with_name(MOVED_ASIDE.format(name=run_dir.name, stamp=f"{stamp}.{n}")), n + 1
    target.mkdir()
    for entry in sorted(run_dir.iterdir()):
        if entry.name != LOCK:  # the lock this job holds stays: a second job must still find it here
            os.replace(entry, target / entry.name)
    log.warning("--move-aside: the run found in %s (%s) is now in %s", run_dir, "; ".join(found), target)
    return target


def lineage(run_dir: Path) -> str | None:
    """The run id of the run `run_dir` holds: run.json's, else that of the step `latest` names; None if unknown."""
    try:
        return json.loads((run_dir / LINEAGE).read_text())[RUN_ID]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    latest = read_latest(run_dir / CHECKPOINTS)
    try:
        return read_trainer_state(run_dir / CHECKPOINTS / latest).get(RUN_ID) if latest else None
    except ValueError:
        return None


def resolve_resume(resume: str | None, run_dir: str | Path, make_head: bool = False) -> Path | None:
    """The verified checkpoint directory to continue from, or None for a fresh start.

    `resume`: None (fresh), "auto" (newest verified step under run_dir/checkpoints; fresh if there is none),
    a step number, a step directory, or a directory holding `latest`. With `make_head` (rank 0, holding the
    run lock) the chosen step becomes `latest` and newer steps are moved aside. Raises ConfigError naming
    every file at fault when nothing usable is found.
    """
    if resume is None:
        return None
    run_dir = Path(run_dir)
    if resume == "auto":
        path = _newest_verified(run_dir / CHECKPOINTS, missing_ok=True)
    else:
        path = Path(resume)
        if resume.isdigit() and not path.exists():
            path = run_dir / CHECKPOINTS / tag_for(int(resume))
        if TAG.match(path.name) or (path / TRAINER_STATE).exists():
            problems = verify_checkpoint(path)
            if problems:
                raise ConfigError([f"--resume {resume}: {p}" for p in problems])
        elif (path / LATEST).is_file() or committed_steps(path):
            path = _newest_verified(path, missing_ok=False)
        else:
            raise ConfigError([f"--resume {resume}: neither a checkpoint nor a directory with '{LATEST}'"])
    if make_head and path is not None and TAG.match(path.name) and _same(path.parent, run_dir / CHECKPOINTS):
        make_line_head(path)  # (a checkpoint of another run directory is only read)
    return path


def _same(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _newest_verified(root: Path, missing_ok: bool) -> Path | None:
    latest = read_latest(root)
    steps = committed_steps(root)
    if latest is not None and not (root / latest).is_dir():
        log.warning(
            "%s names %r, which does not exist: using the newest verified step", root / LATEST, latest
        )
    skipped, run_id = [], lineage(root.parent)
    for step in steps:
        problems = verify_checkpoint(step)
        theirs = None if problems else read_trainer_state(step).get(RUN_ID)
        if run_id is not None and theirs is not None and theirs != run_id:
            problems = [f"written by another run (run id {theirs}; this run is {run_id})"]
        if not problems:
            for name, why in skipped:
                log.warning("resume: skipped %s: %s", name, "; ".join(why))
            if skipped:
                log.warning("resume: falling back to %s", step)
            return step
        skipped.append((step.name, problems))
    if not steps and latest is None and missing_ok:
        return None  # nothing saved yet: a fresh start
    why = [f"{name}: {p}" for name, problems in skipped for p in problems]
    if latest is not None and not steps:
        why.append(f"{root / LATEST} names {latest!r}, which does not exist")
    raise ConfigError([f"no usable checkpoint in {root}", *why])


def make_line_head(step_dir: Path) -> None:
    """`latest` names `step_dir`; newer step directories move to `set_aside/` (kept, never loaded or pruned)."""
    root = step_dir.parent
    step = int(TAG.match(step_dir.name).group(1))
    for newer in committed_steps(root):
        if int(TAG.match(newer.name).group(1)) <= step:
            break
        target = root / SET_ASIDE / newer.name
        n = 1
        while target.exists():
            target, n = root / SET_ASIDE / f"{newer.name}.{n}", n + 1
        target.parent.mkdir(exist_ok=True)
        os.replace(newer, target)
        log.warning("resume from %s: moved the newer %s aside to %s", step_dir.name, newer.name, target)
    if read_latest(root) != step_dir.name:
        tmp = root / f".{LATEST}.tmp"
        tmp.write_text(step_dir.name)
        os.replace(tmp, root / LATEST)
