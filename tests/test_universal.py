"""DeepSpeed universal checkpoints of a `"default_moe"` run (issue 37): saved at 2 ranks (ZeRO 1,
EP 1), converted with `default-moe to-universal` (DeepSpeed's own ds_to_universal plus our expert
and D files), loaded with `"checkpoint": {"load_universal": true}` at 1 and at 2 ranks: D, the
experts, the router and the dense weights are the saved ones, and training goes on. DeepSpeed's
converter alone gives a folder without our files: the load names the command that carries them.
An ep_size 2 checkpoint is refused by name (DeepSpeed's converter cannot merge EP experts)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dist import run_distributed

pytest.importorskip("deepspeed")
ROOT = Path(__file__).resolve().parents[1]
SECTION = {"enabled": True, "router": "default", "beta": 0.7, "top_k": 2}


def _engine(ep: int, universal: bool, seed: int = 0):
    import deepspeed

    import default_moe.integrations.deepspeed as dm_ds
    import ds_workers as dw

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    cfg = dw.ds_config(1, section={**SECTION, "ep_size": ep})
    if universal:
        cfg["checkpoint"] = {"load_universal": True}
    engine, *_ = dm_ds.initialize(model=dw.ToyMoEModel(seed=seed), config=cfg)
    return engine


def _save(rank, world, ckpt, ep):
    import ds_workers as dw

    engine = _engine(ep, False)
    dw.train_engine(engine, 2, 1)
    engine.save_checkpoint(ckpt)
    layer_w = {n: p.detach().clone() for n, p in engine.module.named_parameters() if "experts" in n}
    gathered = {}
    for n, w in layer_w.items():
        parts = [torch.empty_like(w) for _ in range(world)]
        dist.all_gather(parts, w)
        gathered[n] = torch.cat(parts[:ep])  # the global experts (EP ranks first; DP replicas equal)
    if rank == 0:
        state = {n: b.detach().clone() for n, b in engine.module.state_dict().items() if "experts" not in n}
        torch.save({"state": state, "experts": gathered}, os.path.join(ckpt, "reference.pt"))


def _load(rank, world, ckpt, expect_error):
    import ds_workers as dw

    engine = _engine(1, True, seed=5)  # other initial weights: everything must come from the checkpoint
    if expect_error:
        with pytest.raises(FileNotFoundError, match=expect_error):
            engine.load_checkpoint(ckpt)
        return
    path, _ = engine.load_checkpoint(ckpt)
    assert path is not None and "_universal" in path
    ref = torch.load(os.path.join(ckpt, "reference.pt"), weights_only=True)
    state = engine.module.state_dict()
    for name, value in ref["state"].items():
        assert torch.equal(state[name].float(), value.float()), name
    assert any("defaults_ED" in n and value.abs().sum() > 0 for n, value in ref["state"].items())  # D was trained
    for name, value in ref["experts"].items():
        assert torch.equal(dict(engine.module.named_parameters())[name].detach(), value), name
    losses = dw.train_engine(engine, 1, 1, first_step=2)
    assert all(l == l for l in losses)  # noqa: E741 (finite: training goes on)


def test_universal_checkpoint_of_a_default_moe_run_loads_at_another_dp_size(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run_distributed(_save, 2, ckpt, 1)
    tag = (tmp_path / "ckpt" / "latest").read_text()

    # DeepSpeed's converter alone: our files are not in its output; the load says what to do.
    plain = tmp_path / "plain"
    shutil.copytree(tmp_path / "ckpt", plain)
    res = subprocess.run(
        [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(plain / tag)]
        + ["--output_folder", str(plain / f"{tag}_universal"), "--inject_missing_state"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    run_distributed(_load, 1, str(plain), "does not carry default_moe's expert and D files.*default-moe to-universal")

    out = subprocess.run(
        [sys.executable, "-m", "default_moe.cli", "to-universal", ckpt], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert (tmp_path / "ckpt" / "latest_universal").read_text() == f"{tag}_universal"
    assert {"default_moe_defaults.pt", "default_moe_experts_ep1_rank0.pt"} <= set(
        os.listdir(tmp_path / "ckpt" / f"{tag}_universal")
    )
    run_distributed(_load, 1, ckpt, None)  # DP 2 -> 1
    run_distributed(_load, 2, ckpt, None)  # the same size


def test_universal_conversion_of_an_expert_parallel_run_is_refused_by_name(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run_distributed(_save, 2, ckpt, 2)
    before = sorted(os.listdir(ckpt))
    out = subprocess.run(
        [sys.executable, "-m", "default_moe.cli", "to-universal", ckpt], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 2 and "ep_size=2" in out.stderr and "convert-deepspeed" in out.stderr, out.stderr
    assert sorted(os.listdir(ckpt)) == before  # nothing written
    from default_moe import manifest

    tag = (tmp_path / "ckpt" / "latest").read_text()
    assert manifest.verify(os.path.join(ckpt, tag)) is None  # the source checkpoint still complete
