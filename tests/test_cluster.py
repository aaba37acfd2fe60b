"""The launchers users start multi-node jobs with, on real cluster software: a throw-away SLURM
cluster (slurmctld + one slurmd per network-namespace node, munge) running launch/slurm.sbatch,
and DeepSpeed's hostfile runner reaching the nodes over ssh (pdsh) through
launch/deepspeed_launch.sh. Both: EP 4 across 2 nodes x 2 processes, losses equal to the
single-node 4-process run of the same command; the SLURM job also survives a killed rank.

Needs root (namespaces, daemons); the Debian packages (slurm-wlm, munge, pdsh, openssh-server)
are installed when missing; skipped with the reason otherwise. Every wait has a timeout; daemons
and namespaces are always removed (also by hand: `bash launch/slurm_netns.sh down DIR`,
`bash launch/ssh_netns.sh down DIR`).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

import netns

ROOT = Path(__file__).resolve().parents[1]
SLURM = str(ROOT / "launch" / "slurm_netns.sh")
SSH = str(ROOT / "launch" / "ssh_netns.sh")
JOB = [
    "--steps",
    "9",
    "--ep-size",
    "4",
    "--micro-batch",
    "4",
    "--seq-len",
    "32",
    "--eval-every",
    "9",
    "--eval-batches",
    "1",
    "--ckpt-every",
    "3",
    "--log-every",
    "1",
]
PACKAGES = {"slurmctld": "slurm-wlm", "slurmd": "slurm-wlm", "munged": "munge", "pdsh": "pdsh", "sshd": "openssh-server"}

pytestmark = pytest.mark.distributed


def _skip_reason():
    reason = netns.can_make_namespaces()
    if reason:
        return reason
    missing = sorted(
        {pkg for tool, pkg in PACKAGES.items() if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists()}
    )
    if missing:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
            except (OSError, subprocess.TimeoutExpired) as e:
                return f"could not install {missing}: {e}"
            if res.returncode != 0:
                return f"could not install {missing}: {(res.stderr or res.stdout)[-300:]}"
    return None


@pytest.fixture(scope="module")
def cluster_ok():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def single_node(tmp_path_factory, cluster_ok):
    """The same command on one node, 4 processes: the losses the cluster runs must reproduce."""
    out = tmp_path_factory.mktemp("single")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "4",
            "launch/train.py",
            *JOB,
            "--run-dir",
            str(out),
        ],
        cwd=ROOT,
        env=netns.env("unused"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return _history(out)


def _history(run_dir: Path):
    return json.loads((run_dir / "metrics.json").read_text())["history"]


def _job_state(state_dir, env, job_id):
    out = subprocess.run(
        ["bash", SLURM, "run", str(state_dir), "scontrol", "show", "job", job_id],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    ).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "UNKNOWN")


def _wait_job(state_dir, env, job_id, timeout=240, on_poll=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = _job_state(state_dir, env, job_id)
        if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "UNKNOWN"):
            return state
        if on_poll is not None:
            on_poll()
        time.sleep(0.5)
    return "TIMEOUT"


def _complete(ckpt: Path, tag: str) -> bool:
    """The checkpoint is committed (its manifest is written after every rank's files)."""
    return (ckpt / tag / "default_moe_manifest.json").exists()


def _workers_of(run_dir):
    cmdlines = {p.pid: " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])}
    return [
        pid for pid, c in cmdlines.items() if "launch/train.py" in c and str(run_dir) in c and "torch.distributed.run" not in c
    ]


def test_slurm_sbatch_two_nodes_a_killed_rank_and_a_lost_node(tmp_path, single_node):
    """launch/slurm.sbatch on 2 nodes: a job in which one training process is
    SIGKILLed after the step-3 checkpoint (torchrun restarts the workers inside the allocation)
    and, after the step-6 checkpoint, node B is lost (every process in its namespace SIGKILLed,
    slurmd included): SLURM fails the job (NODE_FAIL) and requeues it (`#SBATCH --requeue`); once
    B is back the script runs again and resumes; it ends with the single-node losses. (Clean
    2-node jobs, no restart and no exit-time abort: launch/slurm_repeat.py, 10 in a row.)"""
    prefix = f"ds{os.getpid() % 10000}"
    env = netns.env(prefix)
    # Short: slurmd's unix sockets live under it (108-byte limit on socket paths).
    state = Path(tempfile.mkdtemp(prefix="dms", dir="/tmp"))
    sbatch_env = ["env", f"GLOO_SOCKET_IFNAME={prefix}eth", "NPROC_PER_NODE=2", f"VENV={Path(sys.executable).parents[1]}"]
    try:
        t0 = time.time()
        subprocess.run(["bash", SLURM, "up", str(state)], env=env, check=True, timeout=120)
        up_s = time.time() - t0
        for name, port in (("faulty", 29592),):
            run_dir = tmp_path / name
            cmd = [
                "bash",
                SLURM,
                "run",
                str(state),
                *sbatch_env,
                f"MASTER_PORT={port}",
                "sbatch",
                "--parsable",
                "--nodes",
                "2",
                "--output",
                str(tmp_path / f"{name}-%j.out"),
                "launch/slurm.sbatch",
                *JOB,
                "--run-dir",
                str(run_dir),
            ]
            job = (
                subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True, timeout=30)
                .stdout.strip()
                .split(";")[0]
            )
            t0 = time.time()
            events = []

            def faults(run_dir=run_dir, name=name, events=events, job=job):
                ckpt = run_dir / "ckpt"
                if name != "faulty":
                    return
                if not events and _complete(ckpt, "step3"):
                    workers = _workers_of(run_dir)
                    if len(workers) == 4:
                        os.kill(workers[-1], signal.SIGKILL)
                        events.append(("rank killed", time.time()))
                elif len(events) == 1 and _complete(ckpt, "step6"):
                    subprocess.run(["bash", SLURM, "lose", str(state), "B"], env=env, check=True, timeout=30)
                    events.append(("node lost", time.time()))
                elif len(events) == 2:
                    out = subprocess.run(
                        ["bash", SLURM, "run", str(state), "scontrol", "show", "job", job],
                        env=env,
                        capture_output=True,
                        text=True,
                        timeout=30,
                    ).stdout
                    if "Restarts=1" in out:  # failed and requeued: the node comes back
                        subprocess.run(["bash", SLURM, "node-up", str(state), "B"], env=env, check=True, timeout=60)
                        events.append(("requeued, node back", time.time()))

            final = _wait_job(state, env, job, timeout=420, on_poll=faults)
            outs = list(tmp_path.glob(f"{name}-*.out"))
            logs = "".join(f"\n--- {f.name}\n" + f.read_text()[-1500:] for f in sorted(state.glob("*.log")))
            assert outs, f"{name} job {job}: {final}, no output file{logs}"
            out = outs[0].read_text()
            assert final == "COMPLETED", f"{name} job {job}: {final} {events}\n{out[-4000:]}{logs}"
            hist = _history(run_dir)
            assert hist["train"] == single_node["train"] and hist["val"] == single_node["val"], name
            print(
                f"[slurm] {name} job: {time.time() - t0:.1f} s (cluster up {up_s:.1f} s); "
                + ", ".join(f"{e} at +{t - t0:.1f} s" for e, t in events)
            )
            if name == "faulty":
                assert [e for e, _ in events] == ["rank killed", "node lost", "requeued, node back"], events
                assert "resumed at step 3" in out and "resumed at step 6" in out and "(start 1)" in out, out[-3000:]
                assert "terminate called" not in out, out[-3000:]
            else:
                assert "resumed at step" not in out and "terminate called" not in out, out[-3000:]
    finally:
        subprocess.run(["bash", SLURM, "down", str(state)], env=env, timeout=60)
        shutil.rmtree(state, ignore_errors=True)
    assert not netns.left_behind(prefix)


def test_deepspeed_hostfile_runner_over_ssh(tmp_path, single_node):
    """`HOSTFILE=... launch/deepspeed_launch.sh` from node A: DeepSpeed's runner reaches both nodes
    with pdsh over ssh (a key made for the test), GLOO_SOCKET_IFNAME travels in the
    .deepspeed_env file (DS_ENV_FILE), EP 4 spans both nodes; losses equal the single-node run."""
    prefix = f"dh{os.getpid() % 10000}"
    env = netns.env(prefix)
    state = Path(tempfile.mkdtemp(prefix="dmh", dir="/tmp"))
    (state / "hostfile").write_text("10.77.0.1 slots=2\n10.77.0.2 slots=2\n")
    (state / "ds_env").write_text(f"GLOO_SOCKET_IFNAME={prefix}eth\nOMP_NUM_THREADS=1\n")
    run_dir = tmp_path / "run"
    try:
        subprocess.run(["bash", SSH, "up", str(state)], env=env, check=True, timeout=60)
        launch_env = {
            **env,
            "PATH": f"{state / 'bin'}{os.pathsep}{env['PATH']}",
            "HOSTFILE": str(state / "hostfile"),
            "MASTER_ADDR": "10.77.0.1",
            "MASTER_PORT": "29611",
            "DS_ENV_FILE": str(state / "ds_env"),
        }
        t0 = time.time()
        res = subprocess.run(
            ["ip", "netns", "exec", f"{prefix}A", "bash", "launch/deepspeed_launch.sh", *JOB, "--run-dir", str(run_dir)],
            cwd=ROOT,
            env=launch_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        print(f"[deepspeed runner] {time.time() - t0:.1f} s")
    finally:
        subprocess.run(["bash", SSH, "down", str(state)], env=env, timeout=60)
        shutil.rmtree(state, ignore_errors=True)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "10.77.0.2: " in out and "world=4" in out, out[-3000:]  # ranks on the second host
    hist = _history(run_dir)
    assert hist["train"] == single_node["train"] and hist["val"] == single_node["val"]
    assert not netns.left_behind(prefix)
