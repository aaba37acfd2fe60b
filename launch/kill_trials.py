"""Kill -9 during checkpoint saves, at random instants, and check every resume.

Two targets:
- `deepspeed`: the main job (launch/train.py, 2 processes, EP 2, a checkpoint every step) under
  torchrun --max-restarts. The folder is polled; when a save starts (a tag folder without its
  manifest) the harness waits a random 0-`--max-delay-ms` and SIGKILLs one worker, both workers
  (torchrun restarts them), or the whole job (torchrun too: relaunched with --auto-resume). After
  the job finishes, its loss history (carried through the checkpoints) must equal an uninterrupted
  run's: every resume restarted from a complete checkpoint with the state it held.
- `save`: `default_moe.checkpoint.save` called in a loop on one path by a child process, killed at
  random instants; the file must load and hold exactly one of the saved steps' weights.

    python launch/kill_trials.py --trials 20 --out results/faults/kill_trials.json

Prints a table (one row per trial: what was killed, when, whether a save was in progress, the tag
being written, what the resume took and which torn checkpoints it skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = "default_moe_manifest.json"
JOB = [
    "launch/train.py",
    "--micro-batch",
    "4",
    "--seq-len",
    "32",
    "--eval-batches",
    "1",
    "--ckpt-every",
    "1",
    "--log-every",
    "1",
    "--keep-last",
    "3",
    "--auto-resume",
]
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
    "PYTHONPATH": f"{ROOT / 'plugin'}:{os.environ.get('PYTHONPATH', '')}",
}


def _torchrun(run_dir: Path, steps: int, restarts: int):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "--max-restarts",
        str(restarts),
        *JOB,
        "--steps",
        str(steps),
        "--eval-every",
        str(steps),
        "--run-dir",
        str(run_dir),
    ]


def _newest_mtime(tag_dir: Path) -> float:
    try:
        return max([tag_dir.stat().st_mtime] + [f.stat().st_mtime for f in tag_dir.iterdir()])
    except FileNotFoundError:
        return 0.0


def _saving(ckpt: Path, since: float):
    """The tag folder being written now (no manifest, a file written after `since`), or None; a
    torn folder left by an earlier kill does not count until a save writes into it again."""
    try:
        tags = [p for p in ckpt.iterdir() if p.is_dir() and re.fullmatch(r"step\d+", p.name)]
    except FileNotFoundError:
        return None
    complete = [int(p.name[4:]) for p in tags if (p / MANIFEST).exists()]
    # A save in progress is newer than every complete checkpoint (older torn folders are leftovers,
    # touched only when retention deletes them).
    torn = [
        p for p in tags if not (p / MANIFEST).exists() and _newest_mtime(p) > since and int(p.name[4:]) > max(complete, default=0)
    ]
    return max(torn, key=lambda p: int(p.name[4:])).name if torn else None


def _committed_since(ckpt: Path, since: float) -> bool:
    return any(m.stat().st_mtime > since for m in ckpt.glob(f"step*/{MANIFEST}"))


def _workers(job: subprocess.Popen):
    try:
        return [
            p
            for p in psutil.Process(job.pid).children(recursive=True)
            if "train.py" in " ".join(p.cmdline()) and "torch.distributed.run" not in " ".join(p.cmdline())
        ]
    except psutil.NoSuchProcess:
        return []


def deepspeed_trials(n: int, steps: int, max_delay_ms: float, seed: int, workdir: Path):
    rng = random.Random(seed)
    clean = workdir / "clean"
    res = subprocess.run(_torchrun(clean, steps, 0), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"uninterrupted run failed:\n{res.stderr[-3000:]}")
    faulty = workdir / "faulty"
    ckpt = faulty / "ckpt"
    kinds = ["one worker", "all workers", "whole job"]
    trials, logs = [], []

    def start():
        return subprocess.Popen(
            _torchrun(faulty, steps, n + 1),
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    job = start()
    since = time.time()
    deadline = time.time() + 60 * 30
    try:
        while len(trials) < n and time.time() < deadline:
            kind = kinds[len(trials) % len(kinds)]
            # Wait for a save to start.
            tag = None
            while time.time() < deadline and job.poll() is None:
                tag = _saving(ckpt, since)
                if tag is not None:
                    break
                time.sleep(0.002)
            if job.poll() is not None:
                break
            time.sleep(rng.uniform(0, max_delay_ms) / 1000)
            workers = _workers(job)
            if kind == "one worker":
                victims = [rng.choice(workers)]
            elif kind == "all workers":
                victims = workers
            else:
                victims = None
            if victims is None:  # torchrun and its workers (in their own sessions, so not by process group)
                everyone = [psutil.Process(job.pid)] + psutil.Process(job.pid).children(recursive=True)
                for p in everyone:
                    try:
                        p.send_signal(signal.SIGKILL)
                    except psutil.NoSuchProcess:
                        pass
            else:
                for w in victims:
                    try:
                        os.kill(w.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            time.sleep(0.05)
            # After a kill no manifest can appear for the tag (its commit needs every rank).
            mid_save = not (ckpt / tag / MANIFEST).exists()
            since = time.time()
            complete = sorted((p.name for p in ckpt.glob("step*") if (p / MANIFEST).exists()), key=lambda t: int(t[4:]))
            trials.append(
                {
                    "trial": len(trials) + 1,
                    "killed": kind,
                    "while_saving": tag,
                    "mid_save": mid_save,
                    "newest_complete_at_kill": complete[-1] if complete else None,
                }
            )
            if victims is None:
                out, _ = job.communicate(timeout=60)
                logs.append(out)
                job = start()
            # Wait until the restarted job has resumed and committed a checkpoint before the next kill.
            while time.time() - since < 180 and job.poll() is None and not _committed_since(ckpt, since):
                time.sleep(0.05)
            since = time.time()
        out, _ = job.communicate(timeout=900)
        logs.append(out)
    finally:
        if job.poll() is None:
            for p in [psutil.Process(job.pid)] + psutil.Process(job.pid).children(recursive=True):
                p.kill()
    text = "".join(logs)
    # One "[train] model:" line per start of the workers: the first, then one per trial (a resume
    # names its step; a start with no complete checkpoint yet begins at 0).
    starts = [int(m.group(1) or 0) for m in re.finditer(r"\[train\] model:[^\n]*?(?:resumed at step (\d+))?\n", text)]
    resumed = starts[1:]
    skipped = re.findall(r"skipped (.*?); resuming from the newest complete checkpoint '(step\d+)'", text)
    ok = job.returncode == 0
    a = json.loads((faulty / "metrics.json").read_text())["history"] if ok else None
    b = json.loads((clean / "metrics.json").read_text())["history"]
    equal = ok and a["train"] == b["train"] and a["val"] == b["val"]
    for t, step in zip(trials, resumed):
        t["resumed_at_step"] = step
        newest = t["newest_complete_at_kill"]
        t["resumed_from_newest_complete"] = step == (int(newest[4:]) if newest else 0)
    return {
        "trials": trials,
        "job_rc": job.returncode,
        "starts": starts,
        "resumes": resumed,
        "every_resume_took_the_newest_complete": len(resumed) == len(trials)
        and all(t["resumed_from_newest_complete"] for t in trials),
        "fallbacks": [{"skipped": s, "took": took} for s, took in skipped],
        "losses_equal_uninterrupted": equal,
        "log_tail": text[-3000:] if not equal else "",
    }


SAVE_CHILD = r"""
import sys, torch
sys.path.insert(0, sys.argv[3])
from default_moe import MoEConfig, MoELayer, checkpoint
torch.manual_seed(0)
layer = MoELayer(MoEConfig(hidden_size=128, ffn_hidden_size=256, num_experts=8, top_k=2))
path = sys.argv[1]
for step in range(int(sys.argv[2])):
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(float(step))
    checkpoint.save(layer, path, extra={"step": step})
    print(step, flush=True)
"""


def save_trials(n: int, max_delay_ms: float, seed: int, workdir: Path):
    sys.path.insert(0, str(ROOT / "plugin"))
    from default_moe import checkpoint

    rng = random.Random(seed)
    trials = []
    path = workdir / "ckpt.pt"
    script = workdir / "save_child.py"
    script.write_text(SAVE_CHILD)
    for i in range(n):
        child = subprocess.Popen(
            [sys.executable, str(script), str(path), "1000000", str(ROOT / "plugin")], env=ENV, stdout=subprocess.PIPE, text=True
        )
        first = child.stdout.readline()  # one save done: the next ones overwrite a complete file
        if not first:
            raise RuntimeError("the saving child failed before its first save")
        time.sleep(rng.uniform(0, max_delay_ms) / 1000)
        tmp_present = any(p.name.startswith("ckpt.pt.tmp") for p in workdir.iterdir())
        child.kill()
        child.wait()
        payload = checkpoint.read(str(path))
        step = payload["extra"]["step"]
        values = {
            float(t.flatten()[0]) for k, t in payload["model"].items() if t.is_floating_point() and not k.endswith("defaults_ED")
        }
        whole = values == {float(step)} and all(
            bool((t == step).all())
            for k, t in payload["model"].items()
            if t.is_floating_point() and not k.endswith("defaults_ED")
        )
        leftovers = [p.name for p in workdir.iterdir() if ".tmp" in p.name]
        for p in leftovers:  # a killed save leaves its temporary file: harmless, never read
            (workdir / p).unlink()
        trials.append(
            {
                "trial": i + 1,
                "mid_save": tmp_present,
                "loaded_step": step,
                "weights_match_step": whole,
                "temporary_left": bool(leftovers),
            }
        )
    return {"trials": trials, "all_resumable": all(t["weights_match_step"] for t in trials)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=12, help="kills of the DeepSpeed main job")
    ap.add_argument("--save-trials", type=int, default=10, help="kills of checkpoint.save")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--max-delay-ms", type=float, default=250.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON with every trial")
    args = ap.parse_args(argv)
    result = {}
    with tempfile.TemporaryDirectory(prefix="kill_trials") as tmp:
        tmp = Path(tmp)
        if args.save_trials:
            (tmp / "save").mkdir()
            result["save"] = save_trials(args.save_trials, 300.0, args.seed, tmp / "save")
        if args.trials:
            result["deepspeed"] = deepspeed_trials(args.trials, args.steps, args.max_delay_ms, args.seed, tmp)
    if "save" in result:
        print("| checkpoint.save trial | mid-save | loaded step | weights == that step |")
        print("|---|---|---|---|")
        for t in result["save"]["trials"]:
            print(f"| {t['trial']} | {t['mid_save']} | {t['loaded_step']} | {t['weights_match_step']} |")
    if "deepspeed" in result:
        ds = result["deepspeed"]
        print("| main-job trial | killed | saving | mid-save | newest complete at kill | resumed at step |")
        print("|---|---|---|---|---|---|")
        for t in ds["trials"]:
            print(
                f"| {t['trial']} | {t['killed']} | {t['while_saving']} | {t['mid_save']} | "
                f"{t['newest_complete_at_kill']} | {t.get('resumed_at_step')} |"
            )
        for f in ds["fallbacks"]:
            print(f"fallback: skipped {f['skipped']} -> took {f['took']}")
        print(
            f"job rc {ds['job_rc']}; starts {len(ds['starts'])} (1 + one per trial: no spurious restart when "
            f"{len(ds['starts']) == len(ds['trials']) + 1}); every resume took the newest complete checkpoint: "
            f"{ds['every_resume_took_the_newest_complete']}; losses after every resume == uninterrupted run: "
            f"{ds['losses_equal_uninterrupted']}"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    ds = result.get("deepspeed", {})
    ok = (
        result.get("save", {}).get("all_resumable", True)
        and ds.get("losses_equal_uninterrupted", True)
        and ds.get("every_resume_took_the_newest_complete", True)
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
