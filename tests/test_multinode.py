"""Two hosts for real: two network namespaces joined by a veth pair, one torchrun "node" in each
(--nnodes 2, node rank 0 and 1) rendezvousing over TCP on the veth addresses. Training on 2 hosts x 1 rank
gives the same adapter, bit for bit, as 1 host x 2 ranks."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file

from testing.slurm_cluster import DEMO_CONFIG, ROOT, VENV_BIN, demo_data, demo_overrides, free_port, train_env

pytestmark = [pytest.mark.multinode, pytest.mark.distributed, pytest.mark.slow]
STEPS = 8
PORT = 29611  # inside the namespaces nothing else listens


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_hosts() -> Iterator[list[tuple[str, str, str]]]:
    """[(namespace, veth, address)] for hosts 0 and 1 on 10.213.N.0/24; removed afterwards, even on failure."""
    tag = f"{os.getpid() % 10000}{random.randrange(100)}"
    names = [f"epalm{tag}h{i}" for i in range(2)]
    veths = [f"ev{tag}{i}" for i in range(2)]  # at most 15 characters
    subnet = random.randrange(1, 255)
    addrs = [f"10.213.{subnet}.{i + 1}" for i in range(2)]
    try:
        r = _ip("netns", "add", names[0])
        if r.returncode != 0:
            pytest.skip(f"network namespaces are not permitted here (ip netns add: {r.stderr.strip()})")
        steps = [
            ("netns", "add", names[1]),
            ("link", "add", veths[0], "type", "veth", "peer", "name", veths[1]),
        ]
        for i in range(2):
            steps += [
                ("link", "set", veths[i], "netns", names[i]),
                ("-n", names[i], "addr", "add", f"{addrs[i]}/24", "dev", veths[i]),
                ("-n", names[i], "link", "set", veths[i], "up"),
                ("-n", names[i], "link", "set", "lo", "up"),
            ]
        for step in steps:
            r = _ip(*step)
            assert r.returncode == 0, (step, r.stderr)
        yield list(zip(names, veths, addrs))
    finally:
        for name in names:
            _ip("netns", "del", name)  # also destroys the veth pair


def _adapter(run_dir: Path) -> dict:
    return load_file(run_dir / "adapter" / "adapter.safetensors")


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Wait for every process; on timeout kill each one's process group (by PID) and fail."""
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def test_two_hosts_one_rank_each_equal_one_host_two_ranks(two_hosts, tmp_path):
    data = demo_data(tmp_path / "demo")
    train = [str(ROOT / "launch/train.py"), "--config", DEMO_CONFIG, "--precision", "fp32"]
    train += ["--ds_config", "ds_configs/zero3.json"]
    torchrun = str(VENV_BIN / "torchrun")

    # 1 host x 2 ranks (on this machine's loopback)
    one = tmp_path / "one_host"
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), *train]
    r = subprocess.run(
        cmd + demo_overrides(data, one, STEPS),
        cwd=ROOT,
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]

    # 2 hosts x 1 rank: node rank 0 in the first namespace is the master; gloo must use the veth
    two = tmp_path / "two_hosts"
    master = two_hosts[0][2]
    procs, logs = [], []
    for node_rank, (ns, veth, _addr) in enumerate(two_hosts):
        log = open(tmp_path / f"node{node_rank}.log", "w")  # noqa: SIM115 (closed below)
        logs.append(log)
        cmd = ["ip", "netns", "exec", ns, torchrun, "--nnodes", "2", "--node_rank", str(node_rank)]
        cmd += ["--nproc_per_node", "1", "--master_addr", master, "--master_port", str(PORT), *train]
        env = train_env(GLOO_SOCKET_IFNAME=veth, TP_SOCKET_IFNAME=veth, NCCL_SOCKET_IFNAME=veth)
        procs.append(
            subprocess.Popen(
                cmd + demo_overrides(data, two, STEPS),
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    try:
        codes = _wait_all(procs, timeout=300)
    finally:
        for log in logs:
            log.close()
    out = "\n".join((tmp_path / f"node{i}.log").read_text(errors="replace")[-2500:] for i in range(2))
    assert codes == [0, 0], out

    import json

    summary = json.loads((two / "summary.json").read_text())
    assert summary["step"] == STEPS and len(summary["adapter_digests"]) == 2
    a, b = _adapter(one), _adapter(two)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].equal(b[k]), k  # bit-identical (fp32, and no NaN in a trained adapter)
