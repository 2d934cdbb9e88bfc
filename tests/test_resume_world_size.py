"""Resume on another number of ranks (issue 25, item 5).

In-process, the loader: a state of W ranks continues on W' ranks (other workers, other batch size) with
exactly the samples of the interrupted epoch not yet consumed, each once, and the next epoch is any
W'-rank run's. End to end (torchrun, CPU): 2 ranks train, are killed with kill -9 after a checkpoint and
resume on 1 rank (ZeRO-2), and 1 -> 2 (ZeRO-3): the sample ids every rank consumed (logged by a test-only
hook) make one epoch, no id twice; the adapter and Adam's moments are restored exactly; the loss goes on
falling.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from epalm.data.loader import DatasetSpec, LoaderSettings, build_train_loader
from testing.shard_fixtures import take, write_dataset

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    a = write_dataset(root / "a", [13, 7, 12], prefix="a")  # 32 samples
    b = write_dataset(root / "b", [10, 14], prefix="b", task="caption")  # 24
    return DatasetSpec(a, "qa", "image"), DatasetSpec(b, "caption", "image", weight=0.5)


def loaders(specs, tokenizer, world: int, **kw) -> list:
    args = dict(batch_size=2, world_size=world, num_workers=0, seed=5, image_size=16, shuffle_buffer=6)
    settings = [LoaderSettings(rank=r, **args | kw) for r in range(world)]
    return [build_train_loader(list(specs), tokenizer, s) for s in settings]


def rest_of_epoch(loader) -> list[dict]:
    return list(loader)


def merged_state(ranks: list) -> dict:
    """What rank 0 saves under torch.distributed: every rank's skip counts gathered (here by hand)."""
    states = [r.state_dict() for r in ranks]
    state = states[0]
    for r, other in enumerate(states):
        state["worker_skipped"][r], state["skipped"][r] = other["worker_skipped"][r], other["skipped"][r]
    return json.loads(json.dumps(state))  # what a checkpoint stores


def keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["keys"]]


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (dict(world=2), dict(world=1)),
        (dict(world=1), dict(world=2)),
        (dict(world=2, num_workers=2), dict(world=1, num_workers=3)),
        (dict(world=1, batch_size=4), dict(world=2, batch_size=2, num_workers=2)),
    ],
)
def test_the_interrupted_epoch_goes_on_each_sample_once(data, tiny_tokenizer, before, after):
    spec = data[0]
    old = loaders([spec], tiny_tokenizer, **before)
    taken = [take(r, 3) for r in old]  # 3 batches on every rank, mid-epoch
    state = merged_state(old)
    new = loaders([spec], tiny_tokenizer, **after)
    for r in new:
        r.load_state_dict(state, reshard=True)
    rest = [rest_of_epoch(r) for r in new]
    assert len({len(x) for x in rest}) == 1  # equal batch counts on every new rank
    seen = Counter(keys([b for t in taken for b in t]) + keys([b for x in rest for b in x]))
    assert max(seen.values()) == 1, [k for k, n in seen.items() if n > 1]
    everything = {f"a{i:05d}" for i in range(32)}
    missing = everything - set(seen)
    assert len(missing) < after["world"] * after.get("batch_size", 2)  # at most a batch per rank is dropped
    # the next epoch is any run's on the new partition
    fresh = loaders([spec], tiny_tokenizer, **after)
    for r, f in zip(new, fresh):
        take(f, len(f))  # its epoch 0
        assert keys(take(r, len(r))) == keys(take(f, len(f)))


def test_a_resume_inside_the_carried_epoch_is_exact_and_a_second_change_goes_on(data, tiny_tokenizer):
    spec = data[0]
    old = loaders([spec], tiny_tokenizer, world=2)
    taken = keys([b for r in old for b in take(r, 2)])
    one = loaders([spec], tiny_tokenizer, world=1)[0]
    one.load_state_dict(merged_state(old), reshard=True)
    taken += keys(take(one, 3))
    state = merged_state([one])
    assert "carry" in state  # the carry is still running: the state says what it continues
    straight = keys(rest_of_epoch(one))
    again = loaders([spec], tiny_tokenizer, world=1, seed=99)[0]
    again.load_state_dict(json.loads(json.dumps(state)), reshard=True)  # same partition: exact
    assert keys(rest_of_epoch(again)) == straight
    # 2 -> 1 -> 2 within one epoch
    two = loaders([spec], tiny_tokenizer, world=2)
    for r in two:
        r.load_state_dict(state, reshard=True)
    rest = keys([b for r in two for b in rest_of_epoch(r)])
    seen = Counter(taken + rest)
    assert max(seen.values()) == 1 and len(seen) >= 32 - 4


def test_a_mix_finishes_each_datasets_epoch_first(data, tiny_tokenizer):
    old = loaders(data, tiny_tokenizer, world=2)
    taken = [take(r, 4) for r in old]
    state = merged_state(old)
    new = loaders(data, tiny_tokenizer, world=1)[0]
    new.load_state_dict(state, reshard=True)
    carried = {c.dataset: c.per_rank for c in new.carries}
    by_dataset: dict[str, list[dict]] = {}
    for batch in take(new, 40):
        by_dataset.setdefault(batch["dataset"], []).append(batch)
    before = [b for t in taken for b in t]
    for d, spec in enumerate(data):
        name = spec.path.rsplit("/", 1)[-1]
        mine = keys([b for b in before if b["dataset"] == name])
        rest = keys(by_dataset.get(name, [])[: carried[d]])
        seen = Counter(mine + rest)
        assert max(seen.values()) == 1, name  # no sample of the interrupted epoch twice
        total = {"a": 32, "b": 24}[name]
        assert total - len(seen) < 2  # all of it (at most one batch of one rank dropped)


# --------------------------------------------------------------------------- end to end, torchrun on CPU


def _torchrun(config, ranks: int, zero: int, out, *args: str, kill_at: int = -1):
    import subprocess

    from epalm.distributed import free_port
    from testing.support import FAULT_HOOK, cpu_child_env
    from tests.training_fixtures import ROOT, VENV_BIN

    out.mkdir(parents=True, exist_ok=True)
    fault = {"EPALM_FAULT": f"kill_at_batch:{kill_at}"} if kill_at >= 0 else {}
    # tests/fault_hook logs every batch's keys into `out` (and the restored state after a resume)
    env = cpu_child_env(PYTHONPATH=f"{FAULT_HOOK}:{ROOT}", EPALM_TRACE_DIR=str(out), **fault)
    cmd = [
        str(VENV_BIN / "torchrun"), "--nproc_per_node", str(ranks), "--master_port", str(free_port()),
        str(ROOT / "launch" / "train.py"), "--config", str(config), "--precision", "fp32",
        "--ds_config", str(ROOT / "ds_configs" / f"zero{zero}.json"), *args,
    ]  # fmt: skip
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _logged(out) -> dict[int, list[tuple[int, list[str]]]]:
    """rank -> [(loader batch index, keys)] of every process that ran as that rank under `out`."""
    by_rank: dict[int, list] = {}
    for path in sorted(out.glob("keys-rank*.jsonl")):
        rank = int(path.name.split("-")[1].removeprefix("rank"))
        for line in path.read_text().splitlines():
            record = json.loads(line)
            by_rank.setdefault(rank, []).append((record["index"], record["keys"]))
    return by_rank


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(("first", "second", "zero"), [(2, 1, 2), (1, 2, 3)])
def test_kill9_and_resume_on_another_number_of_ranks(tmp_path, first, second, zero):
    import shutil

    import torch

    from tests.training_fixtures import read_jsonl, write_setup

    # 32 samples, global batch 8 (micro 2): 4 steps an epoch on 1 rank (accumulation 4) and on 2 (2)
    config = write_setup(tmp_path, max_steps=8, save_every=2, eval_every=0)
    run, before, after = tmp_path / "run", tmp_path / "before", tmp_path / "after"
    accumulation = {1: 4, 2: 2}
    kill_at = 3 * accumulation[first] + 1  # inside step 4, after step 2's checkpoint and step 3
    r = _torchrun(config, first, zero, before, kill_at=kill_at)
    assert r.returncode != 0, r.stderr[-3000:]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000002"
    step2 = run / "checkpoints" / "step_00000002"
    saved = json.loads((step2 / "trainer_state.json").read_text())
    assert saved["world_size"] == first
    shutil.copytree(step2, tmp_path / "step2")  # the resumed run's saves prune it
    r = _torchrun(config, second, zero, after, "--resume", "auto")
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert f"saved on {first} ranks" in r.stderr

    # the samples: what the first run consumed up to the checkpoint, then the rest of epoch 0 on the new ranks
    upto = saved["loader"]["consumed_batches"]
    old = [k for batches in _logged(before).values() for i, ks in batches if i < upto for k in ks]
    new = _logged(after)
    assert sorted(new) == list(range(second))
    per_epoch = 32 // (2 * second)  # batches per rank and epoch on the new ranks
    epoch0 = [k for batches in new.values() for i, ks in batches if i < per_epoch for k in ks]
    epoch1 = [
        k for batches in new.values() for i, ks in batches if per_epoch <= i < 2 * per_epoch for k in ks
    ]
    everything = {f"s{i:05d}" for i in range(32)}
    assert len(old) == 16 and Counter(old + epoch0) == Counter(everything)  # one epoch, each id once
    assert Counter(epoch1) == Counter(everything)  # and the next epoch is whole too

    # the adapter and Adam's moments as the checkpoint holds them, exactly
    stored = torch.load(tmp_path / "step2" / "trainable_state.pt", weights_only=True)
    restored = torch.load(after / "restored.pt", weights_only=True)
    for part in ("params", "exp_avg", "exp_avg_sq"):
        assert stored[part].keys() == restored[part].keys()
        assert all(torch.equal(stored[part][n], restored[part][n]) for n in stored[part]), part
    assert stored["optimizer_step"] == restored["optimizer_step"] == 2
    assert stored["scheduler"] == restored["scheduler"]
    assert any(v.abs().sum() > 0 for v in restored["exp_avg_sq"].values())

    # training went on: 8 steps logged once each, and the loss keeps falling after the resume
    losses = {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}
    assert sorted(losses) == list(range(1, 9))
    assert losses[7] + losses[8] < losses[1] + losses[2] - 0.5, losses
    assert losses[3] < losses[1], losses


# --------------------------------------------------------------------------- the portable state, every stage


def _roundtrip(config: str, stage: int, precision: str) -> dict:
    """(Run as a child process.) Train an engine 2 steps, restore its portable state into a fresh engine,
    then step both on the same batch: what was restored, the next forward and the next update must match."""
    import torch

    from epalm.config import load_config
    from epalm.distributed import init_distributed
    from epalm.train.ds_config import build_ds_config, load_ds_config
    from epalm.train.engine import build_engine
    from epalm.train.trainable_state import gather_trainable_state, restore_trainable_state
    from tests.training_fixtures import ROOT

    cfg = load_config(config)
    init_distributed()
    base = load_ds_config(ROOT / "ds_configs" / ("zero3.json" if stage == 3 else "zero2.json"))
    base["zero_optimization"] = {**base["zero_optimization"], "stage": stage}
    ds_config = build_ds_config(base, cfg.train, 1, precision)

    def batch(seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 300, (2, 8), generator=g)
        media = torch.randn(2, 3, 16, 16, generator=g)
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, media=media)

    def step(engine, seed: int) -> None:
        torch.manual_seed(seed)  # dropout draws the same on both engines
        ds = engine.ds_engine
        for i in range(ds.gradient_accumulation_steps()):
            ds.backward(ds(**batch(10 * seed + i)).loss)
            ds.step()

    def same(x: dict, y: dict) -> bool:
        tensors = all(
            torch.equal(x[k][n], y[k][n]) for k in ("params", "exp_avg", "exp_avg_sq") for n in x[k]
        )
        return tensors and all(x[k] == y[k] for k in ("optimizer_step", "scheduler", "engine"))

    a = build_engine(cfg, ds_config, 8)
    step(a, 1)
    step(a, 2)
    saved = gather_trainable_state(a)
    b = build_engine(cfg, ds_config, 8)
    restore_trainable_state(b, saved)
    out = {"restored": same(saved, gather_trainable_state(b))}
    for e in (a, b):
        e.ds_engine.eval()
    with torch.no_grad():
        out["forward"] = torch.equal(a.ds_engine(**batch(7)).loss, b.ds_engine(**batch(7)).loss)
    for e in (a, b):
        e.ds_engine.train()
        step(e, 3)
    out["next_step"] = same(gather_trainable_state(a), gather_trainable_state(b))
    out["moments"] = any(v.abs().sum() > 0 for v in saved["exp_avg_sq"].values())
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "precision"), [(0, "fp32"), (1, "fp32"), (2, "fp32"), (3, "fp32"), (0, "bf16")]
)
def test_the_portable_state_restores_exactly_under_every_zero_stage(tmp_path, stage, precision):
    """Same world size: a fresh engine restored from the portable state takes the uninterrupted run's next
    step bit for bit (so nothing of the optimizer is missing: moments, step count, lr, fp32 masters)."""
    import subprocess
    import sys

    from testing.support import cpu_child_env
    from tests.training_fixtures import ROOT, write_setup

    config = write_setup(tmp_path)
    code = (
        "import json, sys; from tests.test_resume_world_size import _roundtrip; "
        f"print('RESULT', json.dumps(_roundtrip({str(config)!r}, {stage}, {precision!r})))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        env=cpu_child_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.split("RESULT", 1)[1])
    assert result == {"restored": True, "forward": True, "next_step": True, "moments": True}
