"""Per-rank bodies of the fault, hang and EMA-statistics tests (one spawn runs them all)."""

from __future__ import annotations

import datetime
import time

import torch
import torch.distributed as dist

from default_moe import commit_defaults, MoEConfig, MoELayer, ParallelGroups, build_groups, count_collectives
from reference import Weights, load_into_layer, reference_moe

E, D, F_ = 8, 12, 16


def _layer(ep_size: int, seed: int = 5, groups=None, **kw) -> tuple:
    cfg = MoEConfig(hidden_size=D, num_experts=E, ffn_hidden_size=F_, ep_size=ep_size, aux_loss_coeff=0.0, **kw)
    layer = MoELayer(cfg, groups if groups is not None else build_groups(ep_size))
    w = Weights.random(E, D, F_, True, seed=seed)
    load_into_layer(layer, w)
    return layer, w


def _batch(step: int, total: int) -> torch.Tensor:
    return torch.randn(total, D, generator=torch.Generator().manual_seed(77 + step))


def empty_and_one_expert(rank: int, world: int) -> None:
    """Empty micro-batches on every rank, then all tokens routed to one expert: no hang, the
    defaults of unseen experts unchanged, outputs equal the dense reference."""
    layer, w = _layer(world)
    # Both ranks empty: the all-to-alls carry zero rows, nothing is averaged into D.
    out = layer(torch.zeros(0, D, requires_grad=True))
    out.sum().backward()
    commit_defaults(layer)
    assert out.shape == (0, D) and torch.count_nonzero(layer.defaults.defaults_ED) == 0
    # Every token to expert 0 (top-1): one rank gets all of them, the other none.
    w.router_ED.zero_()
    w.router_ED[0, 0] = 50.0
    layer2, _ = _layer(world, top_k=1)
    load_into_layer(layer2, w)
    x = _batch(0, 16 * world)
    x[:, 0] = 1.0
    mine = x[rank * 16 : (rank + 1) * 16]
    out = layer2(mine.clone().requires_grad_(True))
    out.sum().backward()
    commit_defaults(layer2)
    res = reference_moe(x.double(), w.double(), top_k=1, use_defaults=True, defaults_ED=torch.zeros(E, D))
    torch.testing.assert_close(out.double(), res.out_TD[rank * 16 : (rank + 1) * 16], rtol=3e-5, atol=3e-6)
    counts = layer2.tokens_per_expert.clone()
    dist.all_reduce(counts)
    assert counts[0] == 16 * world and counts[1:].sum() == 0, counts
    D_ED = layer2.defaults.defaults_ED
    assert D_ED[0].abs().sum() > 0 and torch.count_nonzero(D_ED[1:]) == 0, "unseen experts' defaults moved"
    torch.testing.assert_close(D_ED.double(), res.defaults_after_ED, rtol=3e-5, atol=3e-6)


def nonfinite_modes(rank: int, world: int) -> None:
    """A NaN expert output on one rank: "skip" keeps that expert's D on every rank; "raise"
    fails with the layer name and step on every rank (after the collective, so nobody hangs)."""
    for mode in ("skip", "raise"):
        layer, w = _layer(world, nonfinite=mode)
        layer.layer_name = "blocks.3.moe"
        x = _batch(1, 8 * world)[rank * 8 : (rank + 1) * 8]
        layer(x).sum().backward()  # a finite first step: every seen expert's D moves
        commit_defaults(layer)
        D_before = layer.defaults.defaults_ED.clone()
        seen = D_before.abs().sum(1) > 0
        with torch.no_grad():  # expert 0's weights blow up on the rank that holds it
            if 0 in layer.local_expert_ids:
                layer.experts.w2_LFD[0].fill_(float("nan"))
        try:
            layer(x).sum().backward()
            commit_defaults(layer)  # the statistics are all-reduced: every rank sees the NaN
        except FloatingPointError as e:
            assert mode == "raise", f"skip mode raised: {e}"
            msg = str(e)
            assert "blocks.3.moe" in msg and "expert(s) [0]" in msg and "EMA commit 2" in msg, msg
        else:
            assert mode == "skip", "nonfinite='raise' did not raise"
            D_after = layer.defaults.defaults_ED
            assert torch.equal(D_after[0], D_before[0]), "a NaN statistic entered expert 0's default"
            assert torch.isfinite(D_after).all() and int(layer.defaults.nonfinite_skips) == 1
            moved = (D_after != D_before).any(1)
            assert moved[1:][seen[1:]].any(), "finite experts' defaults did not update"
    # Router probabilities: NaN input -> NaN logits, caught before dispatch in "raise" mode (on
    # every rank here: a rank that raises alone leaves its peers to the collective timeout).
    layer, _ = _layer(world, nonfinite="raise")
    x = _batch(2, 8)
    x[3, 2] = float("nan")
    try:
        layer(x)
    except FloatingPointError as e:
        assert "router probabilities" in str(e) and "training forward 1" in str(e), str(e)
    else:
        raise AssertionError("NaN router input was not reported")


def ema_statistics_options(rank: int, world: int) -> None:
    """bf16 statistics: half the all-reduce bytes for the sums (counts fp32), defaults within bf16
    rounding of fp32. Gradient accumulation: no collective in either micro-batch's forward or
    backward, D unchanged until the commit, then the dense reference's EMA step over both
    micro-batches' tokens, in one all-reduce."""
    per = 12
    x0, x1 = _batch(3, per * world), _batch(4, per * world)
    mine = slice(rank * per, (rank + 1) * per)
    # bf16 statistics
    ref_layer, w = _layer(world)
    bf_layer, _ = _layer(world, ema_stats_dtype="bfloat16")
    for layer in (ref_layer, bf_layer):
        layer(x0[mine]).sum().backward()
    with count_collectives() as c32:
        commit_defaults(ref_layer)
    with count_collectives() as c16:
        commit_defaults(bf_layer)
    ar32 = [r for r in c32.records if r.op == "all_reduce"]
    ar16 = [r for r in c16.records if r.op == "all_reduce"]
    # bf16 sums (half the bytes) and the E counts beside them in fp32 (exact).
    E_ = ref_layer.config.num_experts
    assert len(ar32) == 1 and [r.dtype for r in ar16] == [torch.bfloat16, torch.float32], ar16
    assert ar16[0].nbytes * 2 == ar32[0].nbytes - 4 * E_ and ar16[1].nbytes == 4 * E_
    a, b = ref_layer.defaults.defaults_ED, bf_layer.defaults.defaults_ED
    torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-3)
    assert not torch.equal(a, b), "bf16 statistics left no rounding: were they really bf16?"
    # Two micro-batches, one optimizer step
    layer, w = _layer(world, beta=0.7)
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    with count_collectives() as c:
        layer(x0[mine]).sum().backward()
        layer(x1[mine]).sum().backward()
    assert not [r for r in c.records if r.op == "all_reduce"] and torch.count_nonzero(layer.defaults.defaults_ED) == 0
    with count_collectives() as c:
        opt.step()  # the torch optimizer's step commits
    assert len([r for r in c.records if r.op == "all_reduce"]) == 1
    both = torch.cat([torch.cat([x0[r * per : (r + 1) * per], x1[r * per : (r + 1) * per]]) for r in range(world)])
    res = reference_moe(both.double(), w.double(), top_k=2, use_defaults=True, defaults_ED=torch.zeros(E, D), beta=0.7)
    torch.testing.assert_close(layer.defaults.defaults_ED.double(), res.defaults_after_ED, rtol=3e-5, atol=3e-6)


def collective_timeout(rank: int, world: int) -> None:
    """A rank that never joins a collective: the others fail after the group's timeout (here
    3 s) with an error, instead of hanging."""
    short = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=3))
    groups = ParallelGroups(ep_group=short, expert_dp_group=None, dp_group=short)
    layer, _ = _layer(world, groups=groups)
    if rank == 0:
        t0 = time.monotonic()
        try:
            layer(_batch(5, 8))
        except RuntimeError as e:
            waited = time.monotonic() - t0
            assert 2.0 < waited < 60, waited
            print(f"[timeout] rank 0 failed after {waited:.1f} s: {str(e).splitlines()[0][:120]}")
        else:
            raise AssertionError("a collective with a missing peer returned")
    else:
        time.sleep(8)  # misses the forward; rejoins at the harness's barrier on the world group


def all_faults(rank: int, world: int) -> None:
    torch.manual_seed(0)
    empty_and_one_expert(rank, world)
    nonfinite_modes(rank, world)
    ema_statistics_options(rank, world)
    collective_timeout(rank, world)
