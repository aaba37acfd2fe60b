"""A rank killed mid-training under torchrun with restarts: the job restarts from the last
checkpoint and finishes with nothing lost (the losses equal an uninterrupted run's)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
JOB = ["launch/train.py", "--steps", "12", "--micro-batch", "4", "--seq-len", "32", "--eval-every", "12",
       "--eval-batches", "1", "--ckpt-every", "3", "--log-every", "1", "--auto-resume"]


def _torchrun(run_dir, restarts):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "--max-restarts", str(restarts), *JOB, "--run-dir", str(run_dir)]


def _complete(ckpt: Path, tag: str) -> bool:
    """The checkpoint is whole: `latest` names it and every EP rank's expert file is in place (the
    hook renames them into place after DeepSpeed's own files). A kill while the tag folder is
    still being written would test a torn save, not a restart."""
    latest = ckpt / "latest"
    try:
        named = latest.read_text().strip() == tag
    except OSError:
        return False
    return named and len(list((ckpt / tag).glob("default_moe_experts_ep2_rank*.pt"))) == 2


@pytest.mark.distributed
def test_killed_rank_restarts_from_checkpoint(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(_torchrun(tmp_path / "faulty", 1), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    killed = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and killed is None:  # wait for the step-6 checkpoint, then kill a rank
            if _complete(tmp_path / "faulty" / "ckpt", "step6") and job.poll() is None:
                workers = [p for p in psutil.Process(job.pid).children(recursive=True) if "train.py" in " ".join(p.cmdline())]
                if len(workers) == 2:
                    killed = workers[-1].pid
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.2)
        out, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert killed is not None, "the job finished before a rank could be killed"
    assert job.returncode == 0, out[-4000:]
    assert "resumed at step" in out, out[-3000:]

    clean = subprocess.run(_torchrun(tmp_path / "clean", 0), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert clean.returncode == 0, clean.stderr[-3000:]
    faulty = json.loads((tmp_path / "faulty" / "metrics.json").read_text())["history"]
    ref = json.loads((tmp_path / "clean" / "metrics.json").read_text())["history"]
    assert [s for s, _ in faulty["train"]] == list(range(1, 13))
    assert faulty["train"] == ref["train"] and faulty["val"] == ref["val"]


def test_faults_hangs_and_ema_statistics():
    """Empty micro-batches, all tokens to one expert, non-finite skip/raise, bf16 statistics and
    gradient accumulation (one commit) against the dense reference, and a missing peer failing at
    the group timeout."""
    import fault_workers
    from dist import run_distributed

    run_distributed(fault_workers.all_faults, 2)
