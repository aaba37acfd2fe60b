"""Compare main-job runs (their metrics.json): validation loss per eval step and at the end, per
variant, mean and paired difference over seeds against a baseline variant.

    python launch/compare_runs.py --baseline topk topk=runs/topk_s{seed} default=runs/default_s{seed} --seeds 1 2 3

Each VARIANT=PATTERN names a run directory pattern with `{seed}`. Prints a Markdown table and
writes the numbers as JSON with `--json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load(pattern: str, seed: int) -> dict:
    return json.loads((Path(pattern.format(seed=seed)) / "metrics.json").read_text())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="NAME=DIR_PATTERN with {seed}")
    ap.add_argument("--seeds", nargs="+", type=int, required=True)
    ap.add_argument("--baseline", required=True, help="the variant the differences are taken against")
    ap.add_argument("--json", default=None, help="write the numbers here")
    args = ap.parse_args(argv)
    variants = dict(v.split("=", 1) for v in args.variants)
    if args.baseline not in variants:
        ap.error(f"--baseline {args.baseline!r} is not one of {sorted(variants)}")
    runs = {name: {s: load(p, s) for s in args.seeds} for name, p in variants.items()}
    steps = [s for s, _ in runs[args.baseline][args.seeds[0]]["history"]["val"]]
    out = {"seeds": args.seeds, "baseline": args.baseline, "variants": {}}
    print(
        "| variant | final val loss (mean over seeds) | per seed | paired diff vs "
        + args.baseline
        + " (mean ± sd) | D zeroed (mean) | val loss diff at steps "
        + ", ".join(map(str, steps[1::2]))
        + " |"
    )
    print("|---|---|---|---|---|---|")
    for name, by_seed in runs.items():
        finals = [by_seed[s]["final_val_loss"] for s in args.seeds]
        diffs = [by_seed[s]["final_val_loss"] - runs[args.baseline][s]["final_val_loss"] for s in args.seeds]
        zeroed = [by_seed[s].get("final_val_loss_without_defaults") for s in args.seeds]
        curve = []
        for step in steps:
            d = [
                dict(by_seed[s]["history"]["val"])[step] - dict(runs[args.baseline][s]["history"]["val"])[step]
                for s in args.seeds
            ]
            curve.append(statistics.mean(d))
        sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        z = statistics.mean(zeroed) if all(v is not None for v in zeroed) else None
        out["variants"][name] = {
            "final_val_loss": finals,
            "diff_vs_baseline": diffs,
            "val_loss_with_d_zeroed": zeroed,
            "mean_diff_curve": dict(zip(steps, curve)),
        }
        print(
            f"| {name} | {statistics.mean(finals):.4f} | {', '.join(f'{v:.4f}' for v in finals)} | "
            f"{statistics.mean(diffs):+.4f} ± {sd:.4f} | {'-' if z is None else f'{z:.4f}'} | "
            + ", ".join(f"{c:+.3f}" for c in curve[1::2])
            + " |"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
