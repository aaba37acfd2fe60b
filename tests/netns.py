"""Shared by the network-namespace tests (test_multinode, test_cluster): can this machine make
namespaces, and the environment their commands run with."""

import os
import shutil
import subprocess
import sys
from pathlib import Path


def can_make_namespaces():
    """None when network namespaces can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip`)"
    probe = subprocess.run(["ip", "netns", "add", "dmprobe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create network namespaces here: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "dmprobe"], capture_output=True)
    return None


def env(prefix):
    venv_bin = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "DM_NETNS_PREFIX": prefix,
        "OMP_NUM_THREADS": "1",
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
    }


def left_behind(prefix):
    """Namespaces with this prefix that still exist."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line for line in out.split("\n") if line.startswith(prefix)]
