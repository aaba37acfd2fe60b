"""The bad-input catalogue: every entry point refuses bad input with a message that names the
problem, before anything starts, and nothing already on disk is changed."""

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from default_moe import MoEConfig, MoELayer, checkpoint
from default_moe.integrations.deepspeed import DeepSpeedMoESection

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(hidden_size=8, num_experts=4, ffn_hidden_size=16)


def cfg(**kw):
    return lambda: MoEConfig(**{**BASE, **kw})


def section(sec):
    return lambda: DeepSpeedMoESection.from_ds_config({"train_batch_size": 4, "default_moe": sec})


def megatron_args(argv):
    def run():
        from default_moe.integrations import megatron as dm

        parser = dm.extra_args_provider(argparse.ArgumentParser(exit_on_error=False))
        return dm.settings_from_args(parser.parse_args(argv))

    return run


def run_config(argv):
    def run():
        from default_moe.train import parse_args

        return parse_args(argv)

    return run


CASES = [
    ("router in the wrong case", cfg(router="Default"), ValueError, "got 'Default'; did you mean 'default'?"),
    ("misspelt field", cfg(rooter="default"), ValueError, "unknown MoEConfig field(s) ['rooter']"),
    ("top_k > experts", cfg(top_k=5), ValueError, "MoEConfig.top_k must be <= num_experts (4)"),
    ("experts not divisible by ep", cfg(ep_size=3), ValueError, "divisible by MoEConfig.ep_size"),
    ("beta = 1", cfg(beta=1.0), ValueError, "MoEConfig.beta must be a number in [0.0, 1.0)"),
    ("negative aux coeff", cfg(aux_loss_coeff=-0.1), ValueError, "MoEConfig.aux_loss_coeff"),
    ("unknown router", cfg(router="expert_choice"), ValueError, "MoEConfig.router must be one of"),
    ("unknown activation", cfg(activation="relu"), ValueError, "MoEConfig.activation must be one of"),
    ("zero capacity", cfg(capacity_factor=0), ValueError, "MoEConfig.capacity_factor"),
    ("bool as int", cfg(hidden_size=True), ValueError, "MoEConfig.hidden_size must be an integer"),
    (
        "sparsemixer v1 with top-2",
        cfg(router="sparsemixer", top_k=2, sparsemixer={"version": "v1"}),
        ValueError,
        "top_k must be 1 for SparseMixer v1",
    ),
    (
        "bad sparsemixer version",
        cfg(router="sparsemixer", sparsemixer={"version": "v3"}),
        ValueError,
        "MoEConfig.sparsemixer.version must be one of",
    ),
    ("stablemoe without vocab", cfg(router="stablemoe", top_k=1), ValueError, "MoEConfig.stablemoe.vocab_size is required"),
    (
        "stablemoe top-2",
        cfg(router="stablemoe", top_k=2, stablemoe={"vocab_size": 5, "stage2_step": 1}),
        ValueError,
        "top_k must be 1 for router 'stablemoe'",
    ),
    ("unknown nested field", cfg(stablemoe={"vocab": 5}), ValueError, "unknown MoEConfig.stablemoe field(s) ['vocab']"),
    (
        "from_dict unknown key",
        lambda: MoEConfig.from_dict({**BASE, "betta": 1}),
        ValueError,
        "unknown MoEConfig field(s) ['betta']",
    ),
    ("from_dict missing key", lambda: MoEConfig.from_dict({"hidden_size": 8}), ValueError, "missing required field(s)"),
    ("layer input wrong width", lambda: MoELayer(MoEConfig(**BASE))(torch.randn(2, 7)), ValueError, "MoEConfig.hidden_size (8)"),
    (
        "layer input integer",
        lambda: MoELayer(MoEConfig(**BASE))(torch.ones(2, 8, dtype=torch.long)),
        ValueError,
        "floating-point tensor",
    ),
    (
        "hash without token ids",
        lambda: MoELayer(MoEConfig(**BASE, router="hash"))(torch.randn(2, 8)),
        ValueError,
        "routes by token id",
    ),
    ("ep_size larger than world", lambda: MoELayer(MoEConfig(**BASE, ep_size=2)), ValueError, "must divide the world size (1)"),
    ("ds section unknown key", section({"enabled": True, "betaa": 0.9}), ValueError, "unknown key(s) ['betaa']"),
    ("ds section bad beta", section({"enabled": True, "beta": 2}), ValueError, 'DeepSpeed config "default_moe": MoEConfig.beta'),
    ("ds section enabled not bool", section({"enabled": "yes"}), ValueError, '"default_moe.enabled" must be true or false'),
    (
        "ds section bad score function",
        section({"enabled": True, "score_function": "relu"}),
        ValueError,
        "MoEConfig.score_function must be one of ['softmax', 'sigmoid']",
    ),
    (
        "default_in_forward not bool",
        cfg(default_in_forward="auto"),
        ValueError,
        "MoEConfig.default_in_forward must be true, false or null",
    ),
    ("ds section not an object", section([1, 2]), ValueError, '"default_moe" must be an object'),
    ("megatron bad router flag", megatron_args(["--moe-router-type", "nope"]), argparse.ArgumentError, "invalid choice"),
    (
        "megatron beta flag out of range",
        megatron_args(["--moe-default-beta", "1.5"]),
        argparse.ArgumentError,
        "--moe-default-beta must be a number in [0, 1)",
    ),
    (
        "megatron stablemoe without vocab",
        megatron_args(["--moe-router-type", "stablemoe"]),
        ValueError,
        "stablemoe.vocab_size is required",
    ),
    (
        "bf16-ish stats dtype",
        cfg(ema_stats_dtype="fp16"),
        ValueError,
        "MoEConfig.ema_stats_dtype must be one of ['float32', 'bfloat16']",
    ),
    ("unknown nonfinite mode", cfg(nonfinite="ignore"), ValueError, "MoEConfig.nonfinite must be one of ['skip', 'raise']"),
    (
        "ds section bad weighting",
        section({"enabled": True, "ema_weighting": 1.5}),
        ValueError,
        'DeepSpeed config "default_moe": MoEConfig.ema_weighting',
    ),
    ("run config zero timeout", run_config(["--dist-timeout-s", "0"]), SystemExit, "RunConfig.dist_timeout_s"),
    ("run config bad steps", run_config(["--steps", "0"]), SystemExit, "RunConfig.steps"),
    ("run config missing ds json", run_config(["--deepspeed-config", "nope.json"]), SystemExit, "nope.json"),
]


@pytest.fixture
def saved(tmp_path):
    """Files that must survive every bad input unchanged: a checkpoint and a config."""
    ck = tmp_path / "good.pt"
    checkpoint.save(torch.nn.Sequential(MoELayer(MoEConfig(**BASE))), str(ck), extra={"step": 3})
    conf = tmp_path / "ds.json"
    conf.write_text(json.dumps({"train_batch_size": 4, "default_moe": {"enabled": True, "router": "default"}}))
    digest = lambda: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}  # noqa: E731
    return tmp_path, digest


@pytest.mark.parametrize("name,fn,exc,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, fn, exc, needle, saved, capsys, monkeypatch):
    tmp, digest = saved
    before = digest()
    monkeypatch.chdir(ROOT)
    with pytest.raises(exc) as e:
        fn()
    text = str(e.value) + capsys.readouterr().err
    assert needle in text, text
    assert digest() == before


def test_bad_checkpoints_and_cli(saved):
    tmp, digest = saved
    before = digest()
    good = str(tmp / "good.pt")
    other = torch.nn.Sequential(MoELayer(MoEConfig(**{**BASE, "top_k": 1})))
    with pytest.raises(ValueError, match=r"different config for MoE layer '0': top_k=2 \(model: 1\)"):
        checkpoint.load(other, good)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.load(other, str(tmp / "nope.pt"))
    for args, needle in [
        (["check-config", str(tmp / "ds.json"), "--section", "missing"], "has no 'missing' section"),
        (["check-config", str(tmp / "nope.json")], "cannot read"),
        (["checkpoint-info", str(tmp / "ds.json")], "not readable"),
        (["convert-deepspeed", str(tmp), str(tmp / "out.pt")], "has no complete checkpoint (nor a 'latest' file)"),
        (["convert-deepspeed", str(tmp), str(tmp / "out.pt"), "--tag", "step9"], "not a DeepSpeed checkpoint"),
        (["convert-deepspeed", str(tmp), good], "exists; pass --force"),
    ]:
        out = subprocess.run([sys.executable, "-m", "default_moe.cli", *args], capture_output=True, text=True)
        assert out.returncode == 2 and needle in out.stderr, out.stderr
    assert digest() == before
    assert len(CASES) + 8 >= 25


def test_untrusted_files_and_bad_extra(saved, tmp_path_factory):
    """Checkpoints are data: a crafted pickle is refused by every reader (its payload never runs), the
    upgrade needs --trust-pickle, a non-JSON `extra` fails before anything is written."""
    import os

    tmp, digest = saved
    before = digest()
    elsewhere = tmp_path_factory.mktemp("untrusted")
    marker = elsewhere / "marker"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = elsewhere / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "model": {}, "moe_configs": {}, "extra": {"x": Payload()}}, evil)
    layer = torch.nn.Sequential(MoELayer(MoEConfig(**BASE)))
    with pytest.raises(checkpoint.UntrustedCheckpointError, match="could run code, so it is refused"):
        checkpoint.load(layer, str(evil))
    with pytest.raises(ValueError, match=r"extra\['obj'\] is a object"):
        checkpoint.save(layer, str(tmp / "good.pt"), extra={"obj": object()})
    for args, needle in [
        (["checkpoint-info", str(evil)], "checkpoint-upgrade --trust-pickle"),
        (["checkpoint-upgrade", str(evil), str(tmp / "good.pt")], "pass --trust-pickle only for a file you wrote"),
        (["checkpoint-upgrade", "--trust-pickle", str(tmp / "good.pt"), str(tmp / "ds.json")], "exists; pass --force"),
    ]:
        out = subprocess.run([sys.executable, "-m", "default_moe.cli", *args], capture_output=True, text=True)
        assert out.returncode == 2 and needle in out.stderr, out.stderr
    assert not marker.exists()
    assert digest() == before
