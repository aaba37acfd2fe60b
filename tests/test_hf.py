"""HuggingFace MoE models converted in place (default_moe.integrations.hf): Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE under plain DDP and DeepSpeed ZeRO-2/3 (2 gloo processes, tiny random configs);
the other families, one process each: tests/test_hf_families.py."""

import pytest

pytest.importorskip("transformers")

from dist import run_distributed  # noqa: E402


@pytest.mark.distributed
def test_hf_convert_ddp(tmp_path):
    import hf_workers

    run_distributed(hf_workers.ddp_checks, 2, str(tmp_path))


@pytest.mark.distributed
def test_hf_deepspeed_section_zero2_zero3(tmp_path):
    pytest.importorskip("deepspeed")
    import hf_workers

    run_distributed(hf_workers.deepspeed_checks, 2, str(tmp_path))


def test_hf_refusals():

    from default_moe.integrations import hf
    import hf_workers

    with pytest.raises(ValueError, match=r"hf: router must be one of \['default', 'topk'\], got 'sparsemixer' \(in-place"):
        hf.convert(hf_workers.tiny("olmoe"), router="sparsemixer")
    with pytest.raises(ValueError, match="unknown setting"):
        hf.convert(hf_workers.tiny("olmoe"), router="default", betta=0.5)
    with pytest.raises(ValueError, match="MoEConfig.beta"):
        hf.convert(hf_workers.tiny("olmoe"), router="default", beta=1.5)
    # A block of the fused shape whose family has no FAMILIES entry: refused, naming what to add.
    original = hf.FAMILIES.pop("olmoe")
    try:
        with pytest.raises(ValueError, match="model_type 'olmoe': no entry in default_moe.integrations.hf.FAMILIES"):
            hf.convert(hf_workers.tiny("olmoe"), router="default")
    finally:
        hf.FAMILIES["olmoe"] = original
    # Models HF itself shards (its tensor / expert parallel plans, set by from_pretrained(distributed_config=...)).
    from transformers.distributed import DistributedConfig

    for dc in (DistributedConfig(tp_size=2, tp_plan="auto"), DistributedConfig(ep_size=2, fsdp_size=2)):
        sharded = hf_workers.tiny("olmoe")
        sharded.config.distributed_config = dc
        with pytest.raises(ValueError, match="sharded by HF's own parallel plans"):
            hf.convert(sharded, router="default")
    model = hf.convert(hf_workers.tiny("olmoe"), router="default")
    with pytest.raises(ValueError, match="already converted"):
        hf.convert(model, router="default")
    hf.unconvert(model)
    assert not any(hasattr(b, "defaults") for _, b in hf.moe_blocks(model))


def _trainer_job(out, *flags):
    """tests/hf_trainer_job.py (an HF Trainer script + `import default_moe.deepspeed`) on 2 processes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import torch

    root = Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "tests/hf_trainer_job.py",
        "--out",
        str(out),
        *flags,
    ]
    res = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return [torch.load(Path(out) / f"result_rank{r}.pt") for r in (0, 1)]


@pytest.mark.distributed
def test_hf_trainer_with_default_moe_section(tmp_path):
    """A real transformers.Trainer run (accelerate + DeepSpeed) whose DeepSpeed config has a
    "default_moe" section, without EP (ZeRO-2, blocks converted in place) and with AutoEP (EP 2,
    ZeRO-1): losses finite and falling, D non-zero and identical on both ranks, save_model writes
    D, and resuming from checkpoint-3 continues exactly (losses and D)."""
    pytest.importorskip("accelerate")
    import torch
    from safetensors import safe_open

    runs = {"replicated": _trainer_job(tmp_path / "a"), "autoep": _trainer_job(tmp_path / "ep", "--ep")}
    for what, (r0, r1) in runs.items():
        assert r0["blocks"] == (["DefaultAutoEPMoELayer"] if what == "autoep" else ["Qwen3MoeSparseMoeBlock"])
        losses = [v for _, v in r0["losses"]]
        assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.1, losses
        assert len(r0["defaults"]) == 2
        for key, D in r0["defaults"].items():
            assert D.abs().sum() > 0 and torch.equal(D, r1["defaults"][key]), (what, key)
    with safe_open(str(tmp_path / "a" / "final" / "model.safetensors"), "pt") as f:
        for key, D in runs["replicated"][0]["defaults"].items():
            assert torch.equal(f.get_tensor(key), D), key
    resumed = _trainer_job(tmp_path / "b", "--resume", str(tmp_path / "a" / "checkpoint-3"))
    full = runs["replicated"][0]
    assert resumed[0]["losses"] == full["losses"], (resumed[0]["losses"], full["losses"])  # 1-3 from the state, 4-6 run
    for key, D in full["defaults"].items():
        assert torch.equal(resumed[0]["defaults"][key], D), key
