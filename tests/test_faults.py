"""Ranks killed mid-save under torchrun with restarts: the job restarts from the newest complete
checkpoint and finishes with nothing lost (the losses equal an uninterrupted run's); torn and
damaged checkpoints are named and skipped."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import kill_trials
from default_moe import manifest

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(run_dir, steps, *extra):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        *kill_trials.JOB,
        "--steps",
        str(steps),
        "--eval-every",
        str(steps),
        "--run-dir",
        str(run_dir),
        *extra,
    ]


@pytest.mark.distributed
def test_kills_during_saves_resume_from_the_newest_complete_checkpoint(tmp_path):
    """SIGKILL at random instants while the main job saves (a checkpoint every step): one worker,
    both workers (torchrun restarts them), the whole job (relaunched with --auto-resume). Every
    resume takes the newest complete checkpoint and the finished job's losses equal the
    uninterrupted run's. Then a damaged newest checkpoint (a rank's expert file deleted) is named
    and fallen back from. launch/kill_trials.py runs the same with more trials
    (results/faults/kill_trials.json)."""
    res = kill_trials.deepspeed_trials(3, 16, 250.0, seed=1, workdir=tmp_path)
    assert res["job_rc"] == 0, res["log_tail"]
    assert len(res["trials"]) == 3, res
    assert res["losses_equal_uninterrupted"], res["log_tail"]
    assert len(res["starts"]) == 4, res  # the first start and one per kill: no spurious restart
    assert res["every_resume_took_the_newest_complete"], res["trials"]
    print(json.dumps(res["trials"]), res["fallbacks"])

    ckpt = tmp_path / "faulty" / "ckpt"
    newest = (ckpt / "latest").read_text().strip()
    (ckpt / newest / "default_moe_experts_ep2_rank1.pt").unlink()
    with pytest.raises(manifest.TornCheckpointError, match="rank1.pt is missing"):  # named explicitly: refused
        manifest.resolve_tag(str(ckpt), newest)
    again = subprocess.run(
        _torchrun(tmp_path / "faulty", 18, "--resume"), cwd=ROOT, env=kill_trials.ENV, capture_output=True, text=True, timeout=300
    )
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    # `latest` names the damaged one: the resolver falls back to the newest complete one in commit order.
    assert f"latest names '{newest}', which is not complete (default_moe_experts_ep2_rank1.pt is missing)" in out, out[-3000:]
    previous = int(newest[4:]) - 1
    assert f"resuming from the newest complete checkpoint 'step{previous}' (in commit order)" in out
    assert f"resumed at step {previous}" in out


def test_faults_hangs_and_ema_statistics():
    """Empty micro-batches, all tokens to one expert, non-finite skip/raise, bf16 statistics and
    gradient accumulation (one commit) against the dense reference, and a missing peer failing at
    the group timeout."""
    import fault_workers
    from dist import run_distributed

    run_distributed(fault_workers.all_faults, 2)
