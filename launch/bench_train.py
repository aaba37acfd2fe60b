"""Benchmark of the main job's step time with the "default_moe" flag on and off (one run each,
sequentially, same model/data/seed). Run by `bash launch/bench_train.sh [--steps N]`.

Rows: flag off (plain DeepSpeed data parallelism, the model's layers as built: TopK, every rank
holds all experts), flag on with router topk (expert parallel, EP = ranks), flag on with router
default (Default MoE, EP = ranks). Step time is the median over the run's steps after the first 10.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--nproc", type=int, default=int(os.environ.get("NPROC", 2)))
    args = ap.parse_args()
    rows = [
        ("off (plain DeepSpeed, DP)", ["--deepspeed-config", "configs/ds_gpt_tiny_off.json"]),
        ("on, router topk, EP", ["--router", "topk"]),
        ("on, router default, EP", ["--router", "default"]),
    ]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in rows:
            run_dir = Path(tmp) / name.split()[0]
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(args.nproc),
                "launch/train.py",
                "--steps",
                str(args.steps),
                "--eval-every",
                str(args.steps),
                "--ckpt-every",
                str(10 * args.steps),
                "--run-dir",
                str(run_dir),
                *extra,
            ]
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if out.returncode != 0:
                print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{name}: failed")
            m = json.loads((run_dir / "metrics.json").read_text())
            times = m["history"]["step_time"][10:]
            step = statistics.median(times)
            tokens = m["tokens_per_s"] * m["median_step_s"]
            loads = [v for _, v in m["history"]["load"]]
            rank_loads = [v for _, v in m["history"]["rank_load"]]
            results.append(
                (name, step, tokens / step, m["final_val_loss"], sum(loads) / len(loads), sum(rank_loads) / len(rank_loads))
            )
    base = results[0][1]
    print(f"main job, {args.nproc} ranks, {args.steps} steps each (median step after the first 10)")
    print(
        "| default_moe flag | step ms | tokens/s | time / flag off | val loss at end | expert load max/mean | EP-rank load max/mean |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, step, tps, val, load, rload in results:
        print(f"| {name} | {step * 1e3:.0f} | {tps:,.0f} | {step / base:.3f} | {val:.3f} | {load:.2f} | {rload:.2f} |")


if __name__ == "__main__":
    main()
