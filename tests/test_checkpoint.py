"""Resharding checkpoints: written at EP=2, loaded at EP=1 and EP=4 (and back) with identical
outputs; atomic writes; clear errors for missing, corrupt, foreign and mismatched files."""

import subprocess
import sys

import pytest
import torch

import workers
from default_moe import MoEConfig, MoELayer, checkpoint
from dist import run_distributed


@pytest.mark.distributed
def test_reshard_ep2_to_ep1_ep4_and_back(tmp_path):
    path = str(tmp_path / "ep2.pt")
    run_distributed(workers.reshard_save, 2, path)
    workers.reshard_load(0, 1, path)  # EP=1, one process, no process group
    run_distributed(workers.reshard_load, 4, path)
    # EP=4 -> EP=2: save again from a 4-rank load is covered by saving at 1 and loading at 2.
    path1 = str(tmp_path / "ep1.pt")
    model = workers._TwoLayer(1)
    checkpoint.load(model, path)
    checkpoint.save(model, path1, extra={"step": 2})
    torch.save(torch.load(path + ".probe"), path1 + ".probe")
    run_distributed(workers.reshard_load, 2, path1)
    info = subprocess.run([sys.executable, "-m", "default_moe.cli", "checkpoint-info", path], capture_output=True, text=True)
    assert info.returncode == 0 and "saved at ep_size=2" in info.stdout


def _layer(**kw):
    return MoELayer(MoEConfig(hidden_size=8, num_experts=4, ffn_hidden_size=16, **kw))


def test_checkpoint_errors_and_atomic_write(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pt")
    model = torch.nn.Sequential(_layer())
    checkpoint.save(model, path, extra={"step": 1})
    before = open(path, "rb").read()
    with pytest.raises(ValueError, match=r"different config for MoE layer '0': router='default' \(model: 'topk'\)"):
        checkpoint.load(torch.nn.Sequential(_layer(router="topk")), path)
    with pytest.raises(ValueError, match=r"ema_weighting='mean' \(model: 'prob'\)"):
        checkpoint.load(torch.nn.Sequential(_layer(ema_weighting="prob")), path)
    # Settings that do not change what the saved state is load, and are reported.
    other = torch.nn.Sequential(_layer(beta=0.5, ema_stats_dtype="bfloat16", nonfinite="raise", init_std=0.1, aux_loss_coeff=0.0))
    with pytest.warns(
        UserWarning, match=r"0: aux_loss_coeff=0.01 -> 0.0; 0: beta=0.9 -> 0.5; 0: ema_stats_dtype='float32' -> 'bfloat16'"
    ):
        assert checkpoint.load(other, path) == {"step": 1}
    assert torch.equal(other[0].defaults.defaults_ED, model[0].defaults.defaults_ED)
    with pytest.raises(ValueError, match="MoE layers"):
        checkpoint.load(torch.nn.Sequential(_layer(), _layer()), path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.load(model, str(tmp_path / "missing.pt"))
    (tmp_path / "corrupt.pt").write_bytes(before[: len(before) // 2])
    with pytest.raises(ValueError, match="not readable"):
        checkpoint.load(model, str(tmp_path / "corrupt.pt"))
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a default-moe checkpoint"):
        checkpoint.load(model, str(tmp_path / "foreign.pt"))
    assert open(path, "rb").read() == before  # failed loads leave the file alone

    # A non-JSON extra is refused before anything is written.
    with pytest.raises(ValueError, match=r"extra\['bad'\] is a object"):
        checkpoint.save(model, path, extra={"bad": object()})
    # A crash while writing (half a file written, then an error) leaves the previous file intact.
    real_save = torch.save

    def crashing_save(obj, f):  # part of the file written, then the process fails
        real_save(obj, f)
        f.truncate(100)
        raise RuntimeError("crash mid-save")

    monkeypatch.setattr(checkpoint.torch, "save", crashing_save)
    with pytest.raises(RuntimeError, match="crash mid-save"):
        checkpoint.save(model, path, extra={"step": 2})
    monkeypatch.undo()
    assert open(path, "rb").read() == before and checkpoint.load(model, path) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "corrupt.pt", "foreign.pt"]  # no temp left


def test_load_resets_pending_accumulation_and_says_when_d_is_missing():
    """A load replaces the statistics accumulated since the last commit; a state without D loads
    zeros and says so (pre-flag checkpoint, or D filtered out on the way)."""
    layer = _layer()
    layer.train()
    x = torch.randn(6, 8)
    layer(x).sum().backward()
    assert layer.defaults.pending == 1
    with pytest.warns(UserWarning, match="1 micro-batches since the last optimizer step are not in this state dict"):
        state = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.load_state_dict(state)
    assert layer.defaults.pending == 0 and layer.defaults.stats_ED1.abs().sum() == 0
    del state["defaults.defaults_ED"]
    with pytest.warns(UserWarning, match="defaults.defaults_ED is not in the loaded state: Default MoE starts from zero"):
        layer.load_state_dict(state)
    assert layer.defaults.defaults_ED.abs().sum() == 0
