"""The trainer's own guards of a long run: a fresh start never overwrites a run (refused, or moved aside), `--resume
auto` keeps to the run's lineage, a stop signal is honoured while a rank waits for data that does not come, the
ranks checkpoint and exit 75 when the plain `deepspeed` runner is killed, a stopped rank is named and the job fails
after the collective timeout, and batch-size problems are reported with every other config problem."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from epalm.config import ConfigError
from epalm.exit_codes import REQUEUE
from epalm.run import layout
from epalm.run.checkpoint import save_training_state
from epalm.run.resume import resolve_resume
from testing.support import fault_env
from tests.training_fixtures import ROOT, VENV_BIN, env, free_port, read_jsonl, write_setup

PY = str(VENV_BIN / "python")
ZERO0 = str(ROOT / "ds_configs" / "zero0.json")


def _files(d: Path) -> dict[str, str]:
    """Every file under `d` (but the lock) with its SHA-256: what a refused start must leave as it was."""
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.name != layout.LOCK
    }


def _train(config: Path, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
    """One process, no launcher: launch/train.py as a single rank (ZeRO-0, fp32)."""
    cmd = [PY, "launch/train.py", "--config", str(config), "--ds_config", ZERO0, "--precision", "fp32", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env(**extra_env), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_fresh_start_into_a_used_run_dir_is_refused_then_moved_aside(tmp_path):
    config = write_setup(tmp_path, max_steps=4, save_every=2, eval_every=2)
    run = tmp_path / "run"
    assert _train(config).returncode == 0
    before = _files(run)
    old_id = json.loads((run / "checkpoints/step_00000004" / layout.TRAINER_STATE).read_text())[layout.RUN_ID]

    r = _train(config, "train.max_steps=2")  # no --resume: the old run must survive, untouched
    assert r.returncode == 2, r.stderr[-3000:]
    error = r.stderr.strip().splitlines()
    assert error[0].startswith("error:") and "Traceback" not in r.stderr
    assert "holds a run" in r.stderr and "steps 2, 4" in r.stderr and "metrics.jsonl (6 rows)" in r.stderr
    assert "--resume auto" in r.stderr and "--move-aside" in r.stderr
    assert _files(run) == before

    r = _train(config, "train.max_steps=2", "--move-aside")
    assert r.returncode == 0, r.stderr[-3000:]
    (moved,) = tmp_path.glob("run.moved-*")
    assert _files(moved) == before  # the old run, whole, beside the new one
    new_id = json.loads((run / "checkpoints/step_00000002" / layout.TRAINER_STATE).read_text())[layout.RUN_ID]
    assert new_id != old_id and json.loads((run / layout.LINEAGE).read_text())[layout.RUN_ID] == new_id
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == ["step_00000002"]
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r] == [1, 2]


class _Engine:
    def save_checkpoint(self, save_dir, tag, save_latest, exclude_frozen_parameters):
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)


def test_resume_auto_keeps_to_the_run_lineage(tmp_path):
    """Run A wrote steps 30 and 40, then a run B (an older trainer, no guard) started over in the same
    directory and wrote step 20: `--resume auto` continues B, never A's newer steps."""
    root = tmp_path / "run" / layout.CHECKPOINTS
    for step, run_id in ((30, "run-a"), (40, "run-a"), (20, "run-b")):
        state = {"loader": {}, layout.RUN_ID: run_id}
        save_training_state(_Engine(), root, step, state, rank=0, barrier=lambda: None, keep_last=0)
    assert (root / layout.LATEST).read_text() == "step_00000020"
    assert resolve_resume("auto", tmp_path / "run", make_head=True) == root / "step_00000020"
    assert sorted(p.name for p in (root / layout.SET_ASIDE).iterdir()) == ["step_00000030", "step_00000040"]

    (tmp_path / "run" / layout.LINEAGE).write_text(json.dumps({layout.RUN_ID: "run-c"}))
    with pytest.raises(ConfigError, match="written by another run"):  # nothing of this run: never A's or B's
        resolve_resume("auto", tmp_path / "run")


def test_global_batch_problems_are_reported_with_the_other_config_problems(tmp_path):
    config = write_setup(tmp_path)
    cmd = [PY, "launch/train.py", "--config", str(config), "train.global_batch_size=6", "train.lr=-1"]
    rank0_of_2 = env(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="2"
    )  # the launcher's world size, before any rendezvous
    r = subprocess.run(cmd, cwd=ROOT, env=rank0_of_2, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "2 problem(s)" in r.stderr and "train.lr: must be >= 0" in r.stderr
    assert "train.global_batch_size 6 is not divisible by micro_batch_size 2 x world_size 2" in r.stderr


# --------------------------------------------------------------------------- 2-rank runs under `deepspeed`


def _start(config: Path, out: Path, *args: str, fault: str = "", **extra_env: str) -> subprocess.Popen:
    """The plain documented command, `deepspeed --num_gpus 2 launch/train.py ...`, in its own session."""
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    cmd += [
        str(ROOT / "launch" / "train.py"),
        "--config",
        str(config),
        "--ds_config",
        ZERO0,
        "--precision",
        "fp32",
    ]
    e = env(**fault_env(fault), **extra_env)
    with open(out, "w") as f:
        return subprocess.Popen(
            [*cmd, *args], cwd=ROOT, env=e, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def _rank_pids(ranks: Path, n: int = 2, timeout: float = 120) -> dict[int, int]:
    """rank -> pid, from the files each rank writes into $EPALM_SUPERVISOR_DIR at start."""
    deadline = time.monotonic() + timeout
    while True:
        pids = [int(p.name[5:]) for p in ranks.glob("rank-*")]
        if len(pids) == n:
            break
        assert time.monotonic() < deadline, f"{len(pids)} of {n} ranks started"
        time.sleep(0.2)
    by_rank = {}
    for pid in pids:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        by_rank[int(next(v for v in environ if v.startswith(b"RANK="))[5:])] = pid
    return by_rank


def _exit_codes(ranks: Path, n: int = 2, timeout: float = 60) -> list[int] | None:
    """Each rank's exit code as it recorded it (record_exit), or None if not all ended within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [int(p.read_text()) for p in ranks.glob("exit-*")]
        if len(codes) == n:
            return codes
        time.sleep(0.2)
    return None


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _logged_step(run: Path) -> int:
    try:
        return max((r["step"] for r in read_jsonl(run / "metrics.jsonl")), default=0)
    except (OSError, ValueError):
        return 0  # not there yet, or a line being written


def _cleanup(proc: subprocess.Popen, pids: dict[int, int]) -> None:
    for pid in pids.values():  # ranks orphaned by a dead runner are not in its session's wait
        with contextlib.suppress(OSError):  # only while the pid is still this test's rank
            if b"launch/train.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.distributed
@pytest.mark.slow
def test_a_stop_signal_is_honoured_while_a_rank_waits_for_data(tmp_path):
    """Rank 1's fifth batch never comes (its reader sleeps, as on a server that accepts and sends nothing);
    SIGTERM to that rank: both ranks checkpoint step 2 (the last complete one, 4 batches consumed, though
    rank 0 had read two more) within seconds and exit 75; `--resume auto` then finishes the run."""
    config = write_setup(tmp_path, max_steps=8, save_every=0, eval_every=0)  # 2 micro-batches a step
    ranks, mark, run = tmp_path / "ranks", tmp_path / "stalled", tmp_path / "run"
    ranks.mkdir()
    proc = _start(
        config,
        tmp_path / "out.txt",
        fault="stall_batch:5:1",
        EPALM_FAULT_MARK=str(mark),
        EPALM_SUPERVISOR_DIR=str(ranks),
    )
    pids = {}
    try:
        pids = _rank_pids(ranks)
        _wait_for(mark.exists, 120, "the stall")
        time.sleep(2)  # rank 0 has its batches of step 3 and waits for rank 1
        start = time.monotonic()
        os.kill(pids[1], signal.SIGTERM)
        codes = _exit_codes(ranks, timeout=60)
        took = time.monotonic() - start
    finally:
        _cleanup(proc, pids)
    out = (tmp_path / "out.txt").read_text()
    assert codes == [REQUEUE, REQUEUE], out[-3000:]
    assert took < 20, took
    assert (run / "checkpoints" / layout.LATEST).read_text() == "step_00000002"
    state = json.loads((run / "checkpoints" / "step_00000002" / layout.TRAINER_STATE).read_text())
    assert state["step"] == 2 and state["loader"]["consumed_batches"] == 4
    assert json.loads((run / layout.STOPPED).read_text())["step"] == 2

    proc = _start(config, tmp_path / "resumed.txt", "--resume", "auto")
    assert proc.wait(timeout=300) == 0, (tmp_path / "resumed.txt").read_text()[-3000:]
    assert json.loads((run / layout.SUMMARY).read_text())["step"] == 8


@contextlib.contextmanager
def _two_ranks_past_step_2(config: Path, tmp_path: Path):
    """`deepspeed --num_gpus 2` training `config` (write_setup's, into tmp_path), once its run logged step 2:
    yields (the runner, rank -> pid, the ranks' supervisor directory); every process is gone afterwards."""
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    proc = _start(config, tmp_path / "out.txt", EPALM_SUPERVISOR_DIR=str(ranks))
    pids = {}
    try:
        pids = _rank_pids(ranks)
        _wait_for(lambda: _logged_step(tmp_path / "run") >= 2, 120, "step 2")
        yield proc, pids, ranks
    finally:
        _cleanup(proc, pids)


@pytest.mark.distributed
@pytest.mark.slow
def test_sigterm_to_the_plain_deepspeed_runner_checkpoints_every_rank(tmp_path):
    """No supervisor: the runner dies of SIGTERM at once, and each rank notices its launcher is gone."""
    config = write_setup(tmp_path, max_steps=5000, save_every=0, eval_every=0)
    run = tmp_path / "run"
    with _two_ranks_past_step_2(config, tmp_path) as (proc, pids, ranks):
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) != 0  # the runner itself is gone at once...
        codes = _exit_codes(ranks, timeout=60)  # ...the ranks checkpoint and end on their own
    assert codes == [REQUEUE, REQUEUE], (tmp_path / "out.txt").read_text()[-3000:]
    stopped = json.loads((run / layout.STOPPED).read_text())["step"]
    assert 2 <= stopped < 5000
    assert (run / "checkpoints" / layout.LATEST).read_text() == layout.tag_for(stopped)


@pytest.mark.distributed
@pytest.mark.slow
def test_a_stopped_rank_is_named_and_the_job_fails_after_the_collective_timeout(tmp_path):
    config = write_setup(
        tmp_path, max_steps=5000, save_every=0, eval_every=0, watchdog_s=2, collective_timeout_s=15
    )
    with _two_ranks_past_step_2(config, tmp_path) as (_, pids, _):
        os.kill(pids[1], signal.SIGSTOP)
        start = time.monotonic()
        _wait_for(lambda: not Path(f"/proc/{pids[0]}").exists() or _zombie(pids[0]), 90, "rank 0 to fail")
        took = time.monotonic() - start
    out = (tmp_path / "out.txt").read_text()
    assert "no step for" in out and "on rank 0" in out, out[-3000:]
    assert "no sign of life from rank 1" in out and f"pid {pids[1]}" in out
    assert 15 <= took < 60, took


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_retry_lines_for_a_refused_connection_say_so(tmp_path, caplog):
    """The shard server is gone (connections refused): each retry line names the cause as curl says it, not a
    raw argument tuple or the tar reader's "empty file" for the stream that never started."""
    from epalm.data import stream
    from epalm.data.remote_read import ReadLimits
    from testing.shard_fixtures import write_dataset
    from tests.remote_fixtures import serve

    root = write_dataset(tmp_path / "shards", [4])
    limits = ReadLimits(connect_timeout_s=5, read_timeout_s=5, retry_budget_s=30, retries=1)
    with serve(root) as server:
        _, shards = stream.load_manifest(server.url, limits)
    with pytest.raises(OSError, match="read failed at sample 0 after 2 tries") as failed:
        list(stream.iter_shard(shards, 0, 0, 4, lambda name: True, (), "error", None))
    (retry,) = [r.getMessage() for r in caplog.records if "retry 1 of 1" in r.getMessage()]
    for text in (retry, str(failed.value)):
        assert "Failed to connect" in text and "empty file" not in text and "('" not in text
