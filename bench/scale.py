"""Full size on CPU: eP-ALM pt-L (OPT-6.7B + ViT-L/16) trained from a 13.9 GB bf16 sharded-safetensors
checkpoint under ZeRO-3 on 2 CPU ranks, then checkpoint, kill -9, `--resume auto`. Reports load time, peak
RSS per rank (load / steps), s/step, checkpoint bytes and whether the resumed adapter equals a straight run.

The straight run trains STEPS steps with a checkpoint every SAVE_EVERY. The interrupted run starts fresh in its own
run directory; once its step-SAVE_EVERY checkpoint is committed (`checkpoints/latest` names it), it gets SIGKILL to
the whole process group (launcher and both ranks, as a lost node) 0.4 x the straight run's step time later, i.e.
inside the next step; then `--resume auto` runs it to STEPS, and its final adapter is compared byte for byte with
the straight run's.

Random OPT-6.7B weights are written once (tensor by tensor, ~2 GB shards) under $EPALM_SCALE_CACHE
(default /work/scale_cache) and reused (~2 minutes to write). Not CI: ~25 minutes on 2 cores with AVX512-BF16
(a 6.7B step ~1 minute), hours without it (bf16 emulated: ~30 minutes a step); ~20 GB of RAM.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import threading
import time
from pathlib import Path

from bench._launch import ROOT, VENV_BIN, bench_env, machine_load, process_status_kib, rank_pids
from bench.scale_inputs import SMOKE_LM, write_data, write_random_opt
from epalm.run import layout

CACHE = Path(os.environ.get("EPALM_SCALE_CACHE", "/work/scale_cache"))
CONFIG = "launch/configs/image/vqa_v2_pt_L.yaml"
# EPALM_SCALE_DS_CONFIG=ds_configs/zero3_lowmem.json measures the low-memory ZeRO-3 settings
DS_CONFIG = os.environ.get("EPALM_SCALE_DS_CONFIG", "ds_configs/zero3.json")
COMMAND = "nice -n 19 python -m bench.run scale"
# variables that change what the run measures: the report's command names those that are set
RUN_ENV = ("EPALM_SCALE_SMOKE", "EPALM_SCALE_LM", "EPALM_SCALE_RESUME", "EPALM_SCALE_DS_CONFIG")
RUN_ENV += ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
STEPS, SAVE_EVERY = 4, 2
KILL_INTO_STEP = 0.4  # SIGKILL this fraction of a step after the step-SAVE_EVERY checkpoint is committed
MIN_AVAILABLE = 1.0 * 2**30  # abort (kill the run) below this much free memory: the machine is shared
GIB = 2**30


def launch(
    run_dir: Path, overrides: list[str], *extra: str, kill_after_s: float | None = None, timeout: int = 7200
) -> dict:
    """One `deepspeed --num_gpus 2 launch/train.py` run at nice 19, sampling each rank's RSS every 0.5 s.

    The load phase ends when rank 0 logs its built engine ("ZeRO stage"); the rest is the steps phase. With
    `kill_after_s`, the launcher's process group (launcher and both ranks) gets SIGKILL that long after
    `run_dir/checkpoints/latest` names step SAVE_EVERY."""
    import psutil

    log_path = (
        run_dir.parent
        / f"{run_dir.name}{'-killed' if kill_after_s is not None else ''}-{int(time.time())}.log"
    )
    cmd = [
        "nice", "-n", "19", str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(_port()),
        "launch/train.py", "--ds_config", DS_CONFIG, "--config", CONFIG, *extra, *overrides,
    ]  # fmt: skip
    env = bench_env()
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    peaks = {"load": {}, "steps": {}}
    loaded_at, saved_at, killed_at, aborted = None, None, None, None
    stop = threading.Event()

    def sample() -> None:
        nonlocal loaded_at, saved_at, killed_at, aborted
        while not stop.is_set():
            if loaded_at is None and "ZeRO stage" in log_path.read_text(errors="replace"):
                loaded_at = time.time()
            if kill_after_s is not None and saved_at is None and _committed(run_dir) == SAVE_EVERY:
                saved_at = time.time()
            if saved_at is not None and killed_at is None and time.time() - saved_at > kill_after_s:
                killed_at = time.time()
                os.killpg(proc.pid, signal.SIGKILL)
            phase = "load" if loaded_at is None else "steps"
            for rank, pid in rank_pids(proc.pid).items():
                s = process_status_kib(pid)
                cur = peaks[phase].setdefault(rank, {})
                for k, v in s.items():
                    cur[k] = max(cur.get(k, 0), v)
            if psutil.virtual_memory().available < MIN_AVAILABLE and aborted is None:
                aborted = f"free memory under {MIN_AVAILABLE / GIB:.1f} GiB at {time.time() - start:.0f} s"
                os.killpg(proc.pid, signal.SIGKILL)
            stop.wait(0.5)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc, aborted = proc.wait(), f"timed out after {timeout} s"
    stop.set()
    thread.join()
    return {
        "rc": rc,
        "aborted": aborted,
        "wall_s": time.time() - start,
        "load_s": None if loaded_at is None else loaded_at - start,
        "killed_at_s": None if killed_at is None else killed_at - start,
        "resumed_from": resumed_from(log_path),
        "peaks_kib": peaks,
        "log": str(log_path),
    }


def resumed_from(log_path: Path) -> int | None:
    """The step a run's log says it resumed at ("resumed from ... at step N"), None for a fresh start."""
    found = re.search(r"resumed from \S+ at step (\d+)", log_path.read_text(errors="replace"))
    return int(found.group(1)) if found else None


def _port() -> int:
    from epalm.distributed import free_port

    return free_port()


def _committed(run_dir: Path) -> int | None:
    """The step `run_dir/checkpoints/latest` names (written once a checkpoint is complete), None before."""
    from epalm.run.resume import read_latest

    found = layout.TAG.match(read_latest(run_dir / layout.CHECKPOINTS) or "")
    return int(found.group(1)) if found else None


def step_records(run_dir: Path) -> list[dict]:
    """The training-step rows of metrics.jsonl (`log_every=1`: one per step), in order."""
    path = run_dir / layout.METRICS
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    return [r for r in rows if "loss" in r]


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> str:
    import psutil

    smoke = os.environ.get("EPALM_SCALE_SMOKE") == "1"  # a 32-layer OPT of width 64: checks the bench itself
    arch = os.environ.get("EPALM_SCALE_LM", "6.7b")  # "2.7b" (also 32 layers) where 6.7B does not fit
    name = "opt-smoke" if smoke else f"opt-{arch}-random-bf16"
    weights = write_random_opt(CACHE / name, SMOKE_LM if smoke else None, arch)
    tok, train = write_data(CACHE / "data")
    runs = CACHE / f"runs-{name}"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir()
    avail = psutil.virtual_memory().available

    def overrides(run_dir: Path) -> list[str]:
        return [
            f"model.lm.name={weights}", "model.lm.pretrained=true", f"model.lm.tokenizer={tok}",
            "model.encoder.pretrained=false", f"data.train=[{{path: {train}}}]", "data.val=null",
            "data.test=null", "data.num_workers=0", "train.micro_batch_size=1", "train.global_batch_size=2",
            f"train.max_steps={STEPS}", f"train.save_every={SAVE_EVERY}", "train.eval_every=0",
            "train.log_every=1", "train.optimizer=torch", "train.warmup_steps=1", f"run_dir={run_dir}",
        ]  # fmt: skip

    straight = launch(runs / "straight", overrides(runs / "straight"))
    results = {"straight": straight}
    if straight["rc"] == 0 and os.environ.get("EPALM_SCALE_RESUME", "1") == "1":
        step_s = statistics.median(r["step_time_s"] for r in step_records(runs / "straight"))
        killed = launch(runs / "resumed", overrides(runs / "resumed"), kill_after_s=KILL_INTO_STEP * step_s)
        resumed = launch(runs / "resumed", overrides(runs / "resumed"), "--resume", "auto")
        results.update(killed=killed, resumed=resumed)
    (runs / "scale_result.json").write_text(json.dumps(results, indent=1, default=str))
    return report(results, weights, runs, avail)


def _command() -> str:
    """COMMAND, prefixed with the RUN_ENV variables of this run."""
    return " ".join([*(f"{k}={os.environ[k]}" for k in RUN_ENV if k in os.environ), COMMAND])


def _gib(kib: int | None) -> str:
    return "-" if not kib else f"{kib * 1024 / GIB:.2f}"


def report(results: dict, weights: Path, runs: Path, avail: int) -> str:
    weight_bytes = dir_bytes(weights)
    target = 0.6 * weight_bytes
    lines = [
        "## Full size on CPU: pt-L (OPT-6.7B + ViT-L/16) under ZeRO-3, 2 ranks",
        "",
        f"`{_command()}` — `deepspeed --num_gpus 2 launch/train.py --ds_config {DS_CONFIG} --config {CONFIG}` with",
        f"`model.lm.name=` a random OPT-6.7B written once as bf16 sharded safetensors ({weight_bytes / 1e9:.2f} GB,",
        "`bench/scale.py`), a random ViT-L/16, micro-batch 1 per rank, torch AdamW, "
        f"{STEPS} steps with a checkpoint every {SAVE_EVERY} (`straight`); then the same run in a new directory, "
        f"SIGKILL to launcher and both ranks {KILL_INTO_STEP} of a step after its step-{SAVE_EVERY} checkpoint is "
        f"committed (`killed`), and `--resume auto` to step {STEPS} (`resumed`). {machine_load()} at "
        f"the end; {avail / GIB:.1f} GiB available at the start.",
        "",
        "| run | rc | load s (to engine built) | wall s | rank | peak RSS load GiB (anon / file) | "
        "peak RSS steps GiB (anon / file) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        for rank in (0, 1):
            load = r["peaks_kib"]["load"].get(rank, {}) or r["peaks_kib"]["load"].get(str(rank), {})
            steps = r["peaks_kib"]["steps"].get(rank, {}) or r["peaks_kib"]["steps"].get(str(rank), {})
            load_s = "-" if r["load_s"] is None else f"{r['load_s']:.0f}"
            why = "; ".join(
                note
                for note in (
                    r["aborted"],
                    r.get("killed_at_s") is not None and f"SIGKILL at {r['killed_at_s']:.0f} s",
                    r.get("resumed_from") is not None and f"resumed at step {r['resumed_from']}",
                )
                if note
            )
            lines.append(
                f"| {name} | {r['rc']}{f' ({why})' if why else ''} | {load_s} | "
                f"{r['wall_s']:.0f} | {rank} | {_gib(load.get('VmRSS'))} ({_gib(load.get('RssAnon'))} / "
                f"{_gib(load.get('RssFile'))}) | {_gib(steps.get('VmRSS'))} ({_gib(steps.get('RssAnon'))} / "
                f"{_gib(steps.get('RssFile'))}) |"
            )
    lines.append("")
    straight = runs / "straight"
    rows = step_records(straight)
    if rows:
        lines.append(
            "- s/step (straight run, the trainer's `step_time_s`: forward + backward + AdamW, no checkpoint): "
            + ", ".join(f"step {r['step']} {r['step_time_s']:.1f}" for r in rows)
        )
        again = {r["step"]: r["loss"] for r in step_records(runs / "resumed")}
        lines.append(
            "- loss per step, straight / interrupted + resumed: "
            + ", ".join(f"{r['step']}: {r['loss']!r} / {again.get(r['step'], '-')!r}" for r in rows)
        )
    ck = straight / layout.CHECKPOINTS / layout.tag_for(SAVE_EVERY)
    if ck.is_dir():
        files = sorted((p.relative_to(ck).as_posix(), p.stat().st_size) for p in ck.rglob("*") if p.is_file())
        lines.append(
            f"- checkpoint `{ck.name}`: {dir_bytes(ck):,} bytes in {len(files)} files (adapter + optimizer state "
            f"+ trainer state; no frozen weights): " + ", ".join(f"{n} {s:,}" for n, s in files)
        )
    weights = (layout.ADAPTER, layout.ADAPTER_WEIGHTS)
    a, b = straight.joinpath(*weights), (runs / "resumed").joinpath(*weights)
    if a.is_file() and b.is_file():
        lines.append(
            f"- resumed adapter equals the straight run's, byte for byte: **{a.read_bytes() == b.read_bytes()}**"
        )
    else:
        lines.append("- resumed adapter: not compared (EPALM_SCALE_RESUME=0, or a run did not finish)")
    peak_anon = max(
        (
            v.get("RssAnon", 0)
            for r in results.values()
            for ph in r["peaks_kib"].values()
            for v in ph.values()
        ),
        default=0,
    )
    peak_rss = max(
        (v.get("VmRSS", 0) for r in results.values() for ph in r["peaks_kib"].values() for v in ph.values()),
        default=0,
    )
    lines.append(
        f"- target peak RSS per rank <= 0.6 x {weight_bytes / 1e9:.1f} GB = {target / GIB:.2f} GiB: peak anonymous "
        f"{peak_anon * 1024 / GIB:.2f} GiB, peak RSS incl. file-backed (mmap'd safetensors) pages "
        f"{peak_rss * 1024 / GIB:.2f} GiB"
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(main())
