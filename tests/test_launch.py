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
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(ROOT / "launch" / "demo_layer.py"),
            "--steps",
            "3",
            "--tokens",
            "64",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world=2 ep_size=2" in out.stdout
    assert "after 3 EMA updates" in out.stdout
    assert "'all_to_all'" in out.stdout


def test_sweep_runs_skips_and_summarises(tmp_path):
    """The reproduction sweep on a toy config: two routers train, the table and plots appear with a
    paired delta, and a second invocation skips the finished runs."""
    import json

    cfg = {
        "base_config": "configs/gpt_tiny.json",
        "runs_dir": str(tmp_path / "runs"),
        "out_dir": str(tmp_path / "out"),
        "parallel": 2,
        "threads_per_run": 1,
        "seeds": [7],
        "run": {
            "steps": 4,
            "eval_every": 2,
            "eval_batches": 1,
            "ckpt_every": 2,
            "log_every": 1,
            "micro_batch": 2,
            "seq_len": 16,
            "warmup_steps": 1,
        },
        "groups": [
            {
                "name": "g",
                "routers": ["topk", "default", "default@bf16"],
                "variants": {"bf16": {"ema_stats_dtype": "bfloat16"}},
                "model": {"num_experts": 4, "top_k": 2, "ffn_hidden_size": 32},
            }
        ],
    }
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(cfg))
    cmd = [sys.executable, str(ROOT / "launch" / "sweep.py"), "--config", str(path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert (out.stdout + out.stderr).count(": done in") == 3, out.stdout[-2000:]
    res = json.loads((tmp_path / "out" / "results.json").read_text())["summary"]["g"]
    assert set(res["routers"]) == {"topk", "default", "default@bf16"}
    delta = res["paired_delta_vs_topk"]["default"]
    assert delta["steps"] == [2, 4] and len(delta["per_seed"][0]) == 1
    for name in ("results.md", "val_loss.png", "delta.png", "fidelity.png", "load.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("skipped (done)") == 3, again.stdout[-2000:]


def test_engine_benchmark_and_comm_model_run(tmp_path):
    """The benchmark command's worker on one tiny size (not a timing test: it must run and report
    every implementation, with collectives counted), and the cost model's EMA payloads."""
    import json

    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "bench_engines.py"),
            "--sizes",
            "64:16:32:4:2",
            "--rounds",
            "2",
            "--iters",
            "1",
            "--json",
            str(tmp_path / "ep1.json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "ep1.json").read_text())["rows"]
    assert [r["name"] for r in rows] == [
        "ours topk",
        "ours default",
        "ours topk grouped_mm",
        "deepspeed cf1.25",
        "deepspeed dropless",
        "megatron-core",
    ]
    assert all(r["mem_bytes"] > 0 and r["ms"] > 0 and r["saved_bytes"] > 0 for r in rows)
    # One host sync (the split sizes), none for the grouped GEMM at EP 1 without drops (offsets on the device).
    syncs = {r["name"]: r["host_syncs"] for r in rows}
    assert (syncs["ours topk"], syncs["ours default"], syncs["ours topk grouped_mm"]) == (1, 1, 0), [
        r["host_sync_calls"] for r in rows
    ]
    sys.path.insert(0, str(ROOT / "launch"))
    import comm_model

    m = comm_model.model(comm_model.SHAPES[0], tokens=4096, gas=8)
    assert m["ema_payload"] == 32 * 8 * 4097 * 4
    ema = list(m["ema"].values())  # once per optimizer step: fp32, bf16 sums + fp32 counts
    assert len(ema) == 2 and ema[1] == pytest.approx(ema[0] * (2 * 4096 + 4) / (4097 * 4))


def test_device_check_dry_run_survives_a_planted_crash_and_folds(tmp_path):
    """The prepared GPU check end to end on CPU at tiny sizes (--dry-run), with a crash planted in
    one benchmark implementation (megatron-core): that part is recorded with its error and every
    other part's results are written (ours, torchtitan and DeepSpeed rows, compile, science); the
    science runs train one agreed, time-sized schedule; the fold command puts the output under
    results/gpu/<date>/ and regenerates the marked sections (and refuses a dry run unless told)."""
    import json
    import shutil

    out_dir = tmp_path / "out"
    out = subprocess.run(
        [
            sys.executable,
            "launch/device_check.py",
            "--dry-run",
            "--out",
            str(out_dir),
            "--runs-root",
            str(tmp_path / "runs"),
            "--plant-crash",
            "megatron-core",
            "--science-seeds",
            "1",
            "--budget-minutes",
            "2.5",
            "--science-min-minutes",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    log = (out_dir / "device_check.log").read_text() if (out_dir / "device_check.log").exists() else ""
    assert out.returncode == 1, out.stdout[-2000:] + log[-3000:]  # the planted failure is reported
    files = sorted(p.name for p in out_dir.iterdir())
    assert files == [
        "bench.json",
        "compile.json",
        "device_check.log",
        "report.md",
        "science.json",
        "science.png",
        "summary.json",
    ], files
    parts = json.loads((out_dir / "summary.json").read_text())["parts"]
    failed = {p: r for p, r in parts.items() if r["rc"] != 0}
    assert list(failed) == ["bench-megatron-core"], failed
    assert any("planted crash in 'megatron-core'" in line for line in failed["bench-megatron-core"]["tail"])
    assert parts["tests"]["counts"]["passed"] >= 1 and parts["tests"]["counts"]["failures"] == 0
    names = [r["name"] for r in json.loads((out_dir / "bench.json").read_text())["rows"]]
    assert "megatron-core" not in names
    assert {"ours topk", "ours default", "ours default-bwd grouped_mm", "torchtitan", "deepspeed cf1.25"} <= set(names)
    compiled = json.loads((out_dir / "compile.json").read_text())
    assert {(r["router"], r["breaks"]) for r in compiled["graph_table"] if r["backend"] == "grouped_mm"} == {
        ("topk", 0),
        ("default", 0),
    }
    science = json.loads((out_dir / "science.json").read_text())
    runs = science["runs"]
    assert set(runs) == {"topk-s1234", "default-s1234", "default-bwd-s1234"}
    steps = {(r["steps"], r["schedule_steps"]) for r in runs.values()}
    assert len(steps) == 1, runs  # one agreed schedule, every run completed it
    planned, done = steps.pop()
    assert done == planned and 10 < planned < 1000, runs  # sized by time (not the cap)
    assert not any(r["cut_short"] for r in runs.values())
    assert all(r["schedule"][0]["note"].endswith("agreed with 3/3 runs") for r in runs.values())
    assert set(science["paired_delta_vs_topk"]) == {"default", "default-bwd"}
    assert runs["default-s1234"]["final_val_loss_without_defaults"] is not None
    report = (out_dir / "report.md").read_text()
    assert "planted crash" in report and "| torchtitan |" in report and "Paired validation-loss delta" in report

    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    for page in ("README.md", "docs/gpus.md"):
        shutil.copyfile(ROOT / page, repo / page)
    fold = [sys.executable, "launch/device_fold.py", str(out_dir), "--repo", str(repo)]
    refused = subprocess.run(fold, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "dry run" in refused.stderr
    folded = subprocess.run(fold + ["--allow-dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert folded.returncode == 0, folded.stderr[-2000:]
    (dest,) = (repo / "results" / "gpu").iterdir()
    assert {"README.md", "bench.json", "science.json", "summary.json"} <= {p.name for p in dest.iterdir()}
    for page in ("README.md", "docs/gpus.md"):
        text = (repo / page).read_text()
        assert f"results/gpu/{dest.name}/" in text and "bench-megatron-core FAILED" in text, page


def test_readme_first_recipe_is_the_tested_example():
    """The README's quick start and docs/layer.md show launch/example_layer.py verbatim; it trains under torchrun (2 ranks, EP 2,
    wrap_ddp) with the loss falling."""
    import re

    code = (ROOT / "launch" / "example_layer.py").read_text()
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"\*\*Plain PyTorch\*\*.*?```python\n(.*?)```", readme, re.S).group(1)
    assert block == code, "README's first recipe differs from launch/example_layer.py"
    page = (ROOT / "docs" / "layer.md").read_text()
    assert re.search(r"```python\n(.*?)```", page, re.S).group(1) == code, "docs/layer.md's recipe differs"
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "launch/example_layer.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [float(m) for m in re.findall(r"loss ([0-9.]+)", out.stdout)]
    assert len(losses) == 4 and losses[-1] < 0.6 * losses[0], out.stdout
