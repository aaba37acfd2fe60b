"""CPU stand-ins for GPU bug classes (issue 12): every tensor follows `.to()`, token ids survive
autograd's worker threads, diagnostics change no state, host syncs per forward, no weight copy
saved for backward, exact bf16-mode counts, router rebuilt on reconfigure, grouped GEMM backend."""

import copy
import threading

import pytest
import torch
import torch.utils.checkpoint
from torch import nn

from default_moe import commit_defaults, MoEConfig, MoELayer, token_context
from default_moe.diagnostics import count_host_syncs, router_gradient_fidelity
from default_moe.experts import GroupedExperts, resolve_backend
from reference import Weights, load_into_layer

E, D, F_, T, V = 8, 16, 24, 40, 50


def layer_for(router="default", seed=0, **kw):
    kw.setdefault("top_k", 1 if router == "stablemoe" else 2)
    if router == "stablemoe":
        kw.setdefault("stablemoe", {"vocab_size": V, "stage2_step": 2})
    torch.manual_seed(seed)
    return MoELayer(MoEConfig(hidden_size=D, num_experts=E, ffn_hidden_size=F_, router=router, **kw))


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, D, generator=g), torch.randint(0, V, (T,), generator=g)


def train_step(layer, seed):
    torch.manual_seed(seed)  # random routers (SparseMixer) draw from the default generator
    x, ids = batch(seed)
    x.requires_grad_(True)
    out = layer(x, token_ids=ids)
    out.square().sum().backward()
    return out.detach()


def tensors_held(obj, seen=None):
    """Every tensor reachable from a module tree through attributes and containers."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, nn.Module):
        for v in vars(obj).values():
            yield from tensors_held(v, seen)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_held(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_held(v, seen)


@pytest.mark.parametrize(
    "router,kw",
    [
        ("default", {}),
        ("default", {"capacity_factor": 1.0}),
        ("default", {"ema_stats_dtype": "bfloat16"}),
        ("topk", {}),
        ("stablemoe", {}),
        ("sparsemixer", {"top_k": 1}),
    ],
)
def test_to_moves_every_tensor_the_layer_holds(router, kw):
    layer = layer_for(router, **kw)
    train_step(layer, 1)  # fills counters, diagnostics tensors, pending / accumulated statistics
    layer.to("meta")
    left = [t for t in tensors_held(layer) if not t.is_meta]
    assert not left, f"{len(left)} tensor(s) did not follow .to('meta'): {[tuple(t.shape) for t in left]}"


def test_defaults_keep_every_bit_through_a_dtype_cast():
    layer = layer_for("default")
    train_step(layer, 1)
    with torch.no_grad():
        layer.defaults.defaults_ED.normal_()
    before = layer.defaults.defaults_ED.clone()
    layer.to(torch.bfloat16)
    assert layer.defaults.defaults_ED.dtype == torch.float32
    assert torch.equal(layer.defaults.defaults_ED, before), "D was rounded through bf16"
    assert layer.experts.w2_LFD.dtype == torch.bfloat16


def test_bf16_statistics_keep_counts_exact():
    """257 slots of one expert: bf16 would round the count to 256 (mean 2.0, not 512/257)."""
    layer = layer_for("default", ema_stats_dtype="bfloat16", beta=0.5)
    d = layer.defaults
    stats = torch.zeros(E, D + 1)
    stats[0, :D] = 512.0  # exactly representable in bf16
    stats[0, D] = 257.0
    d.stats_ED1.copy_(stats)
    commit_defaults(d)
    torch.testing.assert_close(d.defaults_ED[0], torch.full((D,), 0.5 * 512.0 / 257.0), rtol=1e-6, atol=0)


def test_token_ids_recorded_in_one_thread_are_read_in_another():
    ids = torch.arange(5)
    token_context.set_current(ids)
    got = {}
    t = threading.Thread(target=lambda: got.update(ids=token_context.current()))
    t.start(), t.join()
    assert got["ids"] is ids


class _Block(nn.Module):
    """What an engine adapter does: the MoE block reads the ids the root module recorded."""

    def __init__(self, layer):
        super().__init__()
        self.moe = layer

    def forward(self, h):
        return self.moe(h, token_ids=token_context.current("test block"))


class _Model(nn.Module):
    def __init__(self, layer, recompute):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.block = _Block(layer)
        self.recompute = recompute

    def forward(self, input_ids):
        h = self.emb(input_ids)
        if self.recompute:
            return torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=False)
        return self.block(h)


@pytest.mark.parametrize("router", ["hash", "stablemoe"])
def test_recompute_on_a_backward_worker_thread_routes_identically(router):
    """On CUDA the recompute runs on autograd's device thread; here backward runs on a new thread."""
    grads = {}
    for recompute in (False, True):
        torch.manual_seed(0)
        model = _Model(layer_for(router, seed=3), recompute)
        token_context.capture_token_ids(model)
        _, ids = batch(5)
        loss = model(ids).square().sum()
        errors = []

        def backward(loss=loss, errors=errors):
            try:
                loss.backward()
            except Exception as e:  # noqa: BLE001 - re-raised in the test thread
                errors.append(e)

        t = threading.Thread(target=backward)
        t.start(), t.join()
        assert not errors, f"recompute={recompute}: {errors[0]!r}"
        grads[recompute] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    for n in grads[False]:
        assert torch.equal(grads[True][n], grads[False][n]), n


def _state(layer):
    s = {f"sd.{k}": v.clone() for k, v in layer.state_dict().items()}
    s.update({f"buf.{k}": v.clone() for k, v in layer.named_buffers()})
    s["num_training_forwards"] = layer.num_training_forwards
    s["aux"] = {k: v.clone() for k, v in layer.aux_losses.items()}
    d = layer.defaults
    if d is not None:
        s["pending"], s["num_updates"] = d.pending, d.num_updates
    return s


def _assert_same_state(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        va, vb = a[k], b[k]
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), f"{what}: {k} changed"
        elif isinstance(va, dict):
            assert va.keys() == vb.keys() and all(torch.equal(va[n], vb[n]) for n in va), f"{what}: {k} changed"
        else:
            assert va == vb, f"{what}: {k} changed ({va} -> {vb})"


@pytest.mark.parametrize(
    "router,kw",
    [
        ("default", {}),
        ("default", {"capacity_factor": 1.0}),
        ("default", {"ema_stats_dtype": "bfloat16", "ema_weighting": "prob"}),
        ("stablemoe", {}),
        ("sparsemixer", {"top_k": 2}),
    ],
)
def test_fidelity_diagnostic_changes_no_state(router, kw):
    plain = layer_for(router, **kw)
    probed = copy.deepcopy(plain)
    for step in range(4):
        out_plain = train_step(plain, 10 + step)
        out_probed = train_step(probed, 10 + step)
        assert torch.equal(out_plain, out_probed), f"step {step}: outputs differ after a diagnostic"
        before = _state(probed)
        x, ids = batch(100 + step)
        rng = torch.get_rng_state()
        router_gradient_fidelity(probed, x, token_ids=ids)
        assert torch.equal(rng, torch.get_rng_state()), "the diagnostic advanced the random generator"
        _assert_same_state(before, _state(probed), f"{router} {kw} step {step}")
        commit_defaults([plain, probed])
    _assert_same_state(_state(plain), _state(probed), "after the run")


def test_reconfigure_rebuilds_the_router_and_keeps_parameters():
    base = dict(hidden_size=D, num_experts=E, ffn_hidden_size=F_)
    layer = MoELayer(MoEConfig(**base, router="hash"))  # no router weight at all
    layer.reconfigure(MoEConfig(**base, router="default"))
    assert type(layer.router).__name__ == "DefaultRouter" and layer.defaults is not None
    w = layer.router.weight
    layer.reconfigure(MoEConfig(**base, router="topk", top_k=1))
    assert layer.router.weight is w and layer.defaults is None

    sm = MoELayer(MoEConfig(**base, router="sparsemixer", top_k=1))
    w = sm.router.weight
    sm.reconfigure(MoEConfig(**base, router="sparsemixer", top_k=2))
    assert sm.router.version == "v2" and sm.router.weight is w

    st = MoELayer(MoEConfig(**base, router="stablemoe", top_k=1, stablemoe={"vocab_size": 10, "stage2_step": 5}))
    st.router.num_steps.fill_(3)
    st.reconfigure(
        MoEConfig(**base, router="stablemoe", top_k=1, stablemoe={"vocab_size": 20, "router_dim": 8, "stage2_step": 5})
    )
    assert st.router.distill.emb.weight.shape == (20, 8) and int(st.router.num_steps) == 3


@pytest.mark.parametrize(
    "router,kw,most",
    [
        ("topk", {}, 1),
        ("default", {}, 1),
        ("default", {"capacity_factor": 1.0}, 1),
        ("topk", {"capacity_factor": 0.5, "drop_policy": "position"}, 1),
        ("default", {"experts_backend": "grouped_mm", "capacity_factor": 1.0}, 1),
        # The grouped GEMM takes its offsets on the device: without EP or drops, no sync at all.
        ("default", {"experts_backend": "grouped_mm"}, 0),
        ("topk", {"experts_backend": "grouped_mm"}, 0),
    ],
)
def test_at_most_one_host_sync_per_forward(router, kw, most):
    layer = layer_for(router, **kw)
    train_step(layer, 1)
    x, _ = batch(2)
    x.requires_grad_(True)
    with count_host_syncs() as syncs:
        out = layer(x)
        n_forward = syncs.count
        out.square().sum().backward()
    assert n_forward <= most and syncs.count <= most, f"host syncs: {syncs.calls}"


def test_sync_counter_sees_what_syncs():
    t = torch.tensor([1, 2, 2])
    with count_host_syncs() as s:
        t.tolist(), int(t[0]), torch.bincount(t), t[t > 1], torch.repeat_interleave(t, t)
        torch.repeat_interleave(t, t, output_size=5)
    assert s.calls == [
        "tolist",
        "__int__",
        "bincount",
        "__getitem__ with a boolean mask",
        "repeat_interleave without output_size",
    ]


def test_no_weight_copy_is_saved_for_backward():
    """Autograd keeps views of the parameters, never a weight-sized copy (the old w1|w3 concat)."""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=64, num_experts=4, ffn_hidden_size=128, top_k=1))
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    limit = min(p.numel() * p.element_size() for p in layer.experts.parameters()) // layer.config.num_experts
    big = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params and t.untyped_storage().nbytes() >= limit:
            big.append((tuple(t.shape), t.untyped_storage().nbytes()))
        return t

    x = torch.randn(8, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    out.sum().backward()
    assert not big, f"saved-for-backward tensors as large as one expert's weight: {big}"


def test_old_separate_w1_w3_state_dicts_load_into_the_fused_weight():
    layer = layer_for("default")
    sd = layer.state_dict()
    w13 = sd.pop("experts.w13_LD2F")
    sd["experts.w1_LDF"], sd["experts.w3_LDF"] = w13[..., :F_].clone(), w13[..., F_:].clone()
    fresh = layer_for("default", seed=9)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.experts.w13_LD2F, layer.experts.w13_LD2F)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_grouped_mm_backend_equals_the_loop(activation, dtype, tol):
    torch.manual_seed(0)
    loop = GroupedExperts(4, D, F_, activation, 0.2, backend="loop").to(dtype)
    grouped = copy.deepcopy(loop)
    grouped.backend = "grouped_mm"
    counts = [5, 0, 9, 3]  # an expert with no rows
    x = torch.randn(sum(counts), D, dtype=dtype)
    g = torch.randn(sum(counts), D, dtype=dtype)
    outs = []
    for experts in (loop, grouped):
        xi = x.clone().requires_grad_(True)
        y = experts(xi, counts, torch.tensor(counts))
        (y * g).sum().backward()
        outs.append((y, xi.grad, [p.grad for p in experts.parameters()]))
    (y0, gx0, gp0), (y1, gx1, gp1) = outs
    torch.testing.assert_close(y1.float(), y0.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(gx1.float(), gx0.float(), rtol=tol, atol=tol)
    for a, b in zip(gp1, gp0):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def test_backend_selection():
    assert resolve_backend("auto", "cpu", torch.float32) == "loop"
    assert resolve_backend("auto", "cpu", torch.bfloat16) == "loop"
    assert resolve_backend("auto", "cuda", torch.float32) == "loop"
    assert resolve_backend("auto", "cuda", torch.bfloat16) == "grouped_mm"
    assert resolve_backend("auto", "cuda", torch.bfloat16, (4096, 1408)) == "grouped_mm"
    assert resolve_backend("auto", "cuda", torch.bfloat16, (12, 20)) == "loop"  # rows not 16-byte aligned
    assert resolve_backend("loop", "cuda", torch.bfloat16) == "loop"
    assert resolve_backend("grouped_mm", "cpu", torch.float32) == "grouped_mm"
    with pytest.raises(ValueError, match="MoEConfig.experts_backend must be one of"):
        MoEConfig(hidden_size=D, num_experts=E, ffn_hidden_size=F_, experts_backend="triton")


def test_reference_weights_load_into_the_fused_layer():
    layer = layer_for("topk")
    w = Weights.random(E, D, F_, True, 0)
    load_into_layer(layer, w)
    assert torch.equal(layer.experts.w13_LD2F[..., :F_], w.w1_EDF) and torch.equal(layer.experts.w13_LD2F[..., F_:], w.w3_EDF)
