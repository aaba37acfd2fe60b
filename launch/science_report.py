"""The science batch's numbers from its runs' metrics.json (launch/device_check.py's science part,
and launch/device_fold.py): per run the final losses, the loss with D zeroed, load max/mean per
layer, throughput and memory; per router variant the paired delta to TopK of the same seed at
every evaluation. Also the compile table. No torch import: the fold runs anywhere."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import threading
from pathlib import Path
from typing import Dict, List


class GpuMemory:
    """Samples the GPU's used memory (nvidia-smi, every 2 s) while the runs train; 0 without a GPU."""

    def __init__(self):
        self.max_mib, self._stop = 0.0, threading.Event()
        self._thread = None
        if shutil.which("nvidia-smi"):
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self):
        while not self._stop.wait(2.0):
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout
                self.max_mib = max(self.max_mib, sum(float(v) for v in out.split()))
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _load_per_layer(history: dict) -> List[float]:
    """max/mean token share over experts per layer, at the last logged step."""
    shares = history.get("expert_share") or []
    if not shares:
        return []
    _, per_layer = shares[-1]
    return [max(s) * len(s) for s in per_layer]


def collect(runs_root: Path, names: List[str], status: Dict[str, dict]) -> dict:
    """Per run and paired-by-seed numbers; a run without metrics.json keeps only its status."""
    runs = {}
    for name in names:
        variant, seed = name.rsplit("-s", 1)
        entry = {"variant": variant, "seed": int(seed), **status.get(name, {})}
        path = runs_root / name / "metrics.json"
        if path.exists():
            m = json.loads(path.read_text())
            h = m["history"]
            entry.update(
                steps=m["steps_done"],
                schedule=h.get("schedule"),
                final_val_loss=m["final_val_loss"],
                final_val_loss_without_defaults=m.get("final_val_loss_without_defaults"),
                load_max_over_mean_per_layer=_load_per_layer(h),
                median_step_s=m["median_step_s"],
                tokens_per_s=m["tokens_per_s"],
                peak_mem_bytes=m.get("peak_mem_bytes"),
                params_total=m.get("params_total"),
                params_active=m.get("params_active"),
                val=h["val"],
                train=h["train"],
            )
            # A run stopped by --max-minutes before its agreed schedule ended is not a complete
            # schedule: its final numbers are at another step and learning rate than its pair's.
            entry["schedule_steps"] = m["steps"]
            entry["cut_short"] = m["steps_done"] < m["steps"]
        runs[name] = entry
    paired = {}
    for variant in sorted({r["variant"] for r in runs.values()} - {"topk"}):
        per_seed = {}
        for r in runs.values():
            base = runs.get(f"topk-s{r['seed']}")
            if r["variant"] != variant or "val" not in r or base is None or "val" not in base:
                continue
            theirs = dict(base["val"])
            per_seed[r["seed"]] = [(step, v - theirs[step]) for step, v in r["val"] if step in theirs]
        if per_seed:
            steps = sorted(set.intersection(*(set(s for s, _ in d) for d in per_seed.values())))
            mean = [statistics.mean(dict(d)[s] for d in per_seed.values()) for s in steps]
            paired[variant] = {"steps": steps, "per_seed": per_seed, "mean": mean}
    return {"runs": runs, "paired_delta_vs_topk": paired}


def _mean_ci(values: List[float]) -> str:
    if not values:
        return "-"
    m = statistics.mean(values)
    if len(values) < 2:
        return f"{m:+.4f}"
    ci = 1.96 * statistics.stdev(values) / math.sqrt(len(values))
    return f"{m:+.4f} ± {ci:.4f}"


def _status(run: dict) -> str:
    if run.get("rc") != 0:
        return str(run.get("rc"))
    if run.get("cut_short"):
        return f"cut by --max-minutes at {run['steps']}/{run['schedule_steps']}"
    return "ok"


def table(science: dict) -> str:
    """Markdown: the configuration line, one row per run, the paired deltas at the last evaluation."""
    cfg = science.get("config", {})
    md = [
        f"Corpus: {cfg.get('corpus', '?')}; {len(cfg.get('seeds', []))} seed(s) x {cfg.get('variants', [])} side by side, "
        f"schedules sized to {cfg.get('time_budget_minutes', 0):.2f} min; GPU memory used at most "
        f"{science.get('gpu_memory_used_max_mib', 0):,.0f} MiB.",
        "",
        "| run | steps | val loss | val loss, D zeroed | load max/mean per layer | ms/step | tokens/s | peak MiB | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in science.get("runs", {}).items():
        if "final_val_loss" not in r:
            md.append(f"| {name} | - | - | - | - | - | - | - | {r.get('rc')} |")
            continue
        d0 = r.get("final_val_loss_without_defaults")
        peak = r.get("peak_mem_bytes")
        md.append(
            f"| {name} | {r['steps']} | {r['final_val_loss']:.4f} | {f'{d0:.4f}' if d0 is not None else '-'} | "
            f"{' '.join(f'{v:.2f}' for v in r['load_max_over_mean_per_layer'])} | {r['median_step_s'] * 1e3:.0f} | "
            f"{r['tokens_per_s']:,.0f} | {f'{peak / 2**20:,.0f}' if peak else '-'} | {_status(r)} |"
        )
    paired = science.get("paired_delta_vs_topk", {})
    if paired:
        md += ["", "Paired validation-loss delta to TopK of the same seed (negative: better than TopK):", ""]
        md += ["| variant | at step | per seed | mean ± 95% CI |", "|---|---|---|---|"]
        for variant, d in paired.items():
            if not d["steps"]:
                continue
            last = d["steps"][-1]
            vals = [dict(v)[last] for v in d["per_seed"].values()]
            md.append(f"| {variant} | {last} | {' '.join(f'{v:+.4f}' for v in vals)} | {_mean_ci(vals)} |")
    return "\n".join(md)


def compile_table(c: dict) -> str:
    md = [
        f"T,D,F,E,k = {c.get('size')}, EP {c.get('ep')}, {c.get('device')}, torch {c.get('torch')}.",
        "",
        "| router | graphs | breaks | recompiles after warm-up | eager ms | compiled ms | eager/compiled | break reasons |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in c.get("rows", []):
        md.append(
            f"| {r['router']} | {r['graphs']} | {r['breaks']} | {r['recompiles_after_warmup']} | {r['eager_ms']:.1f} | "
            f"{r['compiled_ms']:.1f} | {r['eager_ms'] / r['compiled_ms']:.2f} | {', '.join(r['break_reasons']) or '-'} |"
        )
    if c.get("graph_table"):
        md += ["", "| experts backend, dtype | gate | router | graphs | breaks | break reasons |", "|---|---|---|---|---|---|"]
        for r in c["graph_table"]:
            md.append(
                f"| {r['backend']}, {r['dtype']} | {r['gate']} | {r['router']} | {r['graphs']} | {r['breaks']} | "
                f"{r['break_reasons']} |"
            )
    return "\n".join(md)


def plot(science: dict, path: Path) -> None:
    """Validation loss per run (left) and the paired delta to TopK per seed (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"topk": "tab:blue", "default": "tab:orange", "default-bwd": "tab:green"}
    for name, r in science.get("runs", {}).items():
        if r.get("val"):
            a.plot(*zip(*r["val"]), "-", color=colors.get(r["variant"], "gray"), alpha=0.7, label=name)
    a.set_xlabel("step"), a.set_ylabel("validation loss"), a.grid(alpha=0.3), a.legend(fontsize=6)
    for variant, d in science.get("paired_delta_vs_topk", {}).items():
        for seed, pts in d["per_seed"].items():
            if pts:
                b.plot(*zip(*pts), color=colors.get(variant, "gray"), alpha=0.5, label=f"{variant} s{seed}")
    b.axhline(0, color="k", lw=0.8)
    b.set_xlabel("step"), b.set_ylabel("val loss - TopK (same seed)"), b.grid(alpha=0.3), b.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
