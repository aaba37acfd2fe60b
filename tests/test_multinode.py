"""Two "nodes" on one machine (network namespaces + veth), 2 processes each, EP spanning both
nodes, through the DeepSpeed main job: the losses equal the single-node 4-process run's.

Needs root and iproute2 (`ip netns`); skipped with the reason otherwise. Every step has a timeout
and the namespaces are always deleted.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import netns

ROOT = Path(__file__).resolve().parents[1]
NETNS = str(ROOT / "launch" / "multinode_netns.sh")
JOB = [
    "launch/train.py",
    "--steps",
    "3",
    "--ep-size",
    "4",
    "--micro-batch",
    "4",
    "--seq-len",
    "32",
    "--eval-every",
    "3",
    "--eval-batches",
    "1",
    "--ckpt-every",
    "100",
    "--log-every",
    "1",
]


@pytest.mark.distributed
def test_two_nodes_in_network_namespaces_equal_single_node(tmp_path):
    reason = netns.can_make_namespaces()
    if reason:
        pytest.skip(reason)
    prefix = f"dm{os.getpid() % 10000}"
    env = netns.env(prefix)
    procs = []
    try:
        subprocess.run(["bash", NETNS, "up"], env=env, check=True, timeout=30)
        for node, rank in (("A", 0), ("B", 1)):
            cmd = [
                "bash",
                NETNS,
                "run",
                node,
                "env",
                "NNODES=2",
                f"NODE_RANK={rank}",
                "MASTER_ADDR=10.77.0.1",
                "MASTER_PORT=29571",
                "NPROC_PER_NODE=2",
                "bash",
                "launch/torchrun_multinode.sh",
                *JOB,
                "--run-dir",
                str(tmp_path / "two"),
            ]
            log = open(tmp_path / f"node{node}.log", "w")
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        for p in procs:
            assert p.wait(timeout=300) == 0, (tmp_path / "nodeA.log").read_text()[-3000:] + (tmp_path / "nodeB.log").read_text()[
                -3000:
            ]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        subprocess.run(["bash", NETNS, "down"], env=env, timeout=30)
    assert not netns.left_behind(prefix)

    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "4",
            *JOB,
            "--run-dir",
            str(tmp_path / "one"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two_hist = json.loads((tmp_path / "two" / "metrics.json").read_text())["history"]
    one_hist = json.loads((tmp_path / "one" / "metrics.json").read_text())["history"]
    assert two_hist["train"] == one_hist["train"] and two_hist["val"] == one_hist["val"]
    log = (tmp_path / "nodeA.log").read_text()
    assert "world=4" in log and "ep_size=4" in log
