"""torch.compile readiness (issue 26): Default MoE adds no graph break over TopK, the only breaks
left are the host-side split sizes, steps whose routing differs compile nothing new after warm-up,
and a training forward writes no Python attribute that torch.compile would have to guard on.
Dynamo only (backend="eager"): graph capture and recompiles are decided there; the inductor
timings are in launch/bench_compile.py."""

import pytest
import torch
from torch._dynamo.utils import counters

from default_moe import MoEConfig, MoELayer

SIZE = dict(hidden_size=32, ffn_hidden_size=64, num_experts=8, top_k=2)
ROUTERS = [
    dict(router="topk"),
    dict(router="default"),
    dict(router="default", score_function="sigmoid", normalize_topk=True, expert_bias=True),
]


def _layer(**kw):
    torch.manual_seed(0)
    return MoELayer(MoEConfig(**SIZE, **kw))


def _breaks(**kw):
    torch._dynamo.reset()
    ex = torch._dynamo.explain(_layer(**kw))(torch.randn(64, 32))
    return ex.graph_break_count, {b.reason.splitlines()[0] for b in ex.break_reasons}


@pytest.mark.parametrize(
    "gate", [{}, dict(score_function="sigmoid", normalize_topk=True, expert_bias=True)], ids=["softmax", "dsv3-sigmoid-bias"]
)
def test_default_adds_no_graph_break_and_only_split_sizes_break(gate):
    topk, default = _breaks(router="topk", **gate), _breaks(router="default", **gate)
    assert default == topk, (default, topk)
    # The host copy of the per-expert counts (the loop backend's split sizes); the statistics and
    # the expert bias's slot counts add none (they reach the accumulator through an autograd
    # Function, not a tensor hook).
    assert topk[1] == {"Data dependent operator"}, topk
    assert topk[0] <= 3, topk  # today's count: a tripwire for new breaks


@pytest.mark.parametrize("kw", ROUTERS, ids=lambda kw: "-".join(map(str, kw.values())))
def test_grouped_experts_without_ep_compile_to_one_graph(kw):
    """The grouped GEMM takes the counts on the device: without EP and drops nothing leaves it,
    so the whole layer, Default MoE's term and statistics and the expert bias included, is one
    graph (bf16: the only dtype torch.compile's _grouped_mm shape function accepts)."""
    torch._dynamo.reset()
    layer = _layer(**kw, experts_backend="grouped_mm").to(torch.bfloat16)
    ex = torch._dynamo.explain(layer)(torch.randn(64, 32, dtype=torch.bfloat16))
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), [b.reason.splitlines()[0] for b in ex.break_reasons]


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@pytest.mark.parametrize("kw", ROUTERS[1:], ids=["default", "dsv3-sigmoid-bias"])
def test_compiled_statistics_equal_eager(kw, backend):
    """D and the expert bias collected by a compiled forward+backward (AOT autograd: the statistics
    reach the accumulator in the compiled backward) equal eager's over 3 optimizer steps of 2
    micro-batches, one of which is a forward without backward (counts nothing)."""
    dtype = torch.bfloat16 if backend == "grouped_mm" else torch.float32
    torch._dynamo.reset()
    layers = [_layer(**kw, experts_backend=backend).to(dtype) for _ in range(2)]
    runs = [layers[0], torch.compile(layers[1], backend="aot_eager")]
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in layers]
    g = torch.Generator().manual_seed(3)
    for _step in range(3):
        xs = [torch.randn(48, 32, generator=g, dtype=dtype) for _ in range(3)]
        for run, opt in zip(runs, opts):
            for i, x in enumerate(xs):
                out = run(x)
                if i != 1:  # the middle micro-batch's backward never runs
                    out.float().square().mean().backward()
            opt.step()
            opt.zero_grad()
    eager, compiled = layers
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    assert eager.defaults.num_updates == compiled.defaults.num_updates == 3
    assert eager.defaults.defaults_ED.abs().sum() > 0
    torch.testing.assert_close(compiled.defaults.defaults_ED, eager.defaults.defaults_ED, **tol)
    if eager.router.expert_bias is not None:
        bias = [m.router.expert_bias.expert_bias_E for m in layers]
        assert bias[0].abs().sum() > 0
        torch.testing.assert_close(bias[1], bias[0], **tol)
    assert compiled.defaults.pending == 0


@pytest.mark.parametrize("kw", ROUTERS, ids=lambda kw: "-".join(map(str, kw.values())))
def test_no_recompile_across_steps_with_different_routing(kw):
    torch._dynamo.reset()
    counters.clear()
    layer = _layer(**kw)
    compiled = torch.compile(layer, backend="eager")
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    new, counts = [], []
    for step in range(8):
        # Other tokens and another token count every step: other routing and split sizes; two
        # micro-batches per step on odd steps (gradient accumulation).
        for _ in range(1 + step % 2):
            before = counters["stats"]["unique_graphs"]
            compiled(torch.randn(48 + 8 * (step % 3), 32, generator=g)).square().mean().backward()
            new.append(counters["stats"]["unique_graphs"] - before)
            counts.append(layer.tokens_per_expert.clone())
        opt.step()
        opt.zero_grad()
    assert len({tuple(c.tolist()) for c in counts}) > 1  # the routing did differ
    # Warm-up (3 optimizer steps, 4 calls): static sizes, then dynamic ones, then the first state
    # committed by a step; after it nothing new compiles over 5 steps (7 calls).
    assert sum(new[4:]) == 0 and len(new) == 12, new
    assert layer.num_training_forwards == len(new)
    if layer.defaults is not None:
        assert layer.defaults.defaults_ED.abs().sum() > 0  # committed at the steps


def _python_state(module):
    skip = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"}
    return {
        f"{name}.{k}": repr(v)
        for name, mod in module.named_modules()
        for k, v in vars(mod).items()
        if k not in skip and not k.endswith("hooks") and isinstance(v, (int, float, str, bool, list, tuple, set))
    }


@pytest.mark.parametrize("kw", ROUTERS[:2], ids=["topk", "default"])
def test_a_training_forward_writes_no_python_attribute(kw):
    layer = _layer(**kw)
    layer(torch.randn(16, 32)).sum().backward()
    before = _python_state(layer)
    out = layer(torch.randn(16, 32))
    assert _python_state(layer) == before  # (the statistics' counters move in backward, outside)
    out.sum().backward()
    assert layer.num_training_forwards == 2  # a device counter


def test_default_runs_at_most_10_percent_more_aten_ops_than_topk():
    """Each aten op is a kernel launch on a GPU: Default MoE's term and statistics stay within
    1.10x TopK's ops per forward+backward (launch/bench_compile.py prints the same count)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    ops = {}
    for router in ("topk", "default"):
        layer = _layer(router=router)
        x = torch.randn(256, 32)
        layer(x).square().mean().backward()
        Count.n = 0
        with Count():
            layer(x).square().mean().backward()
        ops[router] = Count.n
    assert ops["default"] <= 1.10 * ops["topk"], ops


def test_compiled_backward_reads_the_aux_scale_set_after_the_forward():
    """Engines set the aux-loss scale between forward and backward (1/GAS, the fp16 loss scale). A
    compiled backward (AOT autograd, as inductor runs it) saved the scale tensor at the forward: the
    change must neither fail its saved-tensor version check nor be missed. Found by the main job's
    per-block compile under DeepSpeed."""
    from default_moe.losses import AuxLossAutoScaler

    def router_grad(layer, fn, scale):
        AuxLossAutoScaler.set_loss_scale(1.0)
        out = fn(torch.randn(64, 32, generator=torch.Generator().manual_seed(5)))
        AuxLossAutoScaler.set_loss_scale(scale)
        out.square().mean().backward()
        g = [p.grad.clone() for p in layer.router.parameters()]
        layer.zero_grad()
        return g

    try:
        for scale in (0.25, 3.0):
            eager = _layer(router="default", aux_loss_coeff=1.0)
            compiled = _layer(router="default", aux_loss_coeff=1.0)
            torch._dynamo.reset()
            fn = torch.compile(compiled, backend="aot_eager")
            for a, b in zip(router_grad(eager, eager, scale), router_grad(compiled, fn, scale)):
                torch.testing.assert_close(a, b)
        # The scale reaches the gradient: a different scale, a different router gradient.
        base = _layer(router="default", aux_loss_coeff=1.0)
        assert not torch.allclose(router_grad(base, base, 0.25)[0], router_grad(base, base, 3.0)[0])
    finally:
        AuxLossAutoScaler.set_loss_scale(1.0)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_compiled_layer_under_outside_checkpoint_counts_once(reentrant):
    """A compiled layer recomputed by torch.utils.checkpoint from outside (the forward runs twice,
    one backward) counts its statistics once, as the eager layer does (the step contract)."""
    from torch.utils.checkpoint import checkpoint

    torch._dynamo.reset()
    layer = _layer(router="default")
    compiled = torch.compile(layer, backend="aot_eager")
    x = torch.randn(64, 32, requires_grad=True)
    checkpoint(compiled, x, use_reentrant=reentrant).square().mean().backward()
    assert layer.defaults.pending == 1
    assert float(layer.defaults.stats_ED1[:, -1].sum()) == 64 * SIZE["top_k"]  # every slot once
