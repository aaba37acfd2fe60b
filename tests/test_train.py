"""The main job: data loading, config errors, and a torchrun smoke run with resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from default_moe import data as data_mod
from default_moe.train import parse_args

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_corpus_and_tokenizer_round_trip():
    tok = data_mod.load_tokenizer()
    assert tok.get_vocab_size() == 4096
    text = "Dense backpropagation for sparse experts: `dict.get()` returns None."
    assert tok.decode(tok.encode(text).ids) == text
    assert data_mod.data_path("LICENSE-PSF.txt").exists()


def test_user_text_and_binary_tokens(tmp_path, monkeypatch):
    monkeypatch.setenv("DEFAULT_MOE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("hello world\n\n" * 200)
    (tmp_path / "docs" / "b.md").write_text("# title\n\nsome markdown text\n" * 100)
    toks = data_mod.load_tokens(str(tmp_path / "docs"))
    assert len(toks) > 500 and toks.dtype == np.uint16
    again = data_mod.load_tokens(str(tmp_path / "docs"))  # from the cache
    assert np.array_equal(toks, again) and len(list((tmp_path / "cache").glob("tokens-*.npy"))) == 1
    ids = np.arange(1000, dtype="<u4") % 4096
    ids.tofile(tmp_path / "pre.bin")
    b = data_mod.load_tokens(str(tmp_path / "pre.bin"), token_dtype="uint32")
    assert np.array_equal(np.asarray(b), ids)
    with pytest.raises(ValueError, match="no such file"):
        data_mod.load_tokens(str(tmp_path / "missing.txt"))
    x1, y1 = data_mod.sample_batch(toks, 3, 16, seed=1, step=5, rank=1)
    x2, y2 = data_mod.sample_batch(toks, 3, 16, seed=1, step=5, rank=1)
    x3, _ = data_mod.sample_batch(toks, 3, 16, seed=1, step=5, rank=0)
    assert (x1 == x2).all() and (y1 == y2).all() and not (x1 == x3).all()
    assert (x1[:, 1:] == y1[:, :-1]).all()


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--router", "nope"], "MoEConfig.router must be one of"),
        (["--beta", "1.0"], "MoEConfig.beta"),
        (["--steps", "0"], "RunConfig.steps (--steps) must be an integer >= 1"),
        (["--n-heads", "3"], "GPTConfig.d_model (128) must be divisible by GPTConfig.n_heads (3)"),
        (["--top-k", "9"], "MoEConfig.top_k must be <= num_experts (8)"),
        (["--deepspeed-config", "nope.json"], "nope.json"),
        (["--stale-defaults", "often"], "MoEConfig.stale_defaults must be one of ['keep', 'zero', 'mean']"),
    ],
)
def test_bad_run_config_is_rejected_before_start(argv, needle, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def _train(run_dir, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "launch" / "train.py"),
        "--run-dir",
        str(run_dir),
        "--micro-batch",
        "4",
        "--seq-len",
        "32",
        "--eval-every",
        "2",
        "--eval-batches",
        "2",
        "--ckpt-every",
        "2",
        "--log-every",
        "1",
        *extra,
    ]
    out = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


@pytest.mark.distributed
def test_main_job_smoke_and_resume(tmp_path):
    out = _train(tmp_path, "--steps", "4")
    assert "router=default ep_size=2" in out and "---- summary ----" in out
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert len(m["history"]["train"]) == 4 and all(np.isfinite(loss) for _, loss in m["history"]["train"])
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert (tmp_path / "ckpt" / "step4" / "default_moe_experts_ep2_rank1.pt").exists()

    out = _train(tmp_path, "--steps", "6", "--resume")
    assert "resumed at step 4" in out
    m2 = json.loads((tmp_path / "metrics.json").read_text())
    assert [s for s, _ in m2["history"]["train"]] == [1, 2, 3, 4, 5, 6]
    assert m2["history"]["train"][:4] == m["history"]["train"]

    # Resumed at its final step (torchrun restarting workers that had already finished, seen on the
    # SLURM test cluster): nothing left to train, it still evaluates and writes its outputs.
    out = _train(tmp_path, "--steps", "6", "--resume")
    assert "resumed at step 6" in out and "---- summary ----" in out
    assert json.loads((tmp_path / "metrics.json").read_text())["history"]["train"] == m2["history"]["train"]


@pytest.mark.distributed
def test_main_job_rollback_then_auto_resume_follows_the_pointer_and_keeps_the_branch(tmp_path):
    """Issue 37 on the main job's own path: a run saves steps 2, 4, 6; the operator rolls back
    (`--resume-from step2`, a lower `--lr`, saves 3 and 5); the next `--auto-resume` continues
    from step 5 (what `latest` names), not from the abandoned step 6, and `--keep-last 2` keeps the
    newest checkpoints in commit order (5 and 7), deleting the abandoned branch. The changed --lr
    is used and said."""
    _train(tmp_path, "--steps", "6")
    out = _train(tmp_path, "--resume-from", "step2", "--steps", "5", "--ckpt-every", "3", "--lr", "1e-3")
    assert "resumed at step 2" in out, out[-2000:]
    assert "--lr 0.001 differs from the checkpoint's 0.003: training on with 0.001" in out, out[-2000:]
    assert (tmp_path / "ckpt" / "latest").read_text() == "step5"
    out = _train(tmp_path, "--auto-resume", "--steps", "7", "--ckpt-every", "7", "--keep-last", "2", "--lr", "1e-3")
    assert "resumed at step 5" in out and "differs from the checkpoint" not in out, out[-2000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert [s for s, _ in m["history"]["train"]] == [1, 2, 3, 4, 5, 6, 7]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.is_dir()) == ["step5", "step7"]


@pytest.mark.distributed
def test_main_job_under_the_deepspeed_launcher(tmp_path):
    """DeepSpeed users start jobs with `deepspeed`: it passes --local_rank and sets the ranks."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
    }
    out = subprocess.run(
        [
            "deepspeed",
            "--num_nodes",
            "1",
            "--num_gpus",
            "2",
            str(ROOT / "launch" / "train.py"),
            "--steps",
            "2",
            "--micro-batch",
            "4",
            "--seq-len",
            "32",
            "--eval-every",
            "2",
            "--eval-batches",
            "1",
            "--ckpt-every",
            "100",
            "--run-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "world=2" in out.stdout and "---- summary ----" in out.stdout


def _train_one_process(run_dir, *extra):
    """The main job as one process (world 1), as launch/sweep.py runs it."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }
    args = [
        sys.executable,
        str(ROOT / "launch" / "train.py"),
        "--router",
        "default",
        "--ep-size",
        "1",
        "--seed",
        "1",
        "--run-dir",
        str(run_dir),
        "--micro-batch",
        "4",
        "--seq-len",
        "32",
        "--steps",
        "16",
        "--eval-every",
        "4",
        "--eval-batches",
        "2",
        "--ckpt-every",
        "100",
        "--log-every",
        "1",
        *extra,
    ]
    out = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return json.loads((Path(run_dir) / "metrics.json").read_text())["history"]


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_main_job_per_block_compile_matches_eager_without_recompiles(tmp_path):
    """`--compile true` (torch.compile per block, inductor) under the DeepSpeed engine: the same
    losses as eager, and no graph compiled after warm-up (the first two evaluations: eval mode and
    the diagnostics' hooks compile their own graphs) although routing differs at every step. This
    run found the aux-loss scale's saved-tensor version failure (test_compile) and the 0/1 token
    count specialisation (size-oblivious guards, train/build.py)."""
    compiled = _train_one_process(tmp_path / "compiled", "--compile", "true")
    eager = _train_one_process(tmp_path / "eager")
    c_losses = [v for _, v in compiled["train"]]
    e_losses = [v for _, v in eager["train"]]
    assert c_losses == pytest.approx(e_losses, rel=1e-4)
    graphs = dict(compiled["compiled_graphs"])
    assert graphs[1] > 0
    assert graphs[16] == graphs[9], compiled["compiled_graphs"]  # steps 9-16: two evals, no new graph
    assert "compiled_graphs" not in eager


def test_schedule_sync_agrees_on_what_every_run_posted_and_does_not_wait_forever(tmp_path):
    """The runs of a science batch agree on one step count computed from their posts only (the
    slowest step and evaluation, the earliest deadline, from the last post); a run that never
    posts holds the others only `schedule_sync_wait_s`."""
    import threading
    import time

    from default_moe.train import loop
    from default_moe.train.config import RunConfig

    now = time.time()
    posts = [
        {"step_s": 0.10, "eval_s": 1.0, "deadline": now + 120.0, "now": now, "cap": 5000},
        {"step_s": 0.25, "eval_s": 2.0, "deadline": now + 100.0, "now": now + 3.0, "cap": 5000},
        {"step_s": 0.20, "eval_s": 0.5, "deadline": now + 130.0, "now": now + 1.0, "cap": 400},
    ]
    totals = {loop._fit_steps(order, 10, 25)[0] for order in (posts, posts[::-1], posts[1:] + posts[:1])}
    # (100 - 3 - 2 * 2) s left at 0.25 s/step + 2 s per 25 steps, times 0.9.
    assert totals == {10 + int(0.9 * 93.0 / (0.25 + 2.0 / 25))}
    assert loop._fit_steps(posts[2:], 10, 25)[0] == 400  # the cap

    def post(name, results, wait_s, runs=2):
        run = RunConfig(
            run_dir=str(tmp_path / name),
            schedule_sync=str(tmp_path / "sync"),
            schedule_sync_runs=runs,
            schedule_sync_wait_s=wait_s,
            time_budget_minutes=1.0,
        )
        results[name] = loop._rendezvous(run, "proposals", {"run_dir": name})

    results = {}
    threads = [threading.Thread(target=post, args=(n, results, 60.0)) for n in ("a", "b")]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert time.perf_counter() - t0 < 10 and {len(v) for v in results.values()} == {2}
    t0 = time.perf_counter()
    post("c", results, 1.0, runs=5)  # 3 posted, 5 expected: goes on after the wait
    assert 1.0 <= time.perf_counter() - t0 < 5 and len(results["c"]) == 3
