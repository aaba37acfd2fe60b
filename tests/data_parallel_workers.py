"""Per-rank bodies of tests/test_data_parallel.py: the helper, DDP done right and FSDP2 on an EP
model, each against the float64 reference of the union batch over several SGD steps."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from default_moe import MoEConfig, MoELayer
from default_moe import data_parallel as dp_mod
from reference import Weights, load_into_layer, reference_moe

E, D, F_, T, STEPS, LR = 8, 12, 16, 10, 3, 0.5


def _full(t):
    """A parameter or gradient as a full local tensor (FSDP2 keeps DTensors)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _expert_grads_global(layer, grads, groups):
    """Local [L, ...] expert gradients gathered over EP into [E, ...] (w1, w3, w2)."""
    out = {}
    for name, g in grads.items():
        if groups.ep_size > 1:
            parts = [torch.empty_like(g) for _ in range(groups.ep_size)]
            dist.all_gather(parts, g.contiguous(), group=groups.ep_group)
            g = torch.cat(parts)
        out[name] = g
    return out


def check_way(rank: int, world: int, ep: int, way: str, gas: int = 1, no_sync: bool = False, steps: int = STEPS) -> None:
    """`gas` micro-batches per optimizer step (each rank's T tokens split between them), the first
    gas-1 under DDP's `no_sync()` / FSDP2's `set_requires_gradient_sync(False)` when `no_sync`;
    `reduce_gradients` once per optimizer step, after the last backward."""
    torch.manual_seed(0)
    cfg = MoEConfig(
        hidden_size=D, num_experts=E, ffn_hidden_size=F_, top_k=2, router="default", ep_size=ep, aux_loss_coeff=0.0, beta=0.5
    )
    layer = MoELayer(cfg)
    w = Weights.random(E, D, F_, True, seed=3)
    load_into_layer(layer, w)
    model = nn.Sequential(layer)
    groups = layer.groups
    if way == "ddp":
        wrapped = dp_mod.wrap_ddp(model)
    elif way == "fsdp2":
        wrapped = dp_mod.fully_shard_moe(model)
    else:
        wrapped = model
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    wd = w.double()
    D_prev = torch.zeros(E, D)
    for step in range(steps):
        g = torch.Generator().manual_seed(100 + step)
        x, g_out = torch.randn(world * T, D, generator=g), torch.randn(world * T, D, generator=g)
        mine = slice(rank * T, (rank + 1) * T)
        opt.zero_grad(set_to_none=True)
        xs, gs = x[mine].chunk(gas), g_out[mine].chunk(gas)
        for i, (xi, gi) in enumerate(zip(xs, gs)):
            last = i == gas - 1
            if way == "ddp" and no_sync and not last:
                with wrapped.no_sync():
                    (wrapped(xi) * gi).sum().backward()
            else:
                if way == "fsdp2" and no_sync:
                    wrapped.set_requires_gradient_sync(last)
                (wrapped(xi) * gi).sum().backward()
        if way == "helper":
            dp_mod.reduce_gradients(model)
        # The reference: the union batch, loss = mean over ranks of each rank's sum.
        for t in (wd.router_ED, wd.w1_EDF, wd.w3_EDF, wd.w2_EFD):
            t.grad = None
        res = reference_moe(x.double(), wd, top_k=2, use_defaults=True, defaults_ED=D_prev, beta=0.5)
        ((res.out_TD * g_out.double()).sum() / world).backward()
        tag = f"{way} ep{ep} world{world} gas{gas}{' no_sync' if no_sync else ''} step {step}"

        def close(a, b, what, tag=tag):
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5, msg=lambda m: f"{tag} {what}: {m}")

        close(_full(layer.router.weight.grad), wd.router_ED.grad, "router grad")
        w13 = _full(layer.experts.w13_LD2F.grad)
        local = {"w1": w13[..., :F_], "w3": w13[..., F_:], "w2": _full(layer.experts.w2_LFD.grad)}
        glob = _expert_grads_global(layer, local, groups)
        close(glob["w1"], wd.w1_EDF.grad, "w1 grad")
        close(glob["w3"], wd.w3_EDF.grad, "w3 grad")
        close(glob["w2"], wd.w2_EFD.grad, "w2 grad")
        assert layer.defaults.pending == gas, f"{tag}: {layer.defaults.pending} micro-batches pending"
        opt.step()  # commits D (the step contract: the optimizer holds the layer's parameters)
        close(layer.defaults.defaults_ED, res.defaults_after_ED, "D")
        gathered = [torch.empty_like(layer.defaults.defaults_ED) for _ in range(world)]
        dist.all_gather(gathered, layer.defaults.defaults_ED)
        assert all(torch.equal(gathered[0], t) for t in gathered), f"{tag}: D differs across ranks"
        D_prev = res.defaults_after_ED.detach().float()
        with torch.no_grad():
            for t in (wd.router_ED, wd.w1_EDF, wd.w3_EDF, wd.w2_EFD):
                t -= LR * t.grad
    # Experts differ across EP ranks and stayed distinct (no broadcast of rank 0's experts).
    if ep > 1:
        w2 = _full(layer.experts.w2_LFD).detach().contiguous()
        parts = [torch.empty_like(w2) for _ in range(world)]
        dist.all_gather(parts, w2)
        assert not torch.equal(parts[0], parts[groups.ep_size - 1]), f"{way}: experts identical across EP ranks"


def plain_ddp_is_refused(rank: int, world: int, ep: int) -> None:
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=D, num_experts=E, ffn_hidden_size=F_, ep_size=ep))
    ddp = nn.parallel.DistributedDataParallel(nn.Sequential(layer))
    try:
        ddp(torch.randn(T, D))
    except ValueError as e:
        assert "Use default_moe.data_parallel.wrap_ddp(model)" in str(e), str(e)
    else:
        raise AssertionError("plain DDP around EP experts was not refused")


def all_ways(rank: int, world: int, ep: int) -> None:
    for way in ("helper", "ddp", "fsdp2"):
        check_way(rank, world, ep, way)
        check_way(rank, world, ep, way, gas=2, steps=2)
        if way != "helper":
            check_way(rank, world, ep, way, gas=2, no_sync=True, steps=2)
    plain_ddp_is_refused(rank, world, ep)
