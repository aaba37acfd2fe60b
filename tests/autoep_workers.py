"""Per-rank bodies of the AutoEP tests: a tiny random HF Mixtral (and Qwen3-MoE) on 2 processes."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

import default_moe.integrations.deepspeed as dm_ds
from default_moe import commit_defaults

H, E, K, V = 64, 4, 2, 256


def mixtral(seed=0, top_k=K):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=E,
        num_experts_per_tok=top_k,
        max_position_embeddings=64,
    )
    cfg._attn_implementation = "eager"
    return MixtralForCausalLM(cfg)


def qwen3_moe(seed=0):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=128,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=E,
        num_experts_per_tok=K,
        max_position_embeddings=64,
        head_dim=16,
    )
    cfg._attn_implementation = "eager"
    return Qwen3MoeForCausalLM(cfg)


def config(stage, section, preset="mixtral", gas=1):
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": gas,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.0, "torch_adam": True}},
        "gradient_clipping": 0.0,
        "steps_per_print": 10_000,
        "expert_parallel": {"enabled": True, "autoep_size": 2, "preset_model": preset},
    }
    if section is not None:
        cfg["default_moe"] = section
    return cfg


def train(engine, steps, first=0):
    out = []
    for step in range(first, first + steps):
        g = torch.Generator().manual_seed(100 * step + dist.get_rank())
        ids = torch.randint(0, V, (2, 24), generator=g)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        out.append(mean.item() / dist.get_world_size())
    return out


def moe_layers(model):
    return [m for m in model.modules() if hasattr(m, "_default_moe")]


def dense_check(engine, rank, world, beta):
    """One converted layer's forward == Default MoE written out with every expert computed."""
    layer = moe_layers(engine.module)[0]
    layer.train()
    w = {}
    for name in ("w1", "w2", "w3"):
        local = getattr(layer.experts, name).detach()
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local)
        w[name] = torch.cat(parts)  # global expert order: rank-major
    D_before = layer.defaults.defaults_ED.clone()
    x = torch.randn(1, 30, H, generator=torch.Generator().manual_seed(7 + rank), requires_grad=True)
    out = layer(x)
    out = out[0] if isinstance(out, tuple) else out
    torch.autograd.backward(out.sum(), inputs=[x])  # reaches the layer; leaves the engine's gradients alone
    assert torch.equal(layer.defaults.defaults_ED, D_before)  # D changes only at the step
    commit_defaults(layer)
    with torch.no_grad():
        xt = x[0].detach()
        probs = torch.softmax(xt @ layer.router.gate.weight.t(), -1)
        sel = torch.topk(probs, K, dim=-1).indices
        chosen = torch.zeros_like(probs, dtype=torch.bool).scatter(1, sel, True)
        experts = torch.stack([(F.silu(xt @ w["w1"][e].t()) * (xt @ w["w3"][e].t())) @ w["w2"][e].t() for e in range(E)])
        sums = torch.stack([experts[e][chosen[:, e]].sum(0) for e in range(E)])
        counts = chosen.sum(0).float()
        dist.all_reduce(sums), dist.all_reduce(counts)
        mean = sums / counts.clamp_min(1)[:, None]
        D_ref = torch.where(counts[:, None] > 0, beta * D_before + (1 - beta) * mean, D_before)
        ref = ((probs * chosen).t()[:, :, None] * experts).sum(0) + (probs * ~chosen) @ D_before
    torch.testing.assert_close(layer.defaults.defaults_ED, D_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.reshape(30, H), ref, rtol=1e-4, atol=1e-5)
    from default_moe.defaults import ExpertDefaults

    assert "DefaultAutoEPMoELayer" in ExpertDefaults.callers  # through the one mechanism


def deepseek_v3_check(rank, world):
    """DeepSpeed's DeepSeek-V3 preset (sigmoid scores, route_norm, routed_scaling_factor, shared
    expert) under Default MoE: trains, D identical on both ranks, and with the term in the forward
    one layer's routed output equals the dense mixture over all experts, sum_i w_i E^_i times the
    route scale (w = sigmoid normalised over all experts, E^_i = D_i where expert i did not run;
    docs/method.md), computed here with every expert."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from default_moe.defaults import GateForm

    torch.manual_seed(0)
    ds3 = DeepseekV3ForCausalLM(
        DeepseekV3Config(
            vocab_size=V,
            hidden_size=H,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_hidden_layers=2,
            first_k_dense_replace=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_routed_experts=E,
            num_experts_per_tok=K,
            n_group=1,
            topk_group=1,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            n_shared_experts=1,
            routed_scaling_factor=2.5,
        )
    )
    section = {"enabled": True, "router": "default", "normalize_topk": True, "default_in_forward": True, "beta": 0.5}
    e, *_ = dm_ds.initialize(model=ds3, config=config(1, section, preset="deepseek_v3"))
    layer = moe_layers(ds3)[0]
    assert layer.defaults.gate == GateForm("sigmoid", True, 2.5), layer.defaults.gate
    losses = train(e, 2)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    D = layer.defaults.defaults_ED
    parts = [torch.empty_like(D) for _ in range(world)]
    dist.all_gather(parts, D)
    assert D.ne(0).any(dim=1).all() and torch.equal(parts[0], parts[1])  # every expert has its D
    w = {}
    for name in ("w1", "w2", "w3"):
        local = getattr(layer.experts, name).detach()
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local)
        w[name] = torch.cat(gathered)
    captured = {}
    hook = layer.router.register_forward_hook(lambda mod, a, o: captured.update(idx=o[1]))
    x = torch.randn(1, 20, H, generator=torch.Generator().manual_seed(11 + rank))
    layer.train()
    with torch.no_grad():
        out = layer(x)
    hook.remove()
    out = out[0] if isinstance(out, tuple) else out
    with torch.no_grad():
        xt = x[0].double()
        scores = torch.sigmoid(xt @ layer.router.gate.weight.double().t())
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter(1, captured["idx"].long(), True)
        experts = torch.stack(
            [(F.silu(xt @ w["w1"][e].double().t()) * (xt @ w["w3"][e].double().t())) @ w["w2"][e].double().t() for e in range(E)]
        )
        wts = scores / scores.sum(-1, keepdim=True)
        E_hat = torch.where(chosen.t()[:, :, None], experts, D.double()[:, None, :])
        ref = 2.5 * (wts.t()[:, :, None] * E_hat).sum(0) + layer.shared_experts(x[0]).double()
    torch.testing.assert_close(out.reshape(20, H).double(), ref, rtol=1e-4, atol=1e-5)


def all_checks(rank: int, world: int, tmpdir: str) -> None:
    import deepspeed

    dm_ds.skip_cpu_jit_builds()
    plain = deepspeed.initialize
    section = {"enabled": True, "router": "default", "beta": 0.8}

    try:
        dm_ds.initialize(model=mixtral(), config=config(1, {"enabled": True, "top_k": 2}))
    except ValueError as e:
        assert "do not apply to AutoEP layers" in str(e), str(e)
    else:
        raise AssertionError("top_k accepted for AutoEP")

    e_plain, *_ = plain(model=mixtral(), config=config(1, None))
    base = train(e_plain, 3)
    e_off, *_ = dm_ds.initialize(model=mixtral(), config=config(1, {"enabled": False}))
    assert train(e_off, 3) == base
    e_topk, *_ = dm_ds.initialize(model=mixtral(), config=config(1, {"enabled": True, "router": "topk"}))
    assert train(e_topk, 3) == base

    for stage in (1, 2):
        m = mixtral()
        e, *_ = dm_ds.initialize(model=m, config=config(stage, section))
        layers = moe_layers(m)
        assert len(layers) == 2 and all(lyr.defaults.defaults_ED.shape == (E, H) for lyr in layers)
        losses = train(e, 3)
        assert all(torch.isfinite(torch.tensor(losses))) and losses != base, (losses, base)
        for lyr in layers:
            Dm = lyr.defaults.defaults_ED
            got = [torch.empty_like(Dm) for _ in range(world)]
            dist.all_gather(got, Dm)
            assert Dm.abs().sum() > 0 and all(torch.equal(g, Dm) for g in got)
        if stage == 1:
            dense_check(e, rank, world, beta=0.8)
            e.save_checkpoint(f"{tmpdir}/autoep")
            saved = [lyr.defaults.defaults_ED.clone() for lyr in layers]
            cont = train(e, 2, first=3)
            m2 = mixtral(seed=4)
            e2, *_ = dm_ds.initialize(model=m2, config=config(1, section))
            e2.load_checkpoint(f"{tmpdir}/autoep")
            assert all(torch.equal(lyr.defaults.defaults_ED, s) for lyr, s in zip(moe_layers(m2), saved))
            resumed = train(e2, 2, first=3)
            assert all(abs(a - b) <= 1e-6 * abs(b) for a, b in zip(resumed, cont)), (resumed, cont)

    # SparseMixer v2 (Mixtral is top-2): trains, AutoEP's router is re-routed, losses differ.
    m = mixtral()
    e, *_ = dm_ds.initialize(model=m, config=config(1, {"enabled": True, "router": "sparsemixer"}))
    sm = train(e, 3)
    assert all(torch.isfinite(torch.tensor(sm))) and sm != base
    layer = moe_layers(m)[0]
    assert layer.moe_config.router == "sparsemixer" and layer.defaults is None
    layer.eval()
    x = torch.randn(1, 12, H)
    with torch.no_grad():
        top_scores, idx, _ = layer.router(x[0])
        probs = torch.softmax(x[0] @ layer.router.gate.weight.t(), -1)
    assert torch.equal(idx, torch.topk(probs, 2, -1).indices)  # eval: deterministic argmax picks
    layer.train()
    # Token-id routers under AutoEP: ids recorded from the HF model's input_ids.
    from default_moe.routing.hash import hash_experts

    m = mixtral()
    e, *_ = dm_ds.initialize(model=m, config=config(1, {"enabled": True, "router": "hash"}))
    assert all(torch.isfinite(torch.tensor(train(e, 2))))
    ids = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(9))
    layer = moe_layers(m)[0]
    captured = {}
    hook = layer.router.register_forward_hook(lambda mod, a, o: captured.update(idx=o[1]))
    with torch.no_grad():
        e.module(input_ids=ids)
    hook.remove()
    assert torch.equal(captured["idx"], hash_experts(ids.reshape(-1), E, K))

    m = mixtral(top_k=1)  # StableMoE is top-1; vocab_size comes from the HF config
    e, *_ = dm_ds.initialize(model=m, config=config(1, {"enabled": True, "router": "stablemoe", "stablemoe": {"stage2_step": 2}}))
    layer = moe_layers(m)[0]
    w0 = layer.distill.emb.weight.detach().clone()
    losses = train(e, 3)
    assert all(torch.isfinite(torch.tensor(losses))) and int(layer.num_steps) == 3
    assert layer.distill.emb.weight.shape == (V, 50)
    assert not torch.equal(layer.distill.emb.weight, w0)  # stage 1 trained the distilled router

    deepseek_v3_check(rank, world)

    # StableMoE's stage-1 losses reach backward through AuxLossAutoScaler: with gradient
    # accumulation 2 they get the engine's 1/2 like the main loss (the distilled router's
    # gradient comes from them alone).
    grads = {}
    for gas in (1, 2):
        m = mixtral(top_k=1)
        e, *_ = dm_ds.initialize(
            model=m, config=config(0, {"enabled": True, "router": "stablemoe", "stablemoe": {"stage2_step": 100}}, gas=gas)
        )
        ids = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(7 + rank))
        e.backward(e(input_ids=ids, labels=ids).loss)
        g = moe_layers(m)[0].distill.emb.weight.grad.clone()
        if gas == 2:  # not an accumulation boundary: the engine has not averaged over ranks yet
            dist.all_reduce(g)
            g /= world
        grads[gas] = g
    assert grads[1].abs().sum() > 0
    torch.testing.assert_close(grads[2], grads[1] / 2, rtol=1e-6, atol=0)

    try:
        from transformers import Qwen3MoeForCausalLM  # noqa: F401
    except ImportError:
        return
    m = qwen3_moe()
    e, *_ = dm_ds.initialize(model=m, config=config(1, section, preset="qwen3_moe"))
    losses = train(e, 2)
    assert len(moe_layers(m)) == 2 and all(torch.isfinite(torch.tensor(losses)))
