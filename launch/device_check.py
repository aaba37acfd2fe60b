"""The prepared GPU check: one script, one run, everything it measures written under --out.

    bash launch/device_check.sh --out OUT             # on a GPU machine (wheels from .whl/ if present)
    python launch/device_check.py --out OUT --dry-run # on CPU, tiny sizes (tested in CI)

Steps (each one's output is a file in OUT, their logs in device_check.log; a failing step is
recorded and the next one runs):
  (a)              the layer tests that take a device, on cuda: dense-reference equality in fp32
                   (Default/TopK, loop and grouped_mm) and bf16, plus the GPU stand-in checks;
  (b) bench.md     the layer benchmark in bf16: ours loop vs grouped_mm vs megatron-core (where
      bench.json   importable), E=8/64, D=2048/4096, Default/TopK ratio, host syncs, saved-for-
                   backward bytes, peak memory;
  (d) compile.md   torch.compile of the layer on cuda (launch/bench_compile.py): graphs, breaks,
                   recompiles over steps with different routing, compiled vs eager, op counts;
  (c) science.json the main job's GPT at d=512, 8 layers, 32 experts top-2, TopK then Default,
      science.png  ~3 minutes each (`--max-minutes`) on the shipped corpus: loss curves;
  env.json, summary.md: the machine, torch, what ran and what failed.

Budget: under 8 minutes on one H200 (`--science-minutes` scales part c).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GPU_SIZES = "8192:2048:1408:8:2,8192:4096:2048:8:2,8192:2048:1408:64:6,8192:4096:1024:64:6"
DRY_SIZES = "256:32:64:8:2"


def _run(cmd, log: Path, timeout: float, env=None) -> dict:
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        try:
            rc = subprocess.run(
                cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, env={**os.environ, **(env or {})}
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.perf_counter() - t0, 1)}


def step_tests(out: Path, device: str, dry: bool) -> dict:
    select = "dense_reference or grouped_mm or host_sync or weight_copy or moves or bit"
    if dry:
        select = "bf16_matches_dense_reference and default"
    return _run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_layer.py",
            "tests/test_gpu_standins.py",
            "--device",
            device,
            "-k",
            select,
        ],
        out / "device_check.log",
        240,
    )


def step_bench(out: Path, dry: bool) -> dict:
    cmd = [sys.executable, "launch/bench_engines.py", "--json", str(out / "bench.json")]
    if dry:
        cmd += ["--sizes", DRY_SIZES, "--rounds", "1", "--iters", "1", "--impls", "ours topk,ours default,ours topk grouped_mm"]
    else:
        cmd += [
            "--sizes",
            GPU_SIZES,
            "--rounds",
            "5",
            "--iters",
            "3",
            "--dtype",
            "bfloat16",
            "--impls",
            "ours topk,ours default,ours topk grouped_mm,megatron-core",
        ]
    res = _run(cmd, out / "device_check.log", 200)
    if (out / "bench.json").exists():
        sys.path.insert(0, str(ROOT / "launch"))
        from bench_engines import table

        rows = json.loads((out / "bench.json").read_text())["rows"]
        (out / "bench.md").write_text(table(rows) + "\n")
    return res


def step_compile(out: Path, dry: bool) -> dict:
    cmd = [sys.executable, "launch/bench_compile.py", "--device", "cpu" if dry else "cuda"]
    cmd += (
        ["--steps", "4", "--warmup", "2", "--size", "256,32,64,4,2", "--ops-size", "256,32,64,4,2"]
        if dry
        else ["--steps", "20", "--size", "16384,2048,4096,8,2", "--ops-size", "16384,2048,4096,8,2"]
    )
    log = out / "compile.md"
    return _run(cmd, log, 200)


def step_science(out: Path, runs_root: Path, minutes: float, dry: bool) -> dict:
    runs = {}
    results = {}
    for router in ("topk", "default"):
        run_dir = runs_root / f"science_{router}"  # checkpoints stay off OUT (8 files come back)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "1",
            "launch/train.py",
            "--router",
            router,
            "--ep-size",
            "1",
            "--run-dir",
            str(run_dir),
        ]
        if dry:
            cmd += [
                "--steps",
                "4",
                "--micro-batch",
                "2",
                "--seq-len",
                "32",
                "--eval-every",
                "2",
                "--eval-batches",
                "1",
                "--ckpt-every",
                "100",
                "--log-every",
                "1",
            ]
        else:
            cmd += ["--config", "configs/gpt_gpu.json", "--max-minutes", str(minutes)]
        runs[router] = _run(cmd, out / "device_check.log", 60 * minutes + 120 if not dry else 300)
        metrics = run_dir / "metrics.json"
        if metrics.exists():
            m = json.loads(metrics.read_text())
            results[router] = {
                "train": m["history"]["train"],
                "val": m["history"]["val"],
                "final_val_loss": m.get("final_val_loss"),
                "median_step_s": m.get("median_step_s"),
                "tokens_per_s": m.get("tokens_per_s"),
                "steps_done": m["history"]["train"][-1][0],
            }
    (out / "science.json").write_text(json.dumps(results, indent=1))
    if results:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for router, r in results.items():
            ax.plot(*zip(*r["train"]), label=f"{router} train", alpha=0.6)
            ax.plot(*zip(*r["val"]), "o-", label=f"{router} val")
        ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend(), ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "science.png", dpi=90)
        plt.close(fig)
    return {"runs": runs, "final_val_loss": {k: v["final_val_loss"] for k, v in results.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (flat: at most 8 files come back from a device run)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks that every step runs")
    ap.add_argument("--science-minutes", type=float, default=1.5, help="wall minutes per router in step (c)")
    ap.add_argument("--runs-root", default="/tmp/default_moe_device_runs", help="run folders of step (c)")
    ap.add_argument(
        "--steps", default="tests,bench,compile,science", help="comma-separated subset of tests,bench,compile,science"
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --dry-run on CPU")
    device = "cpu" if args.dry_run else "cuda"
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "grouped_mm": hasattr(torch, "_grouped_mm"),
        "dry_run": args.dry_run,
    }
    (out / "env.json").write_text(json.dumps(env, indent=1))
    summary = {"env": env}
    steps = [s.strip() for s in args.steps.split(",")]
    t0 = time.perf_counter()
    if "tests" in steps:
        summary["tests"] = step_tests(out, device, args.dry_run)
    if "bench" in steps:
        summary["bench"] = step_bench(out, args.dry_run)
    if "compile" in steps:
        summary["compile"] = step_compile(out, args.dry_run)
    if "science" in steps:
        summary["science"] = step_science(out, Path(args.runs_root), args.science_minutes, args.dry_run)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "summary.md").write_text("# Device check\n\n```json\n" + json.dumps(summary, indent=1) + "\n```\n")
    print(json.dumps(summary, indent=1))
    failed = [k for k in ("tests", "bench", "compile") if k in summary and summary[k]["rc"] != 0]
    failed += [f"science {r}" for r, v in summary.get("science", {}).get("runs", {}).items() if v["rc"] != 0]
    if failed:
        print(f"[device_check] failed steps: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
