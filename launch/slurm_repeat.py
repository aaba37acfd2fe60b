"""Repeats the clean 2-node SLURM job (launch/slurm.sbatch on the network-namespace test cluster of
launch/slurm_netns.sh; root) and counts the runs with a spurious restart or an exit-time abort
("terminate called", or a resume in a job nothing killed).

    python launch/slurm_repeat.py --jobs 10 [--out results/faults/slurm_repeat.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLURM = str(ROOT / "launch" / "slurm_netns.sh")
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    prefix = f"dr{os.getpid() % 10000}"
    env = {
        **os.environ,
        "DM_NETNS_PREFIX": prefix,
        "OMP_NUM_THREADS": "1",
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
    }
    state = Path(tempfile.mkdtemp(prefix="dmr", dir="/tmp"))
    work = Path(tempfile.mkdtemp(prefix="slurm_repeat"))
    rows = []
    try:
        subprocess.run(["bash", SLURM, "up", str(state)], env=env, check=True, timeout=120)
        for i in range(args.jobs):
            run_dir = work / f"job{i}"
            t0 = time.time()
            cmd = [
                "bash",
                SLURM,
                "run",
                str(state),
                "env",
                f"GLOO_SOCKET_IFNAME={prefix}eth",
                "NPROC_PER_NODE=2",
                f"VENV={Path(sys.executable).parents[1]}",
                f"MASTER_PORT={29700 + i}",
                "sbatch",
                "--parsable",
                "--nodes",
                "2",
                "--output",
                str(work / f"job{i}.out"),
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
            state_now = "PENDING"
            while time.time() - t0 < 300 and state_now in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "UNKNOWN"):
                time.sleep(1)
                out = subprocess.run(
                    ["bash", SLURM, "run", str(state), "scontrol", "show", "job", job],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=30,
                ).stdout
                state_now = next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "UNKNOWN")
            text = (work / f"job{i}.out").read_text() if (work / f"job{i}.out").exists() else ""
            rows.append(
                {
                    "job": i,
                    "state": state_now,
                    "seconds": round(time.time() - t0, 1),
                    "terminate_called": "terminate called" in text,
                    "restarted": "resumed at step" in text,
                }
            )
            print(rows[-1], flush=True)
    finally:
        subprocess.run(["bash", SLURM, "down", str(state)], env=env, timeout=60)
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    bad = [r for r in rows if r["state"] != "COMPLETED" or r["terminate_called"] or r["restarted"]]
    print(f"{len(rows)} jobs, {len(bad)} with a failure, an exit-time abort or a spurious restart")
    if args.out:
        Path(args.out).write_text(json.dumps({"jobs": rows, "bad": len(bad)}, indent=1))
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
