"""Per-rank bodies of the tests that convert DeepSpeed's own MoE layers (2 gloo processes)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import default_moe.integrations.deepspeed as dm_ds
from default_moe import commit_defaults
from default_moe.integrations import deepspeed_moe
from ds_workers import assert_losses, ds_config, train_engine

D_IN, D, E, D_OUT = 8, 16, 4, 4


class DSMoEModel(nn.Module):
    """Linear -> deepspeed.moe.layer.MoE (residual) -> Linear; MSE + 0.01 * l_aux."""

    def __init__(self, seed=0, k=1, ep_size=2, sampling=True):
        super().__init__()
        from deepspeed.moe.layer import MoE

        torch.manual_seed(seed)
        self.inp = nn.Linear(D_IN, D)
        expert = nn.Sequential(nn.Linear(D, 32), nn.GELU(), nn.Linear(32, D))
        self.moe = MoE(
            hidden_size=D,
            expert=expert,
            num_experts=E,
            ep_size=ep_size,
            k=k,
            capacity_factor=1.0,
            min_capacity=2,
            use_rts=False,
            top2_2nd_expert_sampling=sampling,
        )
        with torch.no_grad():  # DeepSpeed copies one expert E times: make them differ
            for p in self.moe.deepspeed_moe.experts.parameters():
                p.normal_(0, 0.3)
        self.out = nn.Linear(D, D_OUT)

    def forward(self, x, y):
        h = self.inp(x)
        o, l_aux, _ = self.moe(h)
        return F.mse_loss(self.out(h + o), y) + 0.01 * l_aux


def section(router, **kw):
    return {"enabled": True, "router": router, "beta": 0.7, **kw}


def dense_reference_check(rank, world):
    """Converted layer (router default, EP 1) == the formula written out with every expert run."""
    from deepspeed.moe.sharded_moe import top1gating, top2gating

    for k in (1, 2):
        model = DSMoEModel(seed=3, k=k, ep_size=1, sampling=False)
        moe = model.moe
        cfg = deepspeed_moe.layer_config(moe, {"router": "default", "beta": 0.7})
        deepspeed_moe.convert(moe, cfg)
        layer = moe.deepspeed_moe
        layer.train()
        x = torch.randn(40, D, generator=torch.Generator().manual_seed(rank + 10 * k))
        D0 = torch.randn(E, D, generator=torch.Generator().manual_seed(5))  # the same on both ranks
        with torch.no_grad():
            layer.defaults.defaults_ED.copy_(D0)
        out = layer(x)
        out.sum().backward()
        commit_defaults(layer)  # the optimizer step (the engine's, under DeepSpeed)
        with torch.no_grad():
            logits = x @ moe.deepspeed_moe.gate.wg.weight.t()
            probs = torch.softmax(logits, -1)
            gating = (
                top1gating(logits, 1.0, 2, None, None, True, False, None, True)
                if k == 1
                else top2gating(logits, 1.0, 2, True, None, False, True)
            )
            idx, kept = gating[3].long(), gating[3] >= 0
            experts = moe.deepspeed_moe.experts.deepspeed_experts
            all_out = torch.stack([experts[e](x) for e in range(E)])  # [E, S, D]
            ran = torch.zeros(40, E, dtype=torch.bool)
            sums, counts = torch.zeros(E, D), torch.zeros(E)
            for r in range(k):
                for s in range(40):
                    if kept[r, s]:
                        e = idx[r, s]
                        ran[s, e] = True
                        sums[e] += all_out[e, s]
                        counts[e] += 1
            dist.all_reduce(sums), dist.all_reduce(counts)
            D_ref = torch.where(counts[:, None] > 0, 0.7 * D0 + 0.3 * sums / counts.clamp_min(1)[:, None], D0)
            ref = ((probs * ran).t()[:, :, None] * all_out).sum(0) + (probs * ~ran) @ D0
        torch.testing.assert_close(layer.defaults.defaults_ED, D_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        assert (~ran).any() and ran.any()
        from default_moe.defaults import ExpertDefaults

        assert "DefaultMOELayer" in ExpertDefaults.callers  # through the one mechanism


def recompute_check(rank, world):
    """The recompute contract in the DeepSpeed-MoE adapter: three forwards under activation
    checkpointing, then their backwards oldest first (a pipeline schedule's order) give exactly the
    gradients of the same run without recompute, though each forward updated D."""
    import torch.utils.checkpoint

    grads = {}
    for recompute in (False, True):
        model = DSMoEModel(seed=4, k=2, ep_size=1, sampling=False)
        deepspeed_moe.convert(model.moe, deepspeed_moe.layer_config(model.moe, {"router": "default", "beta": 0.5}))
        layer = model.moe.deepspeed_moe
        layer.train()
        g = torch.Generator().manual_seed(70 + rank)
        outs = []
        for _ in range(3):
            x = torch.randn(24, D, generator=g).requires_grad_(True)
            out = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=True) if recompute else layer(x)
            outs.append((x, out, torch.randn(24, D, generator=g)))
        got = []
        for x, out, g_out in outs:
            layer.zero_grad(set_to_none=True)
            (out * g_out).sum().backward()
            got.append([x.grad.clone()] + [p.grad.clone() for p in layer.parameters() if p.grad is not None])
        assert layer.defaults.pending == 3
        commit_defaults(layer)
        assert layer.defaults.num_updates == 1
        grads[recompute] = (got, layer.defaults.defaults_ED.clone())
    for a, b in zip(grads[False][0], grads[True][0]):
        assert len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b)), "recompute changed the gradients"
    assert torch.equal(grads[False][1], grads[True][1]), "recompute changed D"


def all_checks(rank: int, world: int, tmpdir: str) -> None:
    import deepspeed

    dm_ds.skip_cpu_jit_builds()
    plain = deepspeed.initialize
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    dense_reference_check(rank, world)
    recompute_check(rank, world)

    # Bad sections for DeepSpeed MoE layers fail before the engine.
    for bad, needle in [
        ({"top_k": 2}, "differs from the deepspeed.moe.layer.MoE layer's top_k=1"),
        ({"aux_loss_coeff": 0.1}, "does not apply to deepspeed.moe.layer.MoE"),
        ({"router": "nope"}, "MoEConfig.router must be one of"),
    ]:
        try:
            dm_ds.initialize(model=DSMoEModel(), config=ds_config(1, section={**section("default"), **bad}))
        except ValueError as e:
            assert needle in str(e), str(e)
        else:
            raise AssertionError(bad)

    for k in (1, 2):
        # Flag off == DeepSpeed's own run; router topk converted == unconverted.
        e_plain, *_ = plain(model=DSMoEModel(k=k), config=ds_config(1, section=None))
        base = train_engine(e_plain, 3, 1)
        e_off, *_ = dm_ds.initialize(model=DSMoEModel(k=k), config=ds_config(1, section={"enabled": False}))
        assert train_engine(e_off, 3, 1) == base
        m_topk = DSMoEModel(k=k)
        e_topk, *_ = dm_ds.initialize(model=m_topk, config=ds_config(1, section=section("topk")))
        assert isinstance(m_topk.moe.deepspeed_moe, deepspeed_moe.DefaultMOELayer) and e_topk.has_moe_layers
        assert_losses(train_engine(e_topk, 3, 1), base, f"k={k} converted topk vs DeepSpeed", rtol=1e-6)

        # Router default: trains, differs, defaults identical across ranks, ZeRO 0/1/2.
        for stage in (0, 1, 2):
            m = DSMoEModel(k=k)
            e, *_ = dm_ds.initialize(model=m, config=ds_config(stage, 2, section=section("default")))
            losses = train_engine(e, 3, 2)
            assert all(torch.isfinite(torch.tensor(losses))) and losses != base[: len(losses)]
            Dm = m.moe.deepspeed_moe.defaults.defaults_ED
            assert Dm.shape == (E, D) and Dm.abs().sum() > 0
            got = [torch.empty_like(Dm) for _ in range(world)]
            dist.all_gather(got, Dm)
            assert all(torch.equal(g, Dm) for g in got)

    # SparseMixer through DeepSpeed's dispatch: trains at k=1 (v1) and k=2 (v2); in eval the
    # routes are the deterministic argmax picks of the masked softmax.
    for k in (1, 2):
        m = DSMoEModel(k=k)
        e, *_ = dm_ds.initialize(model=m, config=ds_config(1, section={"enabled": True, "router": "sparsemixer"}))
        losses = train_engine(e, 3, 1)
        assert all(torch.isfinite(torch.tensor(losses)))
        layer = m.moe.deepspeed_moe
        layer.eval()
        h = torch.randn(10, D)
        with torch.no_grad():
            _, routes = layer._route(h, None)
            top = torch.topk(h @ layer.gate.wg.weight.t(), k, -1).indices
        kept = routes[3] >= 0
        assert torch.equal(routes[3].t().long()[kept.t()], top[kept.t()])
        layer.train()

    # Token-id routers: the model's input ids are recorded at its input by initialize.
    from default_moe.routing.hash import hash_experts

    class IdsModel(DSMoEModel):
        def __init__(self, k):
            super().__init__(k=k)
            self.emb = nn.Embedding(30, D_IN)

        def forward(self, ids, y):
            return super().forward(self.emb(ids), y)

    def id_batches(step):
        g = torch.Generator().manual_seed(500 + step + 10 * rank)
        return torch.randint(0, 30, (4, 6), generator=g), torch.randn(4, 6, D_OUT, generator=g)

    for router, k, extra in [("hash", 2, {}), ("stablemoe", 1, {"stablemoe": {"vocab_size": 30, "stage2_step": 2}})]:
        m = IdsModel(k)
        e, *_ = dm_ds.initialize(model=m, config=ds_config(1, section={"enabled": True, "router": router, **extra}))
        for step in range(3):
            ids, y = id_batches(step)
            loss = e(ids, y)
            e.backward(loss)
            e.step()
            assert torch.isfinite(loss)
        layer = m.moe.deepspeed_moe
        with torch.no_grad():
            _, routes = layer._route(m.inp(m.emb(ids)).reshape(-1, D), None)
        kept = (routes[3] >= 0).t()
        if router == "hash":
            want = hash_experts(ids.reshape(-1), E, 2)
            assert torch.equal(routes[3].t().long()[kept], want[kept])
        else:
            assert int(layer.num_steps) == 4 and layer.distill.emb.weight.abs().sum() > 0  # 3 steps + the probe
            want = layer.distill(ids.reshape(-1)).argmax(-1)  # stage 2: the distilled router decides
            assert torch.equal(routes[3][0].long()[kept[:, 0]], want[kept[:, 0]])

    # Checkpoints: the defaults survive save/load, resume is exact, and a checkpoint written
    # before the flag was switched on loads (zero defaults).
    m = DSMoEModel(k=2)
    e, *_ = dm_ds.initialize(model=m, config=ds_config(1, section=section("default")))
    train_engine(e, 2, 1)
    e.save_checkpoint(f"{tmpdir}/dsmoe")
    D_saved = m.moe.deepspeed_moe.defaults.defaults_ED.clone()
    if rank == 0:  # convert-deepspeed says what it does not convert
        from default_moe import checkpoint

        try:
            checkpoint.convert_deepspeed(f"{tmpdir}/dsmoe", f"{tmpdir}/dsmoe.pt")
        except ValueError as err:
            assert "DeepSpeed-MoE expert files" in str(err) and "engine.load_checkpoint" in str(err), str(err)
        else:
            raise AssertionError("a DeepSpeed-MoE checkpoint was converted")
    torch.manual_seed(1)  # top-2 samples its second expert: same random numbers in both continuations
    cont = train_engine(e, 2, 1, first_step=2)
    m2 = DSMoEModel(k=2, seed=9)
    e2, *_ = dm_ds.initialize(model=m2, config=ds_config(1, section=section("default")))
    e2.load_checkpoint(f"{tmpdir}/dsmoe")
    assert torch.equal(m2.moe.deepspeed_moe.defaults.defaults_ED, D_saved)
    torch.manual_seed(1)
    assert train_engine(e2, 2, 1, first_step=2) == cont

    e_old, *_ = plain(model=DSMoEModel(k=2), config=ds_config(1, section=None))
    train_engine(e_old, 1, 1)
    e_old.save_checkpoint(f"{tmpdir}/before_flag")
    m3 = DSMoEModel(k=2, seed=5)
    e3, *_ = dm_ds.initialize(model=m3, config=ds_config(1, section=section("default")))
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # zeros, and said
        warnings.simplefilter("always")
        e3.load_checkpoint(f"{tmpdir}/before_flag")
    assert any("starts from zero defaults" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert m3.moe.deepspeed_moe.defaults.defaults_ED.abs().sum() == 0
    assert torch.equal(m3.moe.deepspeed_moe.gate.wg.weight, e_old.module.moe.deepspeed_moe.gate.wg.weight)
    filtered_defaults_check(rank, world, tmpdir)


class ExpertNamedModel(DSMoEModel):
    """The MoE module under a name containing "expert": DeepSpeed's non-MoE state filter drops every
    key containing "expert" under a native MoE module, D included."""

    def __init__(self, seed=0):
        super().__init__(seed=seed, k=2)
        self.expert_block = self.moe
        del self.moe

    def forward(self, x, y):
        h = self.inp(x)
        o, l_aux, _ = self.expert_block(h)
        return F.mse_loss(self.out(h + o), y) + 0.01 * l_aux


def filtered_defaults_check(rank, world, tmpdir):
    """D dropped from DeepSpeed's module state by its filter is restored from default_moe_defaults.pt:
    never silently lost."""
    import deepspeed

    dm_ds.skip_cpu_jit_builds()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    m = ExpertNamedModel()
    e, *_ = dm_ds.initialize(model=m, config=ds_config(1, section=section("default")))
    train_engine(e, 2, 1)
    e.save_checkpoint(f"{tmpdir}/named")
    D_saved = m.expert_block.deepspeed_moe.defaults.defaults_ED.clone()
    assert D_saved.abs().sum() > 0
    dist.barrier()
    tag = open(f"{tmpdir}/named/latest").read().strip()
    module_state = torch.load(f"{tmpdir}/named/{tag}/mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)[
        "module"
    ]
    assert not any(k.endswith("defaults_ED") for k in module_state), "the filter no longer drops D: test premise gone"
    m2 = ExpertNamedModel(seed=3)
    e2, *_ = dm_ds.initialize(model=m2, config=ds_config(1, section=section("default")))
    e2.load_checkpoint(f"{tmpdir}/named")
    assert torch.equal(m2.expert_block.deepspeed_moe.defaults.defaults_ED, D_saved)
