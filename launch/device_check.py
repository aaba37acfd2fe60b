"""The prepared GPU check: one run that gets every result out, each written the moment its part
ends. Every part runs in its own process with its own time limit; a part that crashes or runs
out of time is recorded (exit code, the last lines of its log) and the next part runs.

    bash launch/device_check.sh --out OUT               # on a GPU machine (wheels from .whl/, corpus from .science/)
    python launch/device_check.py --out OUT --dry-run   # on CPU, tiny sizes (tested in CI, with a planted crash)

Parts, in order of value (`--parts` picks a subset):
  tests           the layer tests that take a device, on cuda: fp32 and bf16 dense-reference
                  equality (Default/TopK, loop and grouped_mm), host syncs, device moves;
  bench-ours      our rows in one process, interleaved (same-run Default/TopK ratios): TopK,
                  Default (D in the forward), Default-bwd (`default_in_forward=false`), loop and
                  grouped_mm; bf16, 4 sizes;
  bench-megatron-core, bench-torchtitan, bench-deepspeed
                  each anchor in its own process, with `ours topk grouped_mm` as its same-run
                  baseline; TFLOP/s of the experts' GEMMs and the fraction of the bf16 peak;
  compile         torch.compile of the layer (launch/bench_compile.py): graphs, breaks per
                  backend and gate, recompiles over steps with other routing, compiled vs eager;
  science         3 seeds x {TopK, Default, Default-bwd} of the main job's GPU config side by side
                  on the one GPU, on the science corpus (launch/build_science_corpus.py), each a
                  complete schedule sized to the time left (`--time-budget-minutes`, all runs
                  agreeing on one step count): paired deltas per seed at every evaluation, load
                  max/mean per layer, loss with D zeroed, memory and throughput per run.

Files in OUT (flat; at most 8 come back from a device run), rewritten after every part:
  summary.json    the machine and every part's status (rc, seconds, the tail of its log if it failed)
  report.md       every table so far (what `launch/device_fold.py` folds into results/gpu/)
  bench.json, compile.json, science.json, science.png, device_check.log

Budget: `--budget-minutes` (default 9) for all parts; each part before science stops at its own
limit or where science would have less than `--science-min-minutes` left.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
from sweep import free_port  # noqa: E402

GPU_SIZES = "8192:2048:1408:8:2,8192:4096:2048:8:2,8192:2048:1408:64:6,8192:4096:1024:64:6"
DRY_SIZES = "256:32:64:8:2"
H200_BF16_PEAK_TFLOPS = 790.0  # dense bf16 GEMM, measured on this kind of machine (device notes)
OURS_IMPLS = "ours topk,ours default,ours default-bwd,ours topk grouped_mm,ours default grouped_mm,ours default-bwd grouped_mm"
ANCHORS = ("megatron-core", "torchtitan", "deepspeed")
PARTS = ("tests", "bench-ours", *(f"bench-{a}" for a in ANCHORS), "compile", "science")
# Seconds per part (a ceiling: most end sooner); dry-run limits are for 2 CPU cores.
LIMITS = {
    "tests": 90,
    "bench-ours": 150,
    "bench-megatron-core": 75,
    "bench-torchtitan": 75,
    "bench-deepspeed": 75,
    "compile": 150,
}
DRY_LIMITS = {
    "tests": 120,
    "bench-ours": 120,
    "bench-megatron-core": 120,
    "bench-torchtitan": 120,
    "bench-deepspeed": 120,
    "compile": 240,
}
VARIANTS = {
    "topk": ["--router", "topk"],
    "default": ["--router", "default", "--default-in-forward", "true"],
    "default-bwd": ["--router", "default", "--default-in-forward", "false"],
}


class Check:
    """The run's state: where files go, the clock, and what each part did."""

    def __init__(self, args):
        self.args, self.out, self.dry = args, Path(args.out), args.dry_run
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.perf_counter()
        self.budget_s = 60.0 * args.budget_minutes
        self.log = self.out / "device_check.log"
        self.summary = {"env": environment(self.dry), "parts": {}, "budget_minutes": args.budget_minutes}
        self.bench_rows, self.bench_meta = [], {}

    def left_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def limit_for(self, part: str) -> float:
        """The part's own limit, cut so that science keeps its minimum."""
        own = (DRY_LIMITS if self.dry else LIMITS)[part]
        keep = 60.0 * self.args.science_min_minutes if "science" in self.args.parts else 0.0
        return max(0.0, min(own, self.left_s() - keep))

    def run(self, part: str, cmd: list, timeout: float, env: dict = None) -> dict:
        """Runs one part's process; its output goes to the log; a failure keeps the log's tail."""
        t = time.perf_counter()
        start = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "a") as fh:
            fh.write(f"\n===== {part}: $ {' '.join(cmd)}\n")
            fh.flush()
            if timeout < 5:
                rc = "skipped: no time left"
            else:
                try:
                    rc = subprocess.run(
                        cmd,
                        cwd=ROOT,
                        stdout=fh,
                        stderr=subprocess.STDOUT,
                        timeout=timeout,
                        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                    ).returncode
                except subprocess.TimeoutExpired:
                    rc = f"timeout after {timeout:.0f} s"
        res = {"rc": rc, "seconds": round(time.perf_counter() - t, 1), "limit_s": round(timeout)}
        if rc != 0:
            with open(self.log, "rb") as fh:
                fh.seek(start)
                res["tail"] = fh.read().decode(errors="replace").splitlines()[-25:]
        return res

    def record(self, part: str, res: dict) -> None:
        self.summary["parts"][part] = res
        self.summary["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        write_json(self.out / "summary.json", self.summary)
        (self.out / "report.md").write_text(render_report(self.out))
        status = "ok" if res.get("rc") == 0 else f"FAILED ({res.get('rc')})"
        print(f"[device_check] {part}: {status} in {res.get('seconds')} s; {self.left_s():.0f} s of the budget left", flush=True)


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def environment(dry: bool) -> dict:
    import torch

    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "grouped_mm": hasattr(torch, "_grouped_mm"),
        "dry_run": dry,
        "date": time.strftime("%Y-%m-%d"),
    }
    for pkg in ("deepspeed", "megatron.core", "torchtitan", "transformer_engine"):
        try:
            mod = __import__(pkg, fromlist=["__version__"])
            env[pkg] = getattr(mod, "__version__", "present")
        except Exception as e:  # an anchor that cannot import is recorded, not fatal
            env[pkg] = f"not importable ({type(e).__name__})"
    return env


# ---- the parts ----


def part_tests(check: Check) -> dict:
    select = "dense_reference or grouped_mm or host_sync or weight_copy or moves or bit"
    if check.dry:
        select = "bf16_matches_dense_reference and default"
    xml = Path("/tmp") / f"device_check_tests_{os.getpid()}.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    cmd += ["tests/test_layer.py", "tests/test_gpu_standins.py", "--device", "cpu" if check.dry else "cuda", "-k", select]
    res = check.run("tests", cmd, check.limit_for("tests"))
    if xml.exists():
        import xml.etree.ElementTree as ET

        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        res["counts"] = {**n, "passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"]}
        xml.unlink()
    return res


def _bench(check: Check, part: str, impls: str) -> dict:
    tmp = Path("/tmp") / f"device_check_{part}_{os.getpid()}.json"
    cmd = [sys.executable, "launch/bench_engines.py", "--json", str(tmp), "--impls", impls]
    if check.dry:
        cmd += ["--sizes", DRY_SIZES, "--rounds", "1", "--iters", "1"]
    else:
        cmd += ["--sizes", GPU_SIZES, "--rounds", "5", "--iters", "3", "--dtype", "bfloat16"]
        cmd += ["--peak-tflops", str(check.args.peak_tflops)]
    env = {"MASTER_PORT": str(free_port())}
    res = check.run(part, cmd, check.limit_for(part), env)
    if tmp.exists():
        data = json.loads(tmp.read_text())
        for r in data["rows"]:
            r["part"] = part
        check.bench_rows += data["rows"]
        check.bench_meta = {"device": data["device"], "rounds": data["args"]["rounds"], "iters": data["args"]["iters"]}
        write_json(check.out / "bench.json", {**check.bench_meta, "rows": check.bench_rows})
        res["rows"] = len(data["rows"])
        tmp.unlink()
    return res


def part_compile(check: Check) -> dict:
    tmp = Path("/tmp") / f"device_check_compile_{os.getpid()}.json"
    cmd = [sys.executable, "launch/bench_compile.py", "--json", str(tmp), "--device", "cpu" if check.dry else "cuda"]
    if check.dry:
        cmd += ["--steps", "4", "--warmup", "2", "--size", "256,32,64,4,2", "--ops-size", "256,32,64,4,2"]
    else:
        cmd += ["--steps", "20", "--size", "16384,2048,4096,8,2", "--ops-size", "16384,2048,4096,8,2"]
    res = check.run("compile", cmd, check.limit_for("compile"))
    if tmp.exists():
        shutil.move(str(tmp), check.out / "compile.json")
    return res


def science_corpus(check: Check) -> tuple:
    """(data argument, description): the science corpus decompressed to /tmp, or the shipped one
    (the dry run, or when .science/ did not travel)."""
    src = ROOT / ".science" / "tokens.bin.xz"
    if check.dry or not src.exists():
        why = "dry run" if check.dry else "science corpus missing: run launch/build_science_corpus.py and carry .science"
        return "shipped", f"shipped Python docs ({why})"
    dst = Path("/tmp/default_moe_science_tokens.bin")
    if not dst.exists():
        with lzma.open(src, "rb") as f, open(dst, "wb") as g:
            shutil.copyfileobj(f, g, 1 << 24)
    meta = json.loads((ROOT / ".science" / "sources.json").read_text())
    return str(dst), f"{meta['tokens'] / 1e6:.1f}M tokens from {', '.join(s['package'] for s in meta['sources'])}"


def part_science(check: Check) -> dict:
    import science_report

    total_s = check.left_s() - 10
    seeds = [1234 + i for i in range(check.args.science_seeds)]
    data, corpus = science_corpus(check)
    # Start-up (imports, tokens, model, engine) and the final evaluations come out of the time;
    # the runs' schedules are sized to the rest and agreed between them.
    startup_s = 25 if check.dry else 75
    budget_min = max(0.1, (total_s - startup_s - 30) / 60)
    runs_root = Path(check.args.runs_root)
    shutil.rmtree(runs_root, ignore_errors=True)
    sync = runs_root / "schedule_sync"
    procs, logs = {}, {}
    for seed in seeds:
        for variant, flags in VARIANTS.items():
            name = f"{variant}-s{seed}"
            cmd = [sys.executable, "launch/train.py", *flags, "--ep-size", "1", "--run-dir", str(runs_root / name)]
            cmd += ["--seed", str(seed), "--data", data, "--save-final", "false", "--keep-last", "0"]
            # --max-minutes is only the safety net (a run it cuts fails the part): 30 s or 15% of slack.
            cmd += [
                "--time-budget-minutes",
                f"{budget_min:.3f}",
                "--max-minutes",
                f"{max(budget_min * 1.15, budget_min + 0.5):.3f}",
            ]
            cmd += ["--schedule-sync", str(sync), "--schedule-sync-runs", str(len(seeds) * len(VARIANTS))]
            if check.dry:
                cmd += ["--steps", "1000", "--micro-batch", "2", "--seq-len", "32", "--warmup-steps", "10"]
                cmd += ["--eval-every", "5", "--eval-batches", "1", "--ckpt-every", "100000", "--log-every", "5"]
            else:
                cmd += ["--config", "configs/gpt_gpu.json", "--steps", "100000", "--warmup-steps", "40"]
                cmd += ["--eval-every", "25", "--eval-batches", "4", "--log-every", "5"]
            env = {
                **os.environ,
                "PYTHONUNBUFFERED": "1",
                "OMP_NUM_THREADS": "1",
                "RANK": "0",
                "LOCAL_RANK": "0",
                "WORLD_SIZE": "1",
                "LOCAL_WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(free_port()),
            }
            logs[name] = runs_root / f"{name}.log"
            logs[name].parent.mkdir(parents=True, exist_ok=True)
            procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(logs[name], "w"), stderr=subprocess.STDOUT)
    t = time.perf_counter()
    mem = science_report.GpuMemory()
    runs = {}
    for name, p in procs.items():
        try:
            rc = p.wait(timeout=max(1.0, total_s - (time.perf_counter() - t)))
        except subprocess.TimeoutExpired:
            p.kill()
            rc = f"timeout after {total_s:.0f} s"
        runs[name] = {"rc": rc}
        if rc != 0:
            runs[name]["tail"] = logs[name].read_text(errors="replace").splitlines()[-15:]
    mem.stop()
    with open(check.log, "a") as fh:  # every run's log, in the one log that comes back
        for name, path in logs.items():
            fh.write(f"\n===== science {name}\n" + path.read_text(errors="replace")[-4000:])
    result = science_report.collect(runs_root, list(procs), runs)
    result["config"] = {"seeds": seeds, "variants": list(VARIANTS), "corpus": corpus, "time_budget_minutes": budget_min}
    result["gpu_memory_used_max_mib"] = mem.max_mib
    write_json(check.out / "science.json", result)
    science_report.plot(result, check.out / "science.png")
    failed = [n for n, r in runs.items() if r["rc"] != 0]
    cut = [n for n, r in result["runs"].items() if r.get("cut_short")]
    problems = [f"{len(failed)} of {len(runs)} runs failed"] if failed else []
    if cut:  # a run stopped before its schedule ended is no pair for the others
        problems.append(f"{len(cut)} of {len(runs)} runs cut short by --max-minutes")
    return {"rc": "; ".join(problems) or 0, "seconds": round(time.perf_counter() - t, 1)}


# ---- the report ----


def render_report(out: Path) -> str:
    """Every table from the JSON files in `out` (also what device_fold.py renders)."""
    import science_report
    from bench_engines import table

    md = ["# Device check", ""]
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    env = summary.get("env", {})
    md += [
        f"Machine: {env.get('device', '?')}, torch {env.get('torch', '?')}, CUDA {env.get('cuda', '-')}, "
        f"Python {env.get('python', '?')}; DeepSpeed {env.get('deepspeed', '-')}, megatron-core "
        f"{env.get('megatron.core', '-')}, torchtitan {env.get('torchtitan', '-')}, Transformer Engine "
        f"{env.get('transformer_engine', '-')}{' (DRY RUN on CPU: not a GPU result)' if env.get('dry_run') else ''}.",
        "",
        "| part | result | seconds | limit s | note |",
        "|---|---|---|---|---|",
    ]
    for part, r in summary.get("parts", {}).items():
        note = ""
        if "counts" in r:
            c = r["counts"]
            note = f"{c['passed']} passed, {c['failures'] + c['errors']} failed, {c['skipped']} skipped"
        elif "rows" in r:
            note = f"{r['rows']} rows"
        if r.get("rc") != 0 and r.get("tail"):
            note += (" " if note else "") + "last line: `" + r["tail"][-1].replace("|", "/")[:160] + "`"
        md.append(
            f"| {part} | {'ok' if r.get('rc') == 0 else r.get('rc')} | {r.get('seconds')} | {r.get('limit_s', '-')} | {note} |"
        )
    if (out / "bench.json").exists():
        bench = json.loads((out / "bench.json").read_text())
        md += [
            "",
            "## Layer benchmark",
            "",
            f"{bench.get('device', '')}; median of {bench.get('rounds')} interleaved rounds.",
            "",
        ]
        md += [table(bench["rows"])]
    if (out / "compile.json").exists():
        md += ["", "## torch.compile", "", science_report.compile_table(json.loads((out / "compile.json").read_text()))]
    if (out / "science.json").exists():
        md += ["", "## Science batch", "", science_report.table(json.loads((out / "science.json").read_text()))]
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (flat: at most 8 files come back from a device run)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks that every part runs")
    ap.add_argument("--budget-minutes", type=float, default=9.0, help="wall minutes for all parts together")
    ap.add_argument("--science-min-minutes", type=float, default=3.5, help="what the parts before science leave it")
    ap.add_argument("--science-seeds", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=H200_BF16_PEAK_TFLOPS, help="the GPU's dense bf16 peak")
    ap.add_argument("--runs-root", default="/tmp/default_moe_device_runs", help="run folders of the science part")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {list(PARTS)}")
    ap.add_argument("--plant-crash", default="", help=argparse.SUPPRESS)  # the dry run's planted failure (an impl name)
    args = ap.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = sorted(set(args.parts) - set(PARTS))
    if bad:
        ap.error(f"--parts: unknown {bad}; allowed: {list(PARTS)}")
    if args.science_seeds < 1:
        ap.error(f"--science-seeds must be >= 1, got {args.science_seeds}")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --dry-run on CPU")
    if args.plant_crash:
        os.environ["DEFAULT_MOE_PLANT_CRASH"] = args.plant_crash
    check = Check(args)
    write_json(check.out / "summary.json", check.summary)
    for part in args.parts:
        try:
            if part == "tests":
                res = part_tests(check)
            elif part == "bench-ours":
                res = _bench(check, part, OURS_IMPLS)
            elif part.startswith("bench-"):
                anchor = part[len("bench-") :]
                impls = "deepspeed cf1.25,deepspeed dropless" if anchor == "deepspeed" else anchor
                res = _bench(check, part, f"ours topk grouped_mm,{impls}")
            elif part == "compile":
                res = part_compile(check)
            else:
                res = part_science(check)
        except Exception as e:  # the orchestrator itself must survive any one part
            import traceback

            res = {"rc": f"orchestrator error: {type(e).__name__}: {e}", "tail": traceback.format_exc().splitlines()[-10:]}
        check.record(part, res)
    failed = [p for p, r in check.summary["parts"].items() if r.get("rc") != 0]
    print(f"[device_check] done in {time.perf_counter() - check.t0:.0f} s; failed parts: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
