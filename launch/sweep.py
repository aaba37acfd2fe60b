"""Reproduction sweep: the same tiny GPT-MoE trained with each router, several seeds and configs.

    python launch/sweep.py --config configs/sweep_quick.json        # (launch/sweep.sh sets up .venv)

Each run is `launch/train.py` as a single process (world 1, EP 1) with one thread; `parallel`
runs go side by side (2 on 2 cores). A run whose metrics.json exists is skipped; an interrupted
one resumes from its last checkpoint (--auto-resume). Paired runs share the seed, so they share
initial weights (all but the router) and data order; the paired difference Default - TopK is
reported at every evaluation. Writes to the config's `out_dir`: results.json, results.md and
plots (val_loss.png, delta.png, fidelity.png, load.png).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plan(cfg: dict) -> List[dict]:
    """Every (group, router, seed) run with its train.py arguments."""
    runs = []
    base_flags = [f"--{k.replace('_', '-')}={v}" for k, v in cfg.get("run", {}).items()]
    for group in cfg["groups"]:
        # "router_seeds": {"default@beta0.5": [1]} runs a variant on fewer seeds; those runs come
        # after the group's full-seed runs, so a stopped sweep has the full-seed pairs first.
        router_seeds = group.get("router_seeds", {})
        unknown = sorted(set(router_seeds) - set(group["routers"]))
        if unknown:
            raise SystemExit(f"group {group['name']}: router_seeds names router(s) not in routers: {unknown}")
        order = [(seed, r) for seed in group.get("seeds", cfg["seeds"]) for r in group["routers"] if r not in router_seeds]
        order += [(seed, r) for r in group["routers"] if r in router_seeds for seed in router_seeds[r]]
        for seed, router in order:
            # "default@bf16" = router "default" with the group's variant "bf16" of run flags.
            kind, _, variant = router.partition("@")
            flags = list(base_flags)
            for k, v in {**group.get("model", {}), **group.get("run", {})}.items():
                flags.append(f"--{k.replace('_', '-')}={v}")
            if variant and variant not in group.get("variants", {}):
                raise SystemExit(f"group {group['name']}: router {router!r} names an unknown variant {variant!r}")
            extra = group.get("variants", {}).get(variant, {}) if variant else {}
            flags += [f"--{k.replace('_', '-')}={v}" for k, v in extra.items()]
            run_dir = Path(cfg["runs_dir"]) / group["name"] / f"{router.replace('@', '-')}_s{seed}"
            runs.append(
                {
                    "group": group["name"],
                    "router": router,
                    "seed": seed,
                    "run_dir": str(run_dir),
                    "args": [
                        "--config",
                        cfg["base_config"],
                        "--router",
                        kind,
                        "--seed",
                        str(seed),
                        "--ep-size",
                        "1",
                        "--run-dir",
                        str(run_dir),
                        "--auto-resume",
                        *flags,
                    ],
                }
            )
    return runs


def run_one(run: dict, threads: int) -> dict:
    run_dir = Path(run["run_dir"])
    if (run_dir / "metrics.json").exists():
        return {**run, "status": "skipped (done)"}
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    t0 = time.time()
    with open(run_dir / "train.log", "a") as log:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "launch" / "train.py"), *run["args"]],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {run_dir / 'train.log'})"
    return {**run, "status": status, "wall_s": time.time() - t0}


def _mean_ci(values: List[float]) -> tuple:
    """Mean and a 95% t-interval half-width over seeds (nan with one seed)."""
    t95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 8: 2.36, 10: 2.26}
    n = len(values)
    if n < 2:
        return (values[0] if values else math.nan), math.nan
    return statistics.mean(values), t95.get(n, 2.0) * statistics.stdev(values) / math.sqrt(n)


def summarise(cfg: dict, runs: List[dict], out_dir: Path) -> dict:
    """results.json / results.md / plots from every finished run's metrics.json."""
    results: Dict[str, dict] = {}
    for run in runs:
        path = Path(run["run_dir"]) / "metrics.json"
        if not path.exists():
            continue
        m = json.loads(path.read_text())
        g = results.setdefault(run["group"], {})
        g.setdefault(run["router"], {})[run["seed"]] = {
            "val": m["history"]["val"],
            "final_val": m["final_val_loss"],
            "tokens_per_step": m["tokens_per_step"],
            "val_without_defaults": m.get("final_val_loss_without_defaults"),
            "fidelity": {k: v for k, v in m["history"].get("diagnostics", [[0, {}]])[-1][1].items() if k.startswith("fidelity")},
            "load": m["history"]["load"],
            "expert_share": m.get("expert_share_per_layer"),
            "default_norm": m.get("default_norm_per_layer"),
            "median_step_s": m["median_step_s"],
            "expert_share_history": m["history"].get("expert_share"),
            "share_history": [
                (st, {k: v for k, v in d.items() if k.startswith(("default_share", "idle_share"))})
                for st, d in m["history"].get("diagnostics", [])
            ],
        }
    summary: Dict[str, dict] = {}
    lines = [
        f"# Router sweep: {cfg.get('title', '')}",
        "",
        f"Command: `{cfg.get('command', 'bash launch/sweep.sh --config ' + cfg['_path'])}`",
        "",
        cfg.get("description", ""),
        "",
    ]
    for gname, routers in results.items():
        group_cfg = next(g for g in cfg["groups"] if g["name"] == gname)
        topk = routers.get("topk", {})
        topk_final = statistics.mean(r["final_val"] for r in topk.values()) if topk else math.nan
        gs = summary.setdefault(gname, {"routers": {}, "paired_delta_vs_topk": {}})
        lines += [
            f"## {gname}: {group_cfg.get('label', '')}",
            "",
            "| router | seeds | final val loss (mean ± 95% CI) | Δ vs TopK paired (mean ± CI) | "
            "reaches TopK's final loss at | val loss, D zeroed | fidelity (last eval, per layer) | max/mean load | step s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for rname, seeds in routers.items():
            finals = [s["final_val"] for s in seeds.values()]
            mean, ci = _mean_ci(finals)
            paired = [seeds[s]["final_val"] - topk[s]["final_val"] for s in seeds if s in topk]
            dmean, dci = _mean_ci(paired) if rname != "topk" and paired else (math.nan, math.nan)
            # First evaluation where the seed-mean curve is at or below TopK's mean final loss.
            steps = [v[0] for v in next(iter(seeds.values()))["val"]]
            curve = [statistics.mean(s["val"][i][1] for s in seeds.values()) for i in range(len(steps))]
            reach = next((st for st, v in zip(steps, curve) if v <= topk_final), None)
            tps = next(iter(seeds.values()))["tokens_per_step"]
            off = [s["val_without_defaults"] for s in seeds.values() if s["val_without_defaults"] is not None]
            # Only layers every seed has a fidelity for. An exact 0.0 is how runs made before the
            # diagnostics returned None recorded "no differentiable distribution" (SparseMixer v2,
            # StableMoE stage 2): treated as undefined too.
            fid_keys = sorted(set.intersection(*({k for k, v in s["fidelity"].items() if v != 0.0} for s in seeds.values())))
            fid = [statistics.mean(s["fidelity"][k] for s in seeds.values()) for k in fid_keys]
            load = statistics.mean(s["load"][-1][1] for s in seeds.values())
            step_s = statistics.mean(s["median_step_s"] for s in seeds.values())
            gs["routers"][rname] = {
                "seeds": sorted(seeds),
                "final_val": finals,
                "final_val_mean": mean,
                "final_val_ci95": ci,
                "reaches_topk_final_at_step": reach,
                "reaches_topk_final_at_tokens": reach and reach * tps,
                "val_without_defaults": off,
                "fidelity_per_layer": fid,
                "max_over_mean_load": load,
                "median_step_s": step_s,
                "curve_steps": steps,
                "curve_mean": curve,
            }
            if rname != "topk" and paired:
                per_eval = [[seeds[s]["val"][i][1] - topk[s]["val"][i][1] for s in seeds if s in topk] for i in range(len(steps))]
                gs["paired_delta_vs_topk"][rname] = {
                    "steps": steps,
                    "mean": [statistics.mean(d) for d in per_eval],
                    "per_seed": per_eval,
                    "final_mean": dmean,
                    "final_ci95": dci,
                }
            reach_txt = f"step {reach} ({reach * tps / 1e6:.2f}M tok)" if reach else "not reached"
            off_txt = f"{statistics.mean(off):.3f} ({statistics.mean(off) - mean:+.3f})" if off else "-"
            lines.append(
                f"| {rname} | {len(finals)} | {mean:.4f} ± {ci:.4f} | "
                + (f"{dmean:+.4f} ± {dci:.4f}" if not math.isnan(dmean) else "-")
                + f" | {reach_txt} | {off_txt} | {' '.join(f'{f:.2f}' for f in fid) or '-'} | {load:.2f} | {step_s:.2f} |"
            )
        lines.append("")
        if gs["paired_delta_vs_topk"]:
            lines += [
                "Paired Δ (router - TopK, same seed) at every evaluation, mean over seeds:",
                "",
                "| step | " + " | ".join(gs["paired_delta_vs_topk"]) + " |",
                "|---|" + "---|" * len(gs["paired_delta_vs_topk"]),
            ]
            any_delta = next(iter(gs["paired_delta_vs_topk"].values()))
            for i, st in enumerate(any_delta["steps"]):
                lines.append(
                    f"| {st} | " + " | ".join(f"{d['mean'][i]:+.4f}" for d in gs["paired_delta_vs_topk"].values()) + " |"
                )
            lines.append("")
    lines += collapse_report(results, summary, out_dir)
    (out_dir / "results.json").write_text(
        json.dumps({"config": {k: v for k, v in cfg.items() if k != "_path"}, "summary": summary, "raw": results}, indent=1)
    )
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    plots(summary, results, out_dir)
    return summary


DEAD_SHARE = 0.1  # an expert is dead when its share of the token slots is below 10% of uniform
DEAD_WINDOW = 10  # ... averaged over the last this many logged steps (one micro-batch each)


def _dead_counts(history: list, upto: int) -> List[int]:
    """Per layer, the experts whose mean share over the DEAD_WINDOW logged steps up to `upto` is
    below DEAD_SHARE of uniform."""
    window = [sh for st, sh in history if st <= upto][-DEAD_WINDOW:]
    if not window:
        return []
    out = []
    for layer in range(len(window[0])):
        E = len(window[0][layer])
        mean = [statistics.mean(w[layer][e] for w in window) for e in range(E)]
        out.append(sum(v < DEAD_SHARE / E for v in mean))
    return out


def collapse_report(results: dict, summary: dict, out_dir: Path) -> List[str]:
    """Dead experts and the default term's share of the output, per router: a table per group and
    the plots dead_experts.png, default_share.png and load_time.png (runs without the per-step
    expert shares, from before they were logged, are left out)."""
    lines: List[str] = []
    groups = {
        g: r for g, r in results.items() if any(s.get("expert_share_history") for seeds in r.values() for s in seeds.values())
    }
    if not groups:
        return lines
    lines += [
        "## Dead experts and the default term",
        "",
        f"Dead expert: mean share of the token slots over the last {DEAD_WINDOW} logged steps below "
        f"{DEAD_SHARE:.0%} of uniform. Default share: ||default term|| / ||routed output + default term|| on the "
        "probe batch (what the term would be where it is not in the forward); idle share: the part from "
        "experts that received no token at the last 10 optimizer steps. Per layer, mean over seeds, at the "
        "last evaluation.",
        "",
    ]
    for g, routers in groups.items():
        lines += [
            f"### {g}",
            "",
            "| router | seeds | dead experts per layer (each seed) | default share per layer | "
            "idle share per layer | max/mean load |",
            "|---|---|---|---|---|---|",
        ]
        for rname, seeds in routers.items():
            dead = [_dead_counts(s["expert_share_history"] or [], 10**9) for s in seeds.values()]
            last = [s["share_history"][-1][1] for s in seeds.values() if s["share_history"]]
            nl = len(dead[0]) if dead and dead[0] else 0

            def per_layer(key, last=last, nl=nl):
                vals = [
                    statistics.mean(d[f"{key}_layer{i}"] for d in last if f"{key}_layer{i}" in d)
                    for i in range(nl)
                    if any(f"{key}_layer{i}" in d for d in last)
                ]
                return " ".join(f"{v:.3f}" for v in vals) or "-"

            lines.append(
                f"| {rname} | {len(seeds)} | {' / '.join(' '.join(map(str, d)) for d in dead)} | "
                f"{per_layer('default_share')} | {per_layer('idle_share')} | "
                f"{summary[g]['routers'][rname]['max_over_mean_load']:.2f} |"
            )
        lines.append("")
    names = list(groups)
    with _panels(out_dir / "dead_experts.png", len(names), 3.4) as axes:
        for ax, g in zip(axes, names):
            for rname, seeds in groups[g].items():
                hist = [s["expert_share_history"] for s in seeds.values() if s["expert_share_history"]]
                steps = [st for st, _ in hist[0]][DEAD_WINDOW - 1 :: DEAD_WINDOW // 2]
                ax.plot(steps, [statistics.mean(sum(_dead_counts(h, st)) for h in hist) for st in steps], label=rname)
            ax.set_title(f"{g}: dead experts (all layers, mean over seeds)", fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    with _panels(out_dir / "default_share.png", len(names), 3.4) as axes:
        for ax, g in zip(axes, names):
            for rname, seeds in groups[g].items():
                if not rname.startswith("default"):
                    continue
                hist = [s["share_history"] for s in seeds.values() if s["share_history"]]
                steps = [st for st, _ in hist[0]]

                def curve(key, hist=hist, steps=steps):
                    return [
                        statistics.mean(statistics.mean(v for k, v in h[j][1].items() if k.startswith(key)) for h in hist)
                        for j in range(len(steps))
                    ]

                (line,) = ax.plot(steps, curve("default_share"), label=f"{rname}: all")
                ax.plot(steps, curve("idle_share"), "--", color=line.get_color(), label=f"{rname}: idle experts")
            ax.set_title(f"{g}: default term / output norm (mean of layers, seeds)", fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=5)
    for g in names:
        routers = {r: s for r, s in groups[g].items() if next(iter(s.values()))["expert_share_history"]}
        with _panels(out_dir / f"load_time_{g}.png", len(routers), 3.0) as axes:
            for ax, (rname, seeds) in zip(axes, routers.items()):
                seed = min(seeds)
                hist = seeds[seed]["expert_share_history"]
                steps = [st for st, _ in hist]
                E = len(hist[0][1][0])
                for e in range(E):
                    ax.plot(steps, [E * sh[0][e] for _, sh in hist], lw=0.8)
                ax.set_yscale("symlog", linthresh=0.1)
                ax.axhline(DEAD_SHARE, color="k", lw=0.6, ls=":")
                ax.set_title(f"{rname} (seed {seed}), layer 0", fontsize=8)
                ax.set_xlabel("step")
                ax.set_ylabel("load / uniform")
    return lines


@contextlib.contextmanager
def _panels(path: Path, n: int, height: float):
    """One row of n subplots, saved to `path` when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, height), squeeze=False)
    try:
        yield list(axes[0])
        fig.tight_layout()
        fig.savefig(path, dpi=90)
    finally:
        plt.close(fig)


def plots(summary: dict, results: dict, out_dir: Path) -> None:
    groups = list(summary)
    if not groups:
        return
    with _panels(out_dir / "val_loss.png", len(groups), 3.6) as axes:
        for ax, g in zip(axes, groups):
            for rname, r in summary[g]["routers"].items():
                seeds = results[g][rname]
                tps = next(iter(seeds.values()))["tokens_per_step"]
                x = [s * tps / 1e6 for s in r["curve_steps"]]
                ax.plot(x, r["curve_mean"], label=rname)
                lo = [min(s["val"][i][1] for s in seeds.values()) for i in range(len(x))]
                hi = [max(s["val"][i][1] for s in seeds.values()) for i in range(len(x))]
                ax.fill_between(x, lo, hi, alpha=0.15)
            ax.set_title(g, fontsize=9)
            ax.set_xlabel("tokens (M)")
            ax.set_ylabel("validation loss")
            ax.set_ylim(top=min(ax.get_ylim()[1], 7.0))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)

    with _panels(out_dir / "delta.png", len(groups), 3.4) as axes:
        for ax, g in zip(axes, groups):
            for rname, d in summary[g]["paired_delta_vs_topk"].items():
                ax.plot(d["steps"], d["mean"], "o-", label=rname, markersize=3)
                for i, st in enumerate(d["steps"]):
                    ax.scatter([st] * len(d["per_seed"][i]), d["per_seed"][i], s=4, alpha=0.4)
            ax.axhline(0, color="k", lw=0.8)
            ax.set_title(f"{g}: router - TopK (paired)", fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel("Δ validation loss")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)

    with _panels(out_dir / "fidelity.png", len(groups), 3.2) as axes:
        for ax, g in zip(axes, groups):
            names = list(summary[g]["routers"])
            nl = max((len(summary[g]["routers"][n]["fidelity_per_layer"]) for n in names), default=0)
            for layer in range(nl):
                vals = [(summary[g]["routers"][n]["fidelity_per_layer"] or [math.nan] * nl)[layer] for n in names]
                ax.bar([i + 0.4 * layer for i in range(len(names))], vals, width=0.4, label=f"layer {layer}")
            ax.set_xticks([i + 0.2 for i in range(len(names))], names, rotation=30, fontsize=7)
            ax.set_ylim(0, 1.05)
            ax.set_title(f"{g}: router-gradient fidelity", fontsize=9)
            ax.legend(fontsize=7)

    with _panels(out_dir / "load.png", len(groups), 3.2) as axes:
        for ax, g in zip(axes, groups):
            names = list(summary[g]["routers"])
            for i, n in enumerate(names):
                seeds = results[g][n]
                share = next(iter(seeds.values()))["expert_share"] or [[]]
                E = len(share[0])
                ax.bar([i + (e - E / 2) * 0.8 / E for e in range(E)], [E * v for v in share[0]], width=0.8 / E)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xticks(range(len(names)), names, rotation=30, fontsize=7)
            ax.set_ylabel("expert load / uniform (layer 0)")
            ax.set_title(f"{g}: per-expert load (first seed)", fontsize=9)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/sweep_quick.json")
    ap.add_argument("--parallel", type=int, default=None, help="runs side by side (default: the config's)")
    ap.add_argument("--only", default=None, help="comma-separated group names to run")
    ap.add_argument("--summarise-only", action="store_true", help="rebuild the table and plots from finished runs")
    args = ap.parse_args(argv)
    try:
        cfg = json.loads(Path(args.config).read_text())
    except (OSError, json.JSONDecodeError) as e:
        ap.error(f"--config {args.config}: {e}")
    cfg["_path"] = args.config
    for key in ("base_config", "runs_dir", "out_dir", "groups", "seeds"):
        if key not in cfg:
            ap.error(f"{args.config}: missing key {key!r}")
    runs = plan(cfg)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {g["name"] for g in cfg["groups"]}
        if unknown:
            ap.error(f"--only: unknown group(s) {sorted(unknown)}; groups: {[g['name'] for g in cfg['groups']]}")
        runs = [r for r in runs if r["group"] in wanted]
    out_dir = Path(cfg["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    if not args.summarise_only:
        from tqdm import tqdm

        parallel = args.parallel or cfg.get("parallel", 2)
        threads = cfg.get("threads_per_run", 1)
        failed = []
        with ThreadPoolExecutor(parallel) as pool, tqdm(total=len(runs), desc="sweep", unit="run") as bar:
            futures = [pool.submit(run_one, r, threads) for r in runs]
            for f in as_completed(futures):
                r = f.result()
                bar.update(1)
                bar.write(
                    f"[sweep] {r['group']}/{r['router']}_s{r['seed']}: {r['status']}"
                    + (f" in {r['wall_s']:.0f} s" if "wall_s" in r else "")
                )
                if r["status"].startswith("FAILED"):
                    failed.append(r)
        if failed:
            print(f"[sweep] {len(failed)} run(s) failed; rerun the same command to retry them", file=sys.stderr)
    summarise(cfg, plan(cfg), out_dir)
    print((out_dir / "results.md").read_text())
    print(f"[sweep] wrote {out_dir}/results.md, results.json, val_loss.png, delta.png, fidelity.png, load.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
