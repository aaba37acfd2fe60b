"""Per-rank bodies of the megatron-core tests (2 gloo processes, CPU, megatron-core 0.16.1 and 0.19.2)."""

from __future__ import annotations

import functools

import torch

import torch.distributed as dist
import torch.nn.functional as F

import megatron_cpu
from default_moe import commit_defaults
from default_moe.integrations import megatron_compat as compat

H, E, K, FFN = 16, 4, 2, 32


def setup(ep=2):
    megatron_cpu.apply()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, expert_model_parallel_size=ep)
    model_parallel_cuda_manual_seed(123)


def tconfig(**kw):
    from megatron.core.transformer import TransformerConfig

    base = dict(
        num_layers=2,
        hidden_size=H,
        num_attention_heads=2,
        num_moe_experts=E,
        moe_router_topk=K,
        moe_ffn_hidden_size=FFN,
        ffn_hidden_size=FFN,
        moe_token_dispatcher_type="alltoall",
        moe_router_pre_softmax=True,
        moe_aux_loss_coeff=0.0,
        use_cpu_initialization=True,
        add_bias_linear=False,
        expert_model_parallel_size=2,
        init_method_std=0.3,
    )
    base.update(kw)
    return TransformerConfig(**base)


def build_layer(router, **kw):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from default_moe.integrations import megatron as dm

    spec = dm.patch_spec(get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False), router=router, beta=0.6)
    mlp = spec.submodules.mlp
    assert compat.moe_spec_class(mlp) is dm.DefaultMoELayer
    return compat.build_moe_layer(mlp, tconfig(**kw))


def gather_cat(t):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


# Megatron's gate forms (docs/method.md): pre-softmax (the paper), softmax over the top-k logits
# (renormalised), DeepSeek-V3's sigmoid + expert bias + renormalised x 2.5 with the term in the
# backward only (auto) and in the forward.
GATE_FORMS = {
    "pre_softmax": dict(),
    "topk_softmax": dict(moe_router_pre_softmax=False),
    "deepseek_v3": dict(
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=2.5,
        moe_router_pre_softmax=False,
        moe_router_load_balancing_type="none",
    ),
    "deepseek_v3_in_forward": dict(
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=2.5,
        moe_router_pre_softmax=False,
        moe_router_load_balancing_type="none",
    ),
    # Capacity drops (issue 36): a renormalised gate's Z counts the dropped experts, so only the
    # unselected ones' y_S is replaced; pre-softmax with drops as the unrenormalised control.
    "pre_softmax_capacity": dict(moe_expert_capacity_factor=0.5),
    "topk_softmax_capacity": dict(moe_router_pre_softmax=False, moe_expert_capacity_factor=0.5),
    "deepseek_v3_capacity_in_forward": dict(
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=2.5,
        moe_router_pre_softmax=False,
        moe_router_load_balancing_type="none",
        moe_expert_capacity_factor=0.5,
    ),
}


def layer_vs_reference(rank, world, form="pre_softmax"):
    """EP=2: output, gradients and D equal a dense float64 reference with gathered weights, for
    each of megatron's gate forms."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from default_moe.integrations import megatron as dm

    torch.manual_seed(0)
    kw = GATE_FORMS[form]
    settings = {"default_in_forward": True} if form.endswith("in_forward") else {}
    spec = dm.patch_spec(get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False), router="default", beta=0.6, **settings)
    layer = compat.build_moe_layer(spec.submodules.mlp, tconfig(**kw))
    layer.train()
    sigmoid = kw.get("moe_router_score_function") == "sigmoid"
    renorm = not kw.get("moe_router_pre_softmax", True)
    scale = kw.get("moe_router_topk_scaling_factor") or 1.0
    in_forward = not sigmoid or form.endswith("in_forward")
    bias = torch.zeros(E)
    if kw.get("moe_router_enable_expert_bias"):  # a bias that changes selections, same on both ranks
        bias = torch.tensor([0.3, -0.2, 0.0, 0.25])
        layer.router.expert_bias.copy_(bias)
    assert isinstance(layer.router, dm.DefaultTopKRouter)
    layer.router.register_forward_hook(lambda m, a, o: m.dense_probs.retain_grad())
    g = torch.Generator().manual_seed(50 + rank)
    x = torch.randn(6, 2, H, generator=g, requires_grad=True)
    g_out = torch.randn(6, 2, H, generator=g)
    with torch.no_grad():
        layer.defaults.defaults_ED.normal_(0, 0.5)  # start from nonzero defaults
        layer.defaults.defaults_ED.copy_(gather_cat(layer.defaults.defaults_ED)[:E])  # same on all ranks
    D0 = layer.defaults.defaults_ED.clone()
    out, _ = layer(x)
    (out * g_out).sum().backward()

    # Reference on the union batch (float64), with every expert run.
    W = layer.router.weight.detach().double().requires_grad_(True)
    fc1 = (
        gather_cat(torch.stack([e.linear_fc1.weight.detach() for e in layer.experts.local_experts])).double().requires_grad_(True)
    )
    fc2 = (
        gather_cat(torch.stack([e.linear_fc2.weight.detach() for e in layer.experts.local_experts])).double().requires_grad_(True)
    )
    X = gather_cat(x.detach().reshape(-1, H)).double().requires_grad_(True)
    G = gather_cat(g_out.reshape(-1, H)).double()
    logits = X @ W.t()
    probs = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, -1)
    top = torch.topk(probs + bias.double(), K, -1).indices
    chosen = torch.zeros_like(probs, dtype=torch.bool).scatter(1, top, True)
    # The routes that ran: megatron's map after its capacity drops (each rank drops over its own tokens).
    ran = gather_cat(layer.router.routing_map)
    if "moe_expert_capacity_factor" in kw:
        assert (chosen & ~ran).any() and not (ran & ~chosen).any()  # drops happened, only of selected routes
        assert torch.equal(gather_cat(layer.router.selected_map), chosen)
    else:
        assert torch.equal(ran, chosen)
    experts = torch.stack([F.gelu(X @ fc1[e].t()) @ fc2[e].t() for e in range(E)])  # [E, T, H]
    with torch.no_grad():
        counts = ran.sum(0).double()
        mean = torch.stack([experts[e][ran[:, e]].sum(0) for e in range(E)]) / counts.clamp_min(1)[:, None]
        D_ref = torch.where(counts[:, None] > 0, 0.6 * D0.double() + 0.4 * mean, D0.double())
    gates = probs * chosen
    if renorm:  # over the selected experts, dropped ones included (megatron renormalises before dropping)
        gates = gates / gates.sum(-1, keepdim=True)
    y_S = scale * ((gates * ran).t()[:, :, None] * experts).sum(0)
    w = probs / probs.sum(-1, keepdim=True)  # the dense weights: pi, or sigmoid normalised over all
    if not renorm:  # pre-softmax: y_S + s sum_{not run} pi_i D_i (committed D)
        dense = y_S + scale * (w * ~ran) @ D0.double()
    else:  # the dense mixture over all experts with D_i where expert i did not run (unselected or dropped)
        E_hat = torch.where(ran.t()[:, :, None], experts if in_forward else experts.detach(), D0.double()[:, None, :])
        dense = scale * (w.t()[:, :, None] * E_hat).sum(0)
    if in_forward:
        ref = dense
    else:  # forward y_S; the router gets the term's gradient with y_S held fixed
        extra = (w * ~ran) @ (scale * D0.double()) - (w * ~chosen).sum(-1, keepdim=True) * y_S.detach()
        ref = y_S + extra - extra.detach()
    (ref * G).sum().backward()
    T = x.shape[0] * x.shape[1]
    mine = slice(rank * T, (rank + 1) * T)
    close = functools.partial(torch.testing.assert_close, rtol=1e-4, atol=1e-5)  # fp32 vs float64
    assert torch.equal(layer.defaults.defaults_ED, D0)  # D changes only at the step
    commit_defaults(layer)
    close(layer.defaults.defaults_ED.double(), D_ref)
    close(out.detach().reshape(-1, H).double(), ref[mine].detach())
    from default_moe.defaults import ExpertDefaults

    assert "megatron DefaultMoELayer" in ExpertDefaults.callers  # through the one mechanism
    close(x.grad.reshape(-1, H).double(), X.grad[mine])
    rgrad = layer.router.weight.grad.clone()
    dist.all_reduce(rgrad)
    close(rgrad.double(), W.grad)
    ids = layer.local_expert_indices
    close(torch.stack([e.linear_fc1.weight.grad for e in layer.experts.local_experts]).double(), fc1.grad[ids])
    close(torch.stack([e.linear_fc2.weight.grad for e in layer.experts.local_experts]).double(), fc2.grad[ids])
    Dm = layer.defaults.defaults_ED
    assert torch.equal(gather_cat(Dm)[:E], gather_cat(Dm)[E:])
    if form != "pre_softmax":
        return
    # d L / d pi_j for unselected j is <dL/dy, D_j>.
    pg = layer.router.dense_probs.grad
    unsel = ~layer.router.routing_map
    close(pg[unsel].double(), (G[mine] @ D0.double().t())[unsel])

    # TopK through the same class: no defaults, no signal to unselected experts.
    torch.manual_seed(0)
    topk = build_layer("topk")
    assert topk.defaults is None
    topk.router.register_forward_hook(lambda m, a, o: m.dense_probs.retain_grad())
    xt = x.detach().clone().requires_grad_(True)
    o, _ = topk(xt)
    (o * g_out).sum().backward()
    assert topk.router.dense_probs.grad is None  # the dense softmax feeds nothing under TopK


def sparsemixer_layer_check(rank, world):
    """SparseMixer v2 in a megatron-core layer at EP=2: the output is sum_k gate_k E_{D_k}(x) over
    gathered experts, and the router gradient is SparseMixer's formula sum_k c_k m_k (delta - p_k)
    with c_k = <g, E_{D_k}(x)> (the Heun scale is forward-only)."""
    from default_moe.integrations import megatron as dm
    from default_moe.routing.sparsemixer import jitter_mask

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    torch.manual_seed(0)
    spec = dm.patch_spec(get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False), router="sparsemixer")
    layer = compat.build_moe_layer(spec.submodules.mlp, tconfig())
    assert isinstance(layer.router, dm.SparseMixerTopKRouter) and layer.router.version == "v2"
    layer.train()
    layer.router.generator = torch.Generator().manual_seed(rank)
    captured = {}
    layer.router.register_forward_hook(lambda m, a, o: captured.update(probs=o[0], rmap=o[1]))
    g = torch.Generator().manual_seed(60 + rank)
    x = torch.randn(6, 2, H, generator=g)
    g_out = torch.randn(6, 2, H, generator=g)
    out, _ = layer(x)
    (out * g_out).sum().backward()
    fc1 = gather_cat(torch.stack([e.linear_fc1.weight.detach() for e in layer.experts.local_experts]))
    fc2 = gather_cat(torch.stack([e.linear_fc2.weight.detach() for e in layer.experts.local_experts]))
    xt, gt = x.reshape(-1, H), g_out.reshape(-1, H)
    with torch.no_grad():
        experts = torch.stack([F.gelu(xt @ fc1[e].t()) @ fc2[e].t() for e in range(E)])  # [E, T, H]
        gates = captured["probs"].detach()
        ref = (gates.t()[:, :, None] * experts).sum(0)
        torch.testing.assert_close(out.reshape(-1, H), ref, rtol=1e-5, atol=1e-6)
        z = xt @ layer.router.weight.t()
        sel = captured["rmap"]
        assert (sel.sum(1) == 2).all()
        # Recover D1 (the larger-probability first-round pick is not known; use the custom
        # backward's structure instead): check the gradient by the formula for both orderings of
        # the pair, accepting the one the router used (recorded by the sampled gates' scales).
        c = torch.einsum("th,eth->te", gt, experts)  # c_te = <g_t, E_e(x_t)>
        p1 = torch.softmax(z.masked_fill(jitter_mask(z, 0.01), float("-inf")), -1)
        dz = torch.zeros_like(z)
        for t in range(z.shape[0]):
            e1, e2 = sel[t].nonzero().flatten().tolist()
            for a, b in ((e1, e2), (e2, e1)):
                m1 = p1[t, a]
                z2 = z[t].clone()
                z2[a] = float("-inf")
                p2 = torch.softmax(z2.masked_fill(jitter_mask(z2[None], 0.01)[0], float("-inf")), -1)
                m2 = p2[b]
                s1, s2 = gates[t, a] / m1, gates[t, b] / m2
                ok = lambda s: torch.isclose(s, torch.tensor(1.0)) or torch.isclose(s, torch.tensor(1 / 3))  # noqa: E731
                if m1 > 0 and m2 > 0 and ok(s1) and ok(s2):
                    dz[t] = c[t, a] * m1 * (F.one_hot(torch.tensor(a), E) - p1[t]) + c[t, b] * m2 * (
                        F.one_hot(torch.tensor(b), E) - p2
                    )
                    break
            else:
                raise AssertionError(f"token {t}: gates {gates[t]} match no SparseMixer v2 ordering")
        want = dz.t() @ xt
    torch.testing.assert_close(layer.router.weight.grad, want, rtol=1e-4, atol=1e-5)


def specs_and_install(rank, world):
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from default_moe.integrations import megatron as dm

    cfg = tconfig(num_layers=4, moe_layer_freq=[0, 1, 0, 1])
    plain = gpt_layer_specs.get_gpt_decoder_block_spec(cfg, use_transformer_engine=False)
    mlps = [compat.moe_spec_class(s.submodules.mlp) for s in plain.layer_specs]
    assert mlps[1] is MoELayer and mlps[0] is not MoELayer
    patched = dm.patch_spec(plain, router="default")
    got = [compat.moe_spec_class(s.submodules.mlp) for s in patched.layer_specs]
    assert got[1] is dm.DefaultMoELayer and got[3] is dm.DefaultMoELayer and got[0] is mlps[0] and got[2] is mlps[2]
    assert [compat.moe_spec_class(s.submodules.mlp) for s in plain.layer_specs] == mlps  # the input spec is untouched
    # functools.partial specs (megatron-core >= 0.17)
    part = functools.partial(MoELayer, submodules=compat.moe_spec_submodules(plain.layer_specs[1].submodules.mlp))
    pp = dm.patch_spec(part, router="default", beta=0.5)
    assert pp.func is dm.DefaultMoELayer and pp.keywords["default_moe"]["beta"] == 0.5
    dm.install(router="default", beta=0.8)
    try:
        inst = gpt_layer_specs.get_gpt_decoder_block_spec(cfg, use_transformer_engine=False)
        assert [compat.moe_spec_class(s.submodules.mlp) for s in inst.layer_specs] == got
        local = gpt_layer_specs.get_gpt_layer_local_spec(num_experts=E)
        assert compat.moe_spec_class(local.submodules.mlp) is dm.DefaultMoELayer
        assert compat.moe_spec_kwargs(local.submodules.mlp)["default_moe"]["beta"] == 0.8
    finally:
        dm.uninstall()
    assert compat.moe_spec_class(gpt_layer_specs.get_gpt_layer_local_spec(num_experts=E).submodules.mlp) is MoELayer
    for bad, needle in [
        ({"router": "nope"}, "router 'nope' is not available"),
        ({"router": "stablemoe"}, "MoEConfig.stablemoe.vocab_size is required"),
        ({"beta": 1.5}, "MoEConfig.beta"),
        ({"betta": 0.5}, "unknown default_moe setting"),
    ]:
        try:
            dm.patch_spec(plain, **bad)
        except ValueError as e:
            assert needle in str(e), str(e)
        else:
            raise AssertionError(bad)
    try:
        build_layer("default", moe_router_load_balancing_type="sinkhorn", moe_router_topk=1)
    except ValueError as e:
        assert "sinkhorn" in str(e), str(e)
    else:
        raise AssertionError("sinkhorn accepted")


def train_gpt(rank, world, tmpdir):
    """A tiny GPTModel trains through megatron's DDP, optimizer and schedule; checkpoint keeps D."""
    from megatron.core import dist_checkpointing
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from default_moe.integrations import megatron as dm

    # No dropout: the resume check compares losses exactly without restoring RNG streams.
    cfg = tconfig(moe_aux_loss_coeff=0.01, init_method_std=0.05, hidden_dropout=0.0, attention_dropout=0.0)
    dm.install(router="default", beta=0.9)
    try:
        spec = get_gpt_layer_local_spec(num_experts=E)
    finally:
        dm.uninstall()
    torch.manual_seed(0)
    model = GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=64, max_sequence_length=16)
    moe_layers = [m for m in model.modules() if isinstance(m, dm.DefaultMoELayer)]
    assert len(moe_layers) == 2
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(), model)
    cfg.finalize_model_grads_func = finalize_model_grads
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=3e-3, clip_grad=0.0), [ddp])
    g = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, 64, (2, 16), generator=g)
    labels = torch.roll(tokens, -1, 1)
    pos = torch.arange(16).unsqueeze(0).expand(2, 16)

    def step_fn(data_iterator, model_chunk):
        out = model_chunk(tokens, pos, None, labels=labels)

        def loss_fn(output):
            loss = output.float().mean()
            return loss, {"loss": loss.detach()}

        return out, loss_fn

    fb = get_forward_backward_func()

    def run_steps(ddp_model, optimizer, n):
        losses = []
        for _ in range(n):
            ddp_model.zero_grad_buffer()
            optimizer.zero_grad()
            res = fb(
                forward_step_func=step_fn,
                data_iterator=iter([None]),
                model=[ddp_model],
                num_microbatches=1,
                seq_length=16,
                micro_batch_size=2,
                forward_only=False,
            )
            optimizer.step()
            mean = res[0]["loss"].clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / world)
        return losses

    losses = run_steps(ddp, opt, 8)
    assert losses[-1] < losses[0] - 0.05, losses
    for layer in moe_layers:
        Dm = layer.defaults.defaults_ED
        assert Dm.abs().sum() > 0 and torch.equal(gather_cat(Dm)[:E], gather_cat(Dm)[E:])
        assert layer.defaults.num_updates == 8

    sd = model.sharded_state_dict()
    keys = [k for k in sd if k.endswith("defaults.defaults_ED")]
    assert len(keys) == 2, [k for k in sd if "default" in k]
    dist_checkpointing.save(sd, tmpdir)
    torch.save(opt.state_dict(), f"{tmpdir}/optim_rank{rank}.pt")
    saved = [lyr.defaults.defaults_ED.clone() for lyr in moe_layers]
    uninterrupted = run_steps(ddp, opt, 3)

    # Resume: a fresh model (other seed) + optimizer, loaded, continues with identical losses.
    torch.manual_seed(5)
    dm.install(router="default", beta=0.9)
    try:
        model2 = GPTModel(
            config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(num_experts=E), vocab_size=64, max_sequence_length=16
        )
    finally:
        dm.uninstall()
    loaded = dist_checkpointing.load(model2.sharded_state_dict(), tmpdir)
    model2.load_state_dict(loaded)
    got = [m.defaults.defaults_ED for m in model2.modules() if isinstance(m, dm.DefaultMoELayer)]
    assert all(torch.equal(a, b) for a, b in zip(got, saved))
    ddp2 = DistributedDataParallel(cfg, DistributedDataParallelConfig(), model2)
    opt2 = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=3e-3, clip_grad=0.0), [ddp2])
    opt2.load_state_dict(torch.load(f"{tmpdir}/optim_rank{rank}.pt", weights_only=False))
    resumed = run_steps(ddp2, opt2, 3)
    assert resumed == uninterrupted, f"megatron resume {resumed} vs uninterrupted {uninterrupted}"
    # Plain state_dict round trip too.
    assert all(k in model.state_dict() for k in keys)


def token_routers(rank, world):
    """hash and StableMoE inside megatron-core GPTModels: token ids captured from the model input."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from default_moe.integrations import megatron as dm
    from default_moe.routing.hash import hash_experts

    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(rank))
    pos = torch.arange(16).unsqueeze(0).expand(2, 16)
    for router, extra, topk in [("hash", {}, 2), ("stablemoe", {"stablemoe": {"vocab_size": 64, "stage2_step": 2}}, 1)]:
        dm.install(router=router, **extra)
        try:
            spec = get_gpt_layer_local_spec(num_experts=E)
        finally:
            dm.uninstall()
        torch.manual_seed(0)
        model = GPTModel(config=tconfig(moe_router_topk=topk), transformer_layer_spec=spec, vocab_size=64, max_sequence_length=16)
        dm.capture_token_ids(model)
        layers = [m for m in model.modules() if isinstance(m, dm.DefaultMoELayer)]
        assert all(isinstance(lyr.router, dm.TokenIdTopKRouter) for lyr in layers)
        for step in range(3):
            out = model(tokens, pos, None, labels=torch.roll(tokens, -1, 1))
            out.float().mean().backward()
            assert torch.isfinite(out).all()
            if router == "hash":
                want = torch.zeros(32, E, dtype=torch.bool).scatter(1, hash_experts(tokens.t().reshape(-1), E, 2), True)
                assert all(torch.equal(lyr.router.routing_map, want) for lyr in layers)
            else:
                r = layers[0].router
                assert int(r.num_steps) == step + 1
                if step == 0:  # stage 1 trains the distilled router
                    assert r.distill.emb.weight.grad is not None and r.distill.emb.weight.grad.abs().sum() > 0
        if router == "stablemoe":  # stage 2: routing is the distilled router's argmax
            r = layers[0].router
            with torch.no_grad():
                want = r.distill(tokens.t().reshape(-1)).argmax(-1)
            assert torch.equal(r.routing_map.float().argmax(-1), want)
    # Backwards outside megatron's schedule leave its aux-loss scale as a 0-d tensor; the schedule
    # (train_gpt below) sets a [1] tensor into it, so start it afresh as megatron would.
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.main_loss_backward_scale = None


def recompute_check(rank, world):
    """The step contract in the megatron adapter (EP 2): three forwards under activation
    checkpointing, then their backwards oldest first, give exactly the gradients and D (committed
    after them) of the same run without recompute."""
    import torch.utils.checkpoint

    results = {}
    for recompute in (False, True):
        torch.manual_seed(0)
        layer = build_layer("default")
        layer.train()
        g = torch.Generator().manual_seed(40 + rank)
        outs = []
        for _ in range(3):
            x = torch.randn(6, 2, H, generator=g, requires_grad=True)

            def run(t, layer=layer):
                return layer(t)[0]

            out = torch.utils.checkpoint.checkpoint(run, x, use_reentrant=True) if recompute else run(x)
            outs.append((x, out, torch.randn(6, 2, H, generator=g)))
        got = []
        for x, out, g_out in outs:
            layer.zero_grad(set_to_none=True)
            (out * g_out).sum().backward()
            got.append([x.grad.clone()] + [p.grad.clone() for p in layer.parameters() if p.grad is not None])
        assert layer.defaults.pending == 3
        commit_defaults(layer)
        results[recompute] = (got, layer.defaults.defaults_ED.clone())
        assert layer.defaults.defaults_ED.abs().sum() > 0
    for a, b in zip(results[False][0], results[True][0]):
        assert len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b)), "recompute changed the gradients"
    assert torch.equal(results[False][1], results[True][1])


def settings_and_padding(rank, world):
    """Megatron settings that change what the gates mean are refused by name, or made consistent
    (topk scaling); padding_mask keeps padded tokens out of the EMA without changing outputs."""
    from default_moe.integrations import megatron as dm

    for attr, value, words in (
        ("moe_router_load_balancing_type", "sinkhorn", "sinkhorn"),
        ("moe_router_padding_for_quantization", True, "moe_router_padding_for_quantization"),
        ("moe_router_padding_for_fp8", True, "moe_router_padding_for_fp8"),
        ("cuda_graph_impl", "local", "CUDA graphs over the router"),
    ):
        cfg = tconfig()
        setattr(cfg, attr, value)  # past TransformerConfig's own checks: our refusal is what is tested
        try:
            dm.check_megatron_config(cfg)
        except ValueError as e:
            assert words in str(e), str(e)
        else:
            raise AssertionError(f"{attr}={value!r} was accepted")
    cfg = tconfig()
    cfg.cuda_graph_impl, cfg.cuda_graph_scope = "local", ["attn"]
    dm.check_megatron_config(cfg)  # an attention-only graph scope is fine

    def pair(**kw):
        torch.manual_seed(0)
        layer = build_layer("default", **kw)
        with torch.no_grad():
            layer.defaults.defaults_ED.copy_(torch.randn(E, H, generator=torch.Generator().manual_seed(3)))
        return layer

    x = torch.randn(6, 2, H, generator=torch.Generator().manual_seed(70 + rank))
    plain, scaled = pair(), pair(moe_router_topk_scaling_factor=2.0)
    torch.testing.assert_close(scaled(x)[0], 2.0 * plain(x)[0], rtol=1e-6, atol=1e-6)  # routed and default term alike

    padded, unpadded, alone = pair(), pair(), pair()
    pad = torch.zeros(2, 6, dtype=torch.bool)  # [B, S]; megatron's router reads True as padding
    pad[0, 4:] = True
    xg = x.clone().requires_grad_(True)
    out_p = padded(xg, padding_mask=pad)[0]
    out_p.sum().backward()
    xu = x.clone().requires_grad_(True)
    out_u = unpadded(xu)[0]
    out_u.sum().backward()
    assert torch.equal(out_p, out_u) and torch.equal(xg.grad, xu.grad), "the padding mask changed outputs or gradients"
    assert torch.equal(padded.router.weight.grad, unpadded.router.weight.grad)
    for part in (x[:4, 0:1], x[:, 1:2]):  # the real tokens alone, as two forwards
        alone(part)[0].sum().backward()
    commit_defaults([padded, unpadded, alone])
    torch.testing.assert_close(padded.defaults.defaults_ED, alone.defaults.defaults_ED, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(unpadded.defaults.defaults_ED, alone.defaults.defaults_ED)


def deepseek_v3_routing_equals_megatron(rank, world):
    """Our router with DeepSeek-V3's settings (sigmoid, expert bias, 4 groups / 2 per token,
    renormalised top-4 gates x 2.5) equals megatron-core's TopKRouter on the same weights: gates,
    selected experts, and the expert bias over 3 steps (counts over both ranks)."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection, get_updated_expert_bias
    from megatron.core.transformer.moe.router import TopKRouter

    from default_moe import MoEConfig, MoELayer

    E8, K4, rate = 8, 4, 0.01
    cfg = tconfig(
        num_moe_experts=E8,
        moe_router_topk=K4,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=rate,
        moe_router_num_groups=4,
        moe_router_group_topk=2,
        moe_router_topk_scaling_factor=2.5,
        moe_router_load_balancing_type="none",
        moe_router_pre_softmax=False,
        expert_model_parallel_size=1,
    )
    torch.manual_seed(0)
    theirs = TopKRouter(config=cfg, pg_collection=get_default_pg_collection(), **compat.router_kwargs(False))
    ours = MoELayer(
        MoEConfig(
            hidden_size=H,
            num_experts=E8,
            ffn_hidden_size=FFN,
            top_k=K4,
            router="topk",
            score_function="sigmoid",
            normalize_topk=True,
            route_scale=2.5,
            expert_bias=True,
            expert_bias_update_rate=rate,
            num_expert_groups=4,
            group_topk=2,
            aux_loss_coeff=0.0,
        )
    )
    with torch.no_grad():
        ours.router.weight.copy_(theirs.weight)
    opt = torch.optim.SGD(ours.parameters(), lr=0.0)
    g = torch.Generator().manual_seed(90 + rank)
    for step in range(3):
        x = torch.randn(6, 2, H, generator=g)
        probs, routing_map = theirs(x)
        route = ours.router(x.reshape(-1, H), ours.groups)
        got = torch.zeros(12, E8).scatter(1, route.idx_TK, route.gates_TK)
        assert torch.equal(torch.zeros(12, E8, dtype=torch.bool).scatter(1, route.idx_TK, True), routing_map), step
        torch.testing.assert_close(got, probs.float(), rtol=1e-6, atol=1e-7)
        ours(x.reshape(-1, H)).sum().backward()  # the counts land when the backward reaches the router
        with torch.no_grad():  # what megatron's finalize_model_grads does once per step
            theirs.expert_bias.copy_(get_updated_expert_bias(theirs.local_tokens_per_expert, theirs.expert_bias, rate))
            theirs.local_tokens_per_expert.zero_()
        opt.step()
        torch.testing.assert_close(ours.router.expert_bias.expert_bias_E, theirs.expert_bias.float(), rtol=0, atol=0)
    assert ours.router.expert_bias.expert_bias_E.abs().sum() > 0


def all_checks(rank, world, tmpdir):
    setup()
    deepseek_v3_routing_equals_megatron(rank, world)
    for form in GATE_FORMS:
        layer_vs_reference(rank, world, form)
    settings_and_padding(rank, world)
    recompute_check(rank, world)
    sparsemixer_layer_check(rank, world)
    specs_and_install(rank, world)
    token_routers(rank, world)
    train_gpt(rank, world, tmpdir)
