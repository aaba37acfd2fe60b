"""torchtitan 0.3.0 with Default MoE by one override (default_moe.integrations.torchtitan), on 2
gloo CPU ranks through torchtitan's own trainer (tests/torchtitan_worker.py; CPU shims in
launch/torchtitan_cpu.py). A tiny Qwen3-MoE (tests/torchtitan_configs.py) and the stock
`deepseek_v3_debugmodel`; MoE weights distinct on every shard. DeepSeek-V3's sigmoid gate
(route_norm, route_scale 2.5, group-limited) at the module level against the float64 derivation."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchtitan")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OVERRIDE = "default_moe.integrations.torchtitan.default_moe"
TINY = ["--module", "torchtitan_configs", "--config", "tiny_qwen3_moe", "--debug.seed", "7"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A 2000-token BPE tokenizer and a JSONL text file, both from the shipped corpus."""
    import lzma
    from importlib import resources

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = tmp_path_factory.mktemp("titan_assets")
    text = lzma.open(str(resources.files("default_moe") / "data" / "pydocs.txt.xz"), "rt").read()[:300_000]
    chunks = [text[i : i + 1500] for i in range(0, len(text), 1500)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(chunks, trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|endoftext|>"]))
    (out / "tok").mkdir()
    tok.save(str(out / "tok" / "tokenizer.json"))
    (out / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}))
    (out / "data").mkdir()
    with open(out / "data" / "train.jsonl", "w") as f:
        for c in chunks:
            f.write(json.dumps({"text": c}) + "\n")
    return out


def run(assets, out: Path, *flags, check_ema=False, overrides=(), subcommand=None, timeout=300):
    out.mkdir(parents=True, exist_ok=True)
    imports = ["torchtitan_cpu.cpu_attention", *overrides]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "tests/torchtitan_worker.py",
        "--out",
        str(out),
        *(["--check-ema"] if check_ema else []),
        "--",
        "--hf-assets-path",
        str(assets / "tok"),
        "--dataloader.dataset-path",
        str(assets / "data"),
        "--dump-folder",
        str(out / "dump"),
        *flags,
        "--override.imports",
        *imports,
        *([subcommand] if subcommand else []),
    ]  # tyro: a subcommand comes last
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT / "launch"), str(ROOT / "plugin")]),
    }
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


def default(**settings):
    return f"{OVERRIDE}={json.dumps(settings)}"


def unwrapped(defaults):
    """Layer names without the activation-checkpoint wrapper's part."""
    return {k.replace("._checkpoint_wrapped_module", ""): v for k, v in defaults.items()}


def same_d_on_ranks(results):
    (a, b) = results
    assert a["defaults"].keys() == b["defaults"].keys() and a["defaults"]
    for name in a["defaults"]:
        assert torch.equal(a["defaults"][name], b["defaults"][name]), f"{name}: D differs between ranks"
        assert a["defaults"][name].abs().sum() > 0, f"{name}: D is zero"


@pytest.mark.distributed
def test_torchtitan_override_fsdp_ep_checkpointing_and_resume(assets, tmp_path):
    # topk (or no override) is torchtitan exactly.
    stock = run(assets, tmp_path / "stock", *TINY)
    topk = run(assets, tmp_path / "topk", *TINY, overrides=[default(router="topk")])
    assert stock[0]["steps"] == topk[0]["steps"] and not topk[0]["defaults"]
    # default, FSDP (EP 1), torchtitan's default selective activation checkpointing, a DCP
    # checkpoint at step 2: trains, D identical on both ranks, the EMA equals float64.
    ckpt = ["--checkpoint.enable", "--checkpoint.interval", "2"]
    fsdp = run(assets, tmp_path / "fsdp", *TINY, *ckpt, check_ema=True, overrides=[default(beta=0.5)])
    assert all(torch.isfinite(torch.tensor([loss for _, loss, _ in fsdp[0]["steps"]])))
    assert fsdp[0]["steps"][0] == stock[0]["steps"][0]  # step 1 at D = 0: torchtitan's (renormalised gate)
    assert fsdp[0]["steps"] != stock[0]["steps"]
    assert fsdp[0]["types"] == ["DefaultMoE", "DefaultMoE"]
    same_d_on_ranks(fsdp)
    assert all(u == 4 for u in fsdp[0]["updates"].values()), fsdp[0]["updates"]  # one commit per step
    for r in fsdp:
        assert r["ema"]["changed"] and r["ema"]["experts_seen"] == 8 and r["ema"]["max_rel_err"] < 2e-2, r["ema"]
    # Activation checkpointing full and none: the same losses, grad norms and D as selective.
    for mode in ("full", "none"):
        other = run(
            assets, tmp_path / f"ac_{mode}", *TINY, overrides=[default(beta=0.5)], subcommand=f"activation-checkpoint:{mode}"
        )
        assert other[0]["steps"] == fsdp[0]["steps"], mode
        assert unwrapped(other[0]["defaults"]).keys() == unwrapped(fsdp[0]["defaults"]).keys()
        for name, d in unwrapped(fsdp[0]["defaults"]).items():
            assert torch.equal(unwrapped(other[0]["defaults"])[name], d), (mode, name)
    # Killed after the step-2 checkpoint (the step-4 one removed), resumed with the same command:
    # steps 3-4 and D equal the uninterrupted run.
    part = tmp_path / "resume"
    shutil.copytree(
        tmp_path / "fsdp" / "dump" / "checkpoint",
        part / "dump" / "checkpoint",
        ignore=lambda d, names: [n for n in names if n == "step-4"],
    )
    resumed = run(assets, part, *TINY, *ckpt, overrides=[default(beta=0.5)])
    assert resumed[0]["steps"] == fsdp[0]["steps"][2:], (resumed[0]["steps"], fsdp[0]["steps"])
    for name, d in fsdp[0]["defaults"].items():
        assert torch.equal(resumed[0]["defaults"][name], d), name
    # Expert parallelism 2: the same checks.
    ep = run(
        assets,
        tmp_path / "ep2",
        *TINY,
        "--parallelism.expert-parallel-degree",
        "2",
        "--training.disable-cuda-graphs",
        check_ema=True,
        overrides=[default(beta=0.5)],
    )
    same_d_on_ranks(ep)
    for r in ep:
        assert r["ema"]["changed"] and r["ema"]["experts_seen"] == 8 and r["ema"]["max_rel_err"] < 2e-2, r["ema"]


@pytest.mark.distributed
def test_torchtitan_stock_deepseek_v3_debugmodel_ep2(assets, tmp_path):
    """The stock config (in torchtitan 0.3.0: a softmax router without route_norm, route_scale 1,
    shared expert, expert bias) with the override at EP 2 trains, D identical on both ranks. The
    sigmoid, renormalised, scaled gate of its real DeepSeek-V3 configs: the module-level test below."""
    flags = [
        "--module",
        "deepseek_v3",
        "--config",
        "deepseek_v3_debugmodel",
        "--debug.seed",
        "3",
        "--training.seq-len",
        "64",
        "--training.local-batch-size",
        "2",
        "--training.steps",
        "3",
        "--parallelism.expert-parallel-degree",
        "2",
        "--training.disable-cuda-graphs",
    ]
    mine = run(assets, tmp_path / "dsv3", *flags, overrides=[default()], timeout=600)
    assert all(torch.isfinite(torch.tensor([loss for _, loss, _ in mine[0]["steps"]])))
    same_d_on_ranks(mine)
    assert set(mine[0]["types"]) == {"DefaultMoE"}


def test_torchtitan_settings_refused_before_training():
    from default_moe.integrations import torchtitan as tt

    with pytest.raises(ValueError, match="router must be one of"):
        tt.check_settings({"router": "hash"})
    with pytest.raises(ValueError, match="ema_weighting must be 'mean'"):
        tt.check_settings({"ema_weighting": "prob"})
    with pytest.raises(ValueError, match="unknown setting"):
        tt.check_settings({"betta": 0.5})
    with pytest.raises(ValueError, match="MoEConfig.beta"):
        tt.check_settings({"beta": 1.5})


def test_torchtitan_sigmoid_renormalised_scaled_gate_matches_the_float64_derivation():
    """The gate torchtitan's real DeepSeek-V3 configs use (sigmoid scores, route_norm, route_scale
    2.5, group-limited selection; the stock debugmodel is softmax without route_norm) through the
    override, at the module level: the output (term out of the forward: sigmoid auto) and the
    router gradient equal the float64 derivation over torchtitan's own expert outputs, and D is
    committed once per optimizer step (two steps) to the mean of the routed tokens' outputs."""
    import functools

    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import GroupedExperts, MoE, RoutedExperts, TokenChoiceTopKRouter
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    from default_moe.integrations import torchtitan as titan

    E, Dm, F, K, T, beta, scale = 8, 16, 24, 4, 40, 0.7, 2.5
    normal = functools.partial(torch.nn.init.normal_, std=0.3)
    cfg = MoE.Config(
        num_experts=E,
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(
                dim=Dm, hidden_dim=F, num_experts=E, param_init={"w1_EFD": normal, "w2_EDF": normal, "w3_EFD": normal}
            ),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=E, top_k=K),
        ),
        router=TokenChoiceTopKRouter.Config(
            num_experts=E,
            gate=Linear.Config(in_features=Dm, out_features=E, bias=False, param_init={"weight": normal}),
            top_k=K,
            score_func="sigmoid",
            route_norm=True,
            route_scale=scale,
            num_expert_groups=4,
            num_limited_groups=2,
        ),
    )
    torch.manual_seed(0)
    moe = titan.default_moe(cfg, beta=beta).build()
    moe.init_states(buffer_device=torch.device("cpu"))
    assert isinstance(moe, titan.DefaultMoE) and not moe.defaults.default_in_forward
    opt = torch.optim.SGD(moe.parameters(), lr=0.0)
    g = torch.Generator().manual_seed(3)
    D_ref = torch.zeros(E, Dm, dtype=torch.float64)
    for step in range(2):
        x = torch.randn(1, T, Dm, generator=g)
        g_out = torch.randn(1, T, Dm, generator=g)
        with torch.no_grad():  # torchtitan's own expert outputs, every expert for every token (its bf16 GEMMs)
            inner = moe.routed_experts.inner_experts
            experts = torch.stack(
                [inner(x[0], torch.zeros(E, dtype=torch.long).index_fill_(0, torch.tensor([e]), T)) for e in range(E)]
            ).double()  # [E, T, D]
        opt.zero_grad()
        out = moe(x)
        (out * g_out).sum().backward()
        W = moe.router.gate.weight.detach().double().requires_grad_(True)
        a = torch.sigmoid(x[0].double() @ W.t())  # [T, E]
        grouped = a.detach().view(T, 4, 2)
        best = grouped.topk(2, -1).values.sum(-1).topk(2, -1).indices  # torchtitan's group rule: top-2 sum per group
        allowed = torch.zeros(T, 4, dtype=torch.bool).scatter(1, best, True).repeat_interleave(2, 1)
        idx = a.detach().masked_fill(~allowed, -1.0).topk(K, -1).indices
        chosen = torch.zeros(T, E, dtype=torch.bool).scatter(1, idx, True)
        gates = a * chosen / (a * chosen).sum(-1, keepdim=True) * scale
        y_S = (gates.t()[:, :, None] * experts).sum(0)
        w = a / a.sum(-1, keepdim=True)
        has_D = D_ref.ne(0).any(1)
        wn = w * ~chosen * has_D  # experts without a committed D keep the renormalisation's default
        term = wn @ (scale * D_ref) - wn.sum(-1, keepdim=True) * y_S.detach()
        ref = y_S + term - term.detach()  # sigmoid: the term's gradient only (auto)
        (ref * g_out[0].double()).sum().backward()
        torch.testing.assert_close(out[0].double(), ref.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(moe.router.gate.weight.grad.double(), W.grad, rtol=1e-4, atol=1e-5)
        assert moe.defaults.num_updates == step
        opt.step()  # commits D once
        assert moe.defaults.num_updates == step + 1
        counts = chosen.sum(0)
        mean = (chosen.t().double()[:, :, None] * experts).sum(1) / counts.clamp_min(1)[:, None]
        # A renormalised gate's D starts at the first mean (not beta * 0 + ...).
        new = torch.where(has_D[:, None], beta * D_ref + (1 - beta) * mean, mean)
        D_ref = torch.where(counts[:, None] > 0, new, D_ref)
        torch.testing.assert_close(moe.defaults.defaults_ED.double(), D_ref, rtol=1e-4, atol=1e-5)
    assert D_ref.ne(0).any(1).sum() >= E - 1
