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
JOB = ["--steps", "9", "--ep-size", "4", "--micro-batch", "4", "--seq-len", "32", "--eval-every", "9",
       "--eval-batches", "1", "--ckpt-every", "3", "--log-every", "1"]
PACKAGES = {"slurmctld": "slurm-wlm", "slurmd": "slurm-wlm", "munged": "munge", "pdsh": "pdsh", "sshd": "openssh-server"}

pytestmark = pytest.mark.distributed


def _skip_reason():
    reason = netns.can_make_namespaces()
    if reason:
        return reason
    missing = sorted({pkg for tool, pkg in PACKAGES.items() if shutil.which(tool) is None
                      and not Path("/usr/sbin", tool).exists()})
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
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                          "launch/train.py", *JOB, "--run-dir", str(out)], cwd=ROOT, env=netns.env("unused"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return _history(out)


def _history(run_dir: Path):
    return json.loads((run_dir / "metrics.json").read_text())["history"]


def _job_state(state_dir, env, job_id):
    out = subprocess.run(["bash", SLURM, "run", str(state_dir), "scontrol", "show", "job", job_id],
                         capture_output=True, text=True, env=env, timeout=30).stdout
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
    try:
        named = (ckpt / "latest").read_text().strip() == tag
    except OSError:
        return False
    return named and len(list((ckpt / tag).glob("default_moe_experts_ep4_rank*.pt"))) == 4


def test_slurm_sbatch_two_nodes_and_a_killed_rank(tmp_path, single_node):
    prefix = f"ds{os.getpid() % 10000}"
    env = netns.env(prefix)
    # Short: slurmd's unix sockets live under it (108-byte limit on socket paths).
    state = Path(tempfile.mkdtemp(prefix="dms", dir="/tmp"))
    sbatch_env = ["env", f"GLOO_SOCKET_IFNAME={prefix}eth", "NPROC_PER_NODE=2", f"VENV={Path(sys.executable).parents[1]}"]
    try:
        t0 = time.time()
        subprocess.run(["bash", SLURM, "up", str(state)], env=env, check=True, timeout=120)
        up_s = time.time() - t0
        jobs = {}
        for name, port in (("clean", 29591), ("faulty", 29592)):
            run_dir = tmp_path / name
            cmd = ["bash", SLURM, "run", str(state), *sbatch_env, f"MASTER_PORT={port}", "sbatch", "--parsable",
                   "--nodes", "2", "--output", str(tmp_path / f"{name}-%j.out"), "launch/slurm.sbatch", *JOB,
                   "--run-dir", str(run_dir)]
            jobs[name] = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True,
                                        timeout=30).stdout.strip().split(";")[0]
            t0 = time.time()
            killed = []

            def kill_after_checkpoint():
                # After the step-3 checkpoint is whole, SIGKILL one training process of the job
                # (a worker: train.py with this run's folder, not a torchrun agent or srun).
                if name == "faulty" and not killed and _complete(run_dir / "ckpt", "step3"):
                    cmdlines = {p.pid: " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])}
                    workers = [pid for pid, c in cmdlines.items()
                               if "launch/train.py" in c and str(run_dir) in c and "torch.distributed.run" not in c]
                    if len(workers) == 4:
                        os.kill(workers[-1], signal.SIGKILL)
                        killed.append(workers[-1])

            final = _wait_job(state, env, jobs[name], on_poll=kill_after_checkpoint)
            outs = list(tmp_path.glob(f"{name}-*.out"))
            logs = "".join(f"\n--- {f.name}\n" + f.read_text()[-1500:] for f in sorted(state.glob("*.log")))
            assert outs, f"{name} job {jobs[name]}: {final}, no output file{logs}"
            out = outs[0].read_text()
            assert final == "COMPLETED", f"{name} job {jobs[name]}: {final}\n{out[-4000:]}{logs}"
            hist = _history(run_dir)
            assert hist["train"] == single_node["train"] and hist["val"] == single_node["val"], name
            print(f"[slurm] {name} job: {time.time() - t0:.1f} s (cluster up {up_s:.1f} s)")
            if name == "faulty":
                assert killed, "the job finished before a rank could be killed"
                assert "resumed at step" in out, out[-3000:]
    finally:
        subprocess.run(["bash", SLURM, "down", str(state)], env=env, timeout=60)
        shutil.rmtree(state, ignore_errors=True)
    assert not netns.left_behind(prefix)


def _manifest_complete(ckpt: Path, tag: str) -> bool:
    return (ckpt / tag / "default_moe_manifest.json").exists()


def test_slurm_node_loss_requeues_and_resumes(tmp_path, single_node):
    """Node B lost mid-job (every process in its namespace SIGKILLed, slurmd included): SLURM
    fails the job (NODE_FAIL) and requeues it (`#SBATCH --requeue`); once B is back the script
    runs again and resumes from the newest complete checkpoint with the uninterrupted losses."""
    prefix = f"dl{os.getpid() % 10000}"
    env = netns.env(prefix)
    state = Path(tempfile.mkdtemp(prefix="dml", dir="/tmp"))
    run_dir = tmp_path / "lost"
    try:
        subprocess.run(["bash", SLURM, "up", str(state)], env=env, check=True, timeout=120)
        cmd = ["bash", SLURM, "run", str(state), "env", f"GLOO_SOCKET_IFNAME={prefix}eth", "NPROC_PER_NODE=2",
               f"VENV={Path(sys.executable).parents[1]}", "MASTER_PORT=29593", "sbatch", "--parsable", "--nodes", "2",
               "--output", str(tmp_path / "lost-%j.out"), "launch/slurm.sbatch", *JOB, "--run-dir", str(run_dir)]
        job = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True,
                             timeout=30).stdout.strip().split(";")[0]
        t0 = time.time()
        while time.time() - t0 < 240 and not _manifest_complete(run_dir / "ckpt", "step3"):
            time.sleep(0.2)
        assert _manifest_complete(run_dir / "ckpt", "step3"), "no step-3 checkpoint"
        subprocess.run(["bash", SLURM, "lose", str(state), "B"], env=env, check=True, timeout=30)
        lost_at = time.time()
        # SLURM notices (SlurmdTimeout), fails and requeues the job; then the node comes back.
        requeued = False
        while time.time() - lost_at < 120 and not requeued:
            out = subprocess.run(["bash", SLURM, "run", str(state), "scontrol", "show", "job", job], env=env,
                                 capture_output=True, text=True, timeout=30).stdout
            requeued = "Restarts=1" in out or "JobState=PENDING" in out or "REQUEUE" in out
            time.sleep(1)
        assert requeued, out
        subprocess.run(["bash", SLURM, "node-up", str(state), "B"], env=env, check=True, timeout=60)
        final = _wait_job(state, env, job, timeout=300)
        out = "".join(f.read_text() for f in tmp_path.glob("lost-*.out"))
        logs = "".join(f"\n--- {f.name}\n" + f.read_text()[-1500:] for f in sorted(state.glob("*.log")))
        assert final == "COMPLETED", f"{final}\n{out[-4000:]}{logs}"
        assert "(start 1)" in out and "resumed at step" in out, out[-3000:]
        hist = _history(run_dir)
        assert hist["train"] == single_node["train"] and hist["val"] == single_node["val"]
        print(f"[slurm] node lost at step >= 3, requeued, resumed and finished in {time.time() - lost_at:.1f} s")
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
        launch_env = {**env, "PATH": f"{state / 'bin'}{os.pathsep}{env['PATH']}", "HOSTFILE": str(state / "hostfile"),
                      "MASTER_ADDR": "10.77.0.1", "MASTER_PORT": "29611", "DS_ENV_FILE": str(state / "ds_env")}
        t0 = time.time()
        res = subprocess.run(["ip", "netns", "exec", f"{prefix}A", "bash", "launch/deepspeed_launch.sh", *JOB,
                              "--run-dir", str(run_dir)], cwd=ROOT, env=launch_env, capture_output=True, text=True,
                             timeout=300)
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
