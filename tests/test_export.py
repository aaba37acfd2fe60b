"""Serving what was trained (issue 38): `default-moe export` of a converted HF Mixtral and a
DeepSeek-V3-style model, and of the main job's DeepSpeed checkpoint, each trained a few steps with
the term out of the forward (exact: logits equal to fp32 rounding) and with D in the forward (the
drift is measured and printed, the export refused without --accept-drift, nothing written). The
exported folders load in a process that cannot import default_moe (plain `transformers`, or the
torch-only `gpt_moe.py`), whose logits are compared with the trained model's. The source folders
are byte-identical afterwards."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# The serving process: default_moe cannot be imported there at all.
BLOCK = "import sys; sys.modules['default_moe'] = None\n"


def _tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


def _export(src, dst, *extra):
    return subprocess.run(
        [sys.executable, "-m", "default_moe.cli", "export", str(src), str(dst), *extra],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _reported_diff(text: str) -> float:
    return float(re.search(r"max \|logit difference\| ([0-9.e+-]+)", text).group(1))


def _serve(code: str, out: Path) -> torch.Tensor:
    res = subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("in_forward", [False, True])
@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3"])
def test_hf_export_loads_in_plain_transformers(name, in_forward, tmp_path):
    pytest.importorskip("transformers")
    from test_hf_families import build

    from default_moe.integrations import hf

    model = build(name)
    hf.convert(model, router="default", beta=0.5, default_in_forward=in_forward)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = torch.randint(3, model.config.vocab_size, (2, 12), generator=g)
        opt.zero_grad()
        model(x, labels=x).loss.backward()
        opt.step()  # commits D
    assert all(b.defaults.defaults_ED.abs().sum() > 0 for _, b in hf.moe_blocks(model))
    src, dst = tmp_path / "trained", tmp_path / "served"
    model.save_pretrained(src)
    before = _tree_hash(src)
    probe = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))  # the export's
    model.eval()
    with torch.no_grad():
        trained = model(probe).logits
    torch.save(probe, tmp_path / "probe.pt")

    out = _export(src, dst)
    if in_forward:  # refused, measured, nothing written
        assert out.returncode == 2 and "refused" in out.stderr and "D in the forward" in out.stderr, out.stderr[-2000:]
        assert not dst.exists() and _reported_diff(out.stderr) > 0
        out = _export(src, dst, "--accept-drift")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    reported = _reported_diff(out.stdout)
    assert _tree_hash(src) == before  # the source is never modified

    cfg = json.loads((dst / "config.json").read_text())
    assert "default_moe" not in cfg
    fresh = tmp_path / "fresh"
    build(name).save_pretrained(fresh)
    assert set(cfg) == set(json.loads((fresh / "config.json").read_text())), set(cfg) ^ set(
        json.loads((fresh / "config.json").read_text())
    )
    from safetensors import safe_open

    (st,) = dst.glob("*.safetensors")
    with safe_open(str(st), "pt") as f:
        assert not [k for k in f.keys() if "defaults" in k]
    served = _serve(
        "import torch, transformers\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(dst)!r}, attn_implementation='eager').eval()\n"
        f"probe = torch.load({str(tmp_path / 'probe.pt')!r})\n"
        f"with torch.no_grad(): torch.save(m(probe).logits, {str(tmp_path / 'served.pt')!r})\n",
        tmp_path / "served.pt",
    )
    diff = (served - trained).abs().max().item()
    if in_forward:
        assert diff > 1e-4 and diff == pytest.approx(reported, rel=0.05, abs=1e-6)
    else:
        assert diff <= 1e-5 * max(1.0, trained.abs().max().item()), diff


def _train_main_job(run_dir, *extra):
    from test_train import _train  # 2 ranks (EP 2), the tiny config; later flags override its cadence

    _train(run_dir, "--steps", "6", "--eval-every", "6", "--ckpt-every", "6", "--log-every", "6", *extra)


@pytest.mark.distributed
def test_main_job_export_serves_with_torch_alone(tmp_path):
    """The main job (EP 2, DeepSeek-V3 gate: sigmoid, renormalised, expert bias; the term out of the
    forward) exports exactly; its paper variant (softmax, D in the forward) is refused, then
    exported with the drift measured; with D annealed to 0 at the end it exports exactly; all
    serve from gpt_moe.py in a process without default_moe."""
    from default_moe import checkpoint
    from default_moe import data as data_mod
    from default_moe.config import MoEConfig
    from default_moe.models.gpt import GPT, GPTConfig

    for variant, extra in (
        ("bwd", ["--deepspeed-config", "configs/ds_gpt_tiny_dsv3.json"]),
        ("paper", ["--default-in-forward", "true"]),
        # D annealed to 0 over the last 3 steps: the paper's variant ends as the plain model.
        ("anneal", ["--default-in-forward", "true", "--anneal-defaults-steps", "3"]),
    ):
        run = tmp_path / variant
        _train_main_job(run, *extra)
        before = _tree_hash(run / "ckpt")
        dst = tmp_path / f"served_{variant}"
        out = _export(run / "ckpt", dst)
        if variant == "paper":
            assert out.returncode == 2 and "refused" in out.stderr and not dst.exists(), out.stderr[-2000:]
            out = _export(run / "ckpt", dst, "--accept-drift")
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        assert _tree_hash(run / "ckpt") == before
        assert sorted(p.name for p in dst.iterdir()) == ["config.json", "gpt_moe.py", "model.pt"]
        assert not [k for k in torch.load(dst / "model.pt", weights_only=True) if "defaults" in k]

        # The trained model, rebuilt here from the checkpoint, and its validation batch.
        checkpoint.convert_deepspeed(str(run / "ckpt"), str(tmp_path / "full.pt"))
        full = torch.load(tmp_path / "full.pt", weights_only=True)
        client = checkpoint.load_deepspeed_file(str(Path(full["extra"]["source"]) / "mp_rank_00_model_states.pt"))
        model = GPT(GPTConfig(**client["gpt"]))
        for i, layer in enumerate(model.moe_layers):
            layer.reconfigure(MoEConfig(**{**full["moe_configs"][f"blocks.{i}.moe"], "ep_size": 1}))
        model.load_state_dict(full["model"])
        scale = client["defaults_forward_scale"]  # the trained model's last forward (annealed: 0)
        assert scale == (0.0 if variant == "anneal" else 1.0)
        for layer in model.moe_layers:
            layer.defaults.set_forward_scale(scale)
        model.eval()
        _, val = data_mod.split_train_val(data_mod.load_tokens("shipped"))
        ids = data_mod.sample_batch(val, 4, 32, 1234 + 1, 0, 0, 0)[0]
        torch.save(ids, tmp_path / "ids.pt")
        with torch.no_grad():
            trained = model(ids)
        served = _serve(
            "import importlib.util, torch\n"
            f"spec = importlib.util.spec_from_file_location('gpt_moe', {str(dst / 'gpt_moe.py')!r})\n"
            "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
            f"m = mod.load({str(dst)!r})\n"
            f"with torch.no_grad(): torch.save(m(torch.load({str(tmp_path / 'ids.pt')!r})), {str(tmp_path / 'served.pt')!r})\n",
            tmp_path / "served.pt",
        )
        diff = (served - trained).abs().max().item()
        if variant in ("bwd", "anneal"):
            assert diff <= 1e-5 * max(1.0, trained.abs().max().item()), diff
            assert "D out of the forward" in out.stdout, out.stdout
        else:
            assert diff > 1e-5 and _reported_diff(out.stdout) > 0, (diff, out.stdout)
        (tmp_path / "full.pt").unlink()


def test_d_annealing_scales_the_forward_term_keeps_its_gradient_and_ends_plain():
    """`ExpertDefaults.set_forward_scale(a)`: the output is y_S + a * term (the float64 reference
    value), the router gradient is the full term's at every a, and at a = 0 the output equals the
    model without D in the forward bit for bit (what `default-moe export` then writes exactly)."""
    from default_moe import MoEConfig, MoELayer

    def layer(in_forward):
        torch.manual_seed(0)
        m = MoELayer(
            MoEConfig(
                hidden_size=8,
                num_experts=6,
                ffn_hidden_size=12,
                top_k=2,
                router="default",
                default_in_forward=in_forward,
                aux_loss_coeff=0.0,
            )
        )
        with torch.no_grad():
            m.defaults.defaults_ED.copy_(torch.randn(6, 8, generator=torch.Generator().manual_seed(1)))
        return m

    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(2))
    g = torch.randn(10, 8, generator=torch.Generator().manual_seed(3))
    outs, grads = {}, {}
    for name, in_forward, scale in (("paper", True, 1.0), ("half", True, 0.5), ("zero", True, 0.0), ("bwd", False, 1.0)):
        m = layer(in_forward)
        m.defaults.set_forward_scale(scale)
        out = m(x)
        (out * g).sum().backward()
        outs[name], grads[name] = out.detach(), m.router.weight.grad.clone()
    term = outs["paper"] - outs["bwd"]
    assert term.abs().max() > 1e-3
    torch.testing.assert_close(outs["half"], outs["bwd"] + 0.5 * term, rtol=1e-6, atol=1e-6)
    assert torch.equal(outs["zero"], outs["bwd"])
    for name in ("half", "zero", "bwd"):
        torch.testing.assert_close(grads[name], grads["paper"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        layer(True).defaults.set_forward_scale(1.5)
