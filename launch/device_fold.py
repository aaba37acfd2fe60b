"""Folds one device run into the repository: the files of `launch/device_check.py --out` (on this
machine, the device tool's `files_at` folder) go to `results/gpu/<date>/` with a README of every
table, and the GPU sections of README.md and docs/gpus.md (between their `gpu-results` markers)
are regenerated from it. No hand copying.

    python launch/device_fold.py FILES_AT            # date from the run's summary.json
    python launch/device_fold.py FILES_AT --repo DIR # another checkout (the tests use a copy)

A dry run's output (summary.json says dry_run) is refused unless --allow-dry-run: a CPU dry run is
not a GPU result.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
FILES = ("summary.json", "report.md", "bench.json", "compile.json", "science.json", "science.png", "device_check.log")
BEGIN, END = "<!-- gpu-results:begin -->", "<!-- gpu-results:end -->"


def headline(src: Path, folder: str) -> str:
    """The short summary the README and docs/gpus.md show: the machine, each part's result, the
    Default/TopK ratios per size, the anchors, compile graphs and the science deltas."""
    summary = json.loads((src / "summary.json").read_text())
    env = summary["env"]
    parts = ", ".join(f"{p} {'ok' if r.get('rc') == 0 else 'FAILED'}" for p, r in summary["parts"].items())
    md = [
        f"Newest device run: {env['date']}, {env['device']}, torch {env['torch']} ({folder}: every table, raw JSON, the log). Parts: {parts}.",
    ]
    if (src / "bench.json").exists():
        rows = json.loads((src / "bench.json").read_text())["rows"]
        md += [
            "",
            "| T:D:F:E:k | implementation | ms fwd+bwd | expert TFLOP/s | of peak | / same-run baseline |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            if r.get("part") != "bench-ours" and r["name"] == "ours topk grouped_mm":
                continue  # an anchor part's baseline: its ratio is in the anchor's row
            peak = f"{r['peak_fraction']:.1%}" if r.get("peak_fraction") is not None else "-"
            md.append(
                f"| {r['tokens']}:{r['hidden']}:{r['ffn']}:{r['experts']}:{r['top_k']} | {r['name']} ({r.get('experts_kind', '-')}) | "
                f"{r['ms']:.2f} | {r['expert_tflops']:.1f} | {peak} | {r['ratio_to_ours_topk']:.3f} ({r.get('baseline')}) |"
            )
    if (src / "compile.json").exists():
        c = json.loads((src / "compile.json").read_text())
        gt = "; ".join(f"{r['backend']} {r['gate']} {r['router']} {r['graphs']}/{r['breaks']}" for r in c.get("graph_table", []))
        md += ["", f"torch.compile (graphs/breaks, torch {c.get('torch')}): {gt or '-'}."]
    if (src / "science.json").exists():
        s = json.loads((src / "science.json").read_text())
        bits = []
        for variant, d in s.get("paired_delta_vs_topk", {}).items():
            if d["steps"]:
                vals = [dict(v)[d["steps"][-1]] for v in d["per_seed"].values()]
                bits.append(f"{variant} {sum(vals) / len(vals):+.4f} at step {d['steps'][-1]} ({len(vals)} seeds)")
        md += ["", f"Science batch, paired validation-loss delta to TopK: {'; '.join(bits) or 'no paired result'}."]
    return "\n".join(md)


def replace_section(path: Path, text: str) -> bool:
    """Replaces what lies between the markers; False if the file has none."""
    page = path.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(page):
        return False
    path.write_text(pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", page))
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="a device run's output folder (device_check.py --out; the device tool's files_at)")
    ap.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]), help="the checkout to fold into")
    ap.add_argument("--allow-dry-run", action="store_true", help="fold a CPU dry run (tests only)")
    args = ap.parse_args(argv)
    src, repo = Path(args.src), Path(args.repo)
    if not (src / "summary.json").exists():
        ap.error(f"{src}: no summary.json (not a device_check.py output folder)")
    summary = json.loads((src / "summary.json").read_text())
    if summary["env"].get("dry_run") and not args.allow_dry_run:
        ap.error(f"{src}: a CPU dry run, not a GPU result (--allow-dry-run folds it anyway)")
    dest = repo / "results" / "gpu" / summary["env"]["date"]
    if dest.exists():
        n = 2
        while (dest.parent / f"{dest.name}-{n}").exists():
            n += 1
        dest = dest.parent / f"{dest.name}-{n}"
    dest.mkdir(parents=True)
    for name in FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, dest / name)
    import device_check

    (dest / "README.md").write_text(device_check.render_report(dest))
    rel = dest.relative_to(repo)
    text = headline(src, f"`{rel}/`")
    done = [p for p in ("README.md", "docs/gpus.md") if replace_section(repo / p, text)]
    print(f"[fold] {src} -> {rel}/ ({len(list(dest.iterdir()))} files); sections regenerated in {done or 'no file'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
