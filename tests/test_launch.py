"""Smoke test of the README's first command's entry point under torchrun (2 CPU processes)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.distributed
def test_demo_runs_under_torchrun():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "launch" / "demo_layer.py"), "--steps", "3", "--tokens", "64"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world=2 ep_size=2" in out.stdout
    assert "after 3 EMA updates" in out.stdout
    assert "'all_to_all'" in out.stdout
