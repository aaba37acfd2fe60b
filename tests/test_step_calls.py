"""One commit per effective optimizer step, however the step is called (issue 36): one optimizer,
two or three optimizers splitting a layer's parameters, `step(closure)`, gradient accumulation, a
step with no forward since the last one, the agreed GradScaler with and without a skipped step;
at EP 2 (world 2) and EP 2 x DP 2 (world 4) a rank-local overflow skips on every rank (no hang),
and ranks running different numbers of train-mode no-grad forwards (rollouts) then train with no
collective mismatch and identical D. Every D is checked against a float64 reference written out
here from the formulas (every expert run for every token)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist

from default_moe import MoEConfig, MoELayer, amp
from default_moe.amp import GradScaler
from dist import run_distributed
from reference import Weights, expert_mlp, load_into_layer

E, D, F_, K, BETA = 6, 8, 12, 2, 0.7


def reference_defaults(w: Weights, steps, stale: str = "zero") -> list:
    """D after each effective step (float64): `steps` is a list of the step's token batches (None:
    the step did not happen); D_i <- beta D_i + (1 - beta) mean of expert i's raw outputs over the
    step's routed slots; an expert without tokens decays toward zero (stale_defaults="zero")."""
    wd = w.double(requires_grad=False)
    D_ED = torch.zeros(E, D, dtype=torch.float64)
    out = []
    for xs in steps:
        if xs is not None:
            x = torch.cat(xs).double()
            idx = torch.topk(torch.softmax(x @ wd.router_ED.t(), -1), K, -1).indices
            new = D_ED.clone()
            for e in range(E):
                rows = (idx == e).any(-1)
                if rows.any():
                    mean = expert_mlp(x[rows], wd.w1_EDF[e], wd.w3_EDF[e], wd.w2_EFD[e]).mean(0)
                    new[e] = BETA * D_ED[e] + (1 - BETA) * mean
                elif stale == "zero":
                    new[e] = BETA * D_ED[e]
            D_ED = new
        out.append(D_ED.clone())
    return out


def _layer(seed: int = 1, ep_size: int = 1, **kw) -> tuple:
    settings = dict(
        router="default",
        beta=BETA,
        stale_defaults="zero",  # an extra or empty commit would decay D: these tests see it
        aux_loss_coeff=0.0,
        ep_size=ep_size,
    )
    cfg = MoEConfig(hidden_size=D, num_experts=E, ffn_hidden_size=F_, top_k=K, **{**settings, **kw})
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    w = Weights.random(E, D, F_, True, seed=seed)
    load_into_layer(layer, w)
    return layer, w


def _batches(n_steps: int, tokens: int = 24, seed: int = 5) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(tokens, D, generator=g) for _ in range(n_steps)]


VARIANTS = [
    "one",
    "split2",
    "split3",
    "closure",
    "accumulation",
    "empty_step",
    "scaler",
    "scaler_skip",
    "torch_scaler_skip",
    "torch_scaler_fused_skip",
    "unhooked_torch_scaler_skip",
]


@contextlib.contextmanager
def torch_grad_scaler_unhooked():
    """torch's GradScaler as it ships (default_moe.amp hooks it at import): the control."""
    hooked = {name: getattr(torch.amp.GradScaler, name) for name in amp._TORCH}
    for name, original in amp._TORCH.items():
        setattr(torch.amp.GradScaler, name, original)
    try:
        yield
    finally:
        for name, fn in hooked.items():
            setattr(torch.amp.GradScaler, name, fn)


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_commit_per_effective_step_with_that_steps_statistics(variant):
    """D after every step equals the float64 reference of the steps that happened. Split
    optimizers used to commit twice (the second commit empty: D decayed with stale "zero"), a
    closure's statistics were committed one step late, and a skipped step's statistics merged into
    the next step's commit. torch's own GradScaler (hooked by default_moe.amp at import) and a
    fused optimizer's in-kernel skip drop them too; torch's GradScaler unhooked still merges them:
    that variant is the control that shows the test can fail."""
    layer, w = _layer()
    xs = _batches(4)
    params = dict(layer.named_parameters())
    router = [p for n, p in params.items() if n.startswith("router")]
    rest = [p for n, p in params.items() if not n.startswith("router")]
    if variant == "split2":
        opts = [torch.optim.SGD(router, lr=0.0), torch.optim.SGD(rest, lr=0.0)]
    elif variant == "split3":
        w2 = [p for n, p in params.items() if "w2" in n]
        others = [p for p in rest if all(p is not q for q in w2)]
        opts = [torch.optim.SGD(w2, lr=0.0), torch.optim.SGD(router, lr=0.0), torch.optim.AdamW(others, lr=0.0)]
    elif variant == "torch_scaler_fused_skip":
        opts = [torch.optim.Adam(layer.parameters(), lr=0.0, fused=True)]
        assert opts[0]._step_supports_amp_scaling  # GradScaler takes its fused path
    else:
        opts = [torch.optim.SGD(layer.parameters(), lr=0.0)]
    scaler = GradScaler("cpu") if variant.startswith("scaler") else None
    if "torch_scaler" in variant:
        scaler = torch.amp.GradScaler("cpu")
    unhooked = torch_grad_scaler_unhooked if variant.startswith("unhooked") else contextlib.nullcontext
    skip_at = 1 if variant.endswith("skip") else None
    happened, seen = [], []
    for i, x in enumerate(xs):
        for o in opts:
            o.zero_grad()
        if variant == "closure":

            def closure(x=x):
                opts[0].zero_grad()
                loss = layer(x).square().mean()
                loss.backward()
                return loss

            opts[0].step(closure)
        elif variant == "accumulation":
            for half in x.chunk(2):
                layer(half).square().mean().backward()
            opts[0].step()
        elif scaler is not None:
            loss = layer(x).square().mean()
            if i == skip_at:
                loss = loss * float("inf")  # an overflow in the backward: the step is skipped
            scaler.scale(loss).backward()
            with unhooked():
                scaler.step(opts[0])
            scaler.update()
        else:
            layer(x).square().mean().backward()
            for o in opts:
                o.step()
            if variant == "empty_step":
                opts[0].step()  # a step with no forward since the last one changes nothing
        happened.append(None if i == skip_at else [x])
        seen.append(layer.defaults.defaults_ED.double().clone())
    ref = reference_defaults(w, happened)
    if variant == "unhooked_torch_scaler_skip":
        # The skipped step's statistics merged into the next commit: the wrong D, as the issue says.
        assert not torch.allclose(seen[2], ref[2], rtol=1e-4, atol=1e-5)
        return
    for i, (got, want) in enumerate(zip(seen, ref)):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6, msg=lambda m, i=i: f"after step {i}: {m}")
    # An empty commit (a step with nothing pending: a fused optimizer's step runs at the skip) is
    # counted and changes nothing.
    empty_commits = (variant == "empty_step") * len(xs) + (variant == "torch_scaler_fused_skip")
    assert layer.defaults.num_updates == len([h for h in happened if h is not None]) + empty_commits
    if variant.endswith("skip"):
        assert scaler.get_scale() < 65536.0  # the skip happened (backoff)
    if variant == "scaler_skip":
        assert scaler.skipped_steps == 1


def _distributed_checks(rank: int, world: int) -> None:
    """(1) EP 2 (x DP world/2): a rank-local overflow under our GradScaler, torch's (hooked at
    import) and torch's with a fused optimizer skips on every rank within a bounded time and drops
    that step's statistics; (2) DP over all ranks: train-mode
    no-grad forwards in different counts per rank (aux loss on), then training steps: no collective
    mismatch, D identical on every rank and equal to the float64 reference of the trained batches."""
    ep = 2
    xs = _batches(3, seed=10 + rank)
    per_step = []
    for i, x in enumerate(xs):
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        per_step.append(None if i == 1 else parts)
    for kind in ("ours", "torch", "torch-fused"):
        layer, w = _layer(ep_size=ep)
        layer.train()
        if kind == "torch-fused":
            opt = torch.optim.Adam(layer.parameters(), lr=0.0, fused=True)
        else:
            opt = torch.optim.SGD(layer.parameters(), lr=0.0)
        scaler = GradScaler("cpu") if kind == "ours" else torch.amp.GradScaler("cpu")
        for i, x in enumerate(xs):
            opt.zero_grad()
            loss = layer(x).square().mean()
            if i == 1 and rank == 0:  # only rank 0 overflows (its experts' gradients are its own)
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if kind == "ours":
            assert scaler.skipped_steps == 1, (rank, scaler.skipped_steps)
        scales = [None] * world
        dist.all_gather_object(scales, scaler.get_scale())
        assert scales == [65536.0 / 2] * world, (kind, scales)  # every rank backed off once: all skipped
        ref = reference_defaults(w, per_step)
        torch.testing.assert_close(
            layer.defaults.defaults_ED.double(), ref[-1], rtol=2e-5, atol=2e-6, msg=lambda m, k=kind: f"{k}: {m}"
        )

    # (2) Rollouts: no-grad train-mode forwards, rank r runs r + 1 of them; aux loss on. At EP 1
    # (data parallel over all ranks): under EP every forward is an all-to-all, so EP ranks run
    # their forwards together in any framework; the DP ranks' aux-loss counts need not.
    layer, w = _layer(seed=3, ep_size=1, aux_loss_coeff=0.01)
    layer.train()
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    g = torch.Generator().manual_seed(100 + rank)
    trained = []
    for step in range(2):
        with torch.no_grad():
            for _ in range(rank + 1 + step):
                layer(torch.randn(16 + 4 * rank, D, generator=g))
        x = torch.randn(24, D, generator=g)
        opt.zero_grad()
        layer(x).square().mean().backward()
        opt.step()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        trained.append(parts)
    Ds = [torch.empty_like(layer.defaults.defaults_ED) for _ in range(world)]
    dist.all_gather(Ds, layer.defaults.defaults_ED)
    assert all(torch.equal(Ds[0], d) for d in Ds)
    torch.testing.assert_close(layer.defaults.defaults_ED.double(), reference_defaults(w, trained)[-1], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("world", [2, 4])
def test_rank_local_overflow_and_rollouts_at_ep2(world):
    run_distributed(_distributed_checks, world)


def _deepspeed_fp16_overflow_skips(rank: int, world: int, mode: str) -> None:
    """DeepSpeed fp16 (DP 2) with overflow skips: at every step the engine skipped, D is
    unchanged and the step's statistics are dropped (not merged into the next commit); D after
    the run equals the float64 reference of the applied steps' tokens (every rank's moe1 inputs,
    the weights of the time). mode "fp16": DeepSpeed's fp16 optimizer (ZeRO 1) from a loss scale
    that overflows. mode "torch_autocast": DeepSpeed's torch GradScaler (torch_autocast fp16,
    ZeRO 0) with an overflow planted in rank 0's loss at step 1 — DeepSpeed's
    `was_step_applied()` says True there; the scale's backoff shows the skip."""
    import deepspeed

    import default_moe.integrations.deepspeed as dm_ds
    import ds_workers as dw

    dm_ds.skip_cpu_jit_builds()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    section = {"enabled": True, "router": "default", "beta": BETA, "ep_size": 1, "top_k": K}
    if mode == "fp16":
        cfg = dw.ds_config(1, section=section)
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 18, "loss_scale_window": 1000, "hysteresis": 1}
    else:
        cfg = dw.ds_config(0, section=section)
        cfg["torch_autocast"] = {"enabled": True, "dtype": "torch.float16"}
    engine, *_ = dm_ds.initialize(model=dw.ToyMoEModel(), config=cfg)
    scaler = engine.torch_autocast_z0_gradscaler
    assert (scaler is not None) == (mode == "torch_autocast")
    layer = engine.module.moe1
    captured = []
    layer.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach().reshape(-1, args[0].shape[-1]).clone()))
    applied, D_seen, weights = [], [], []
    for step in range(6):
        w_in, w2 = layer.experts.w_in.detach().clone(), layer.experts.w2_LFD.detach().clone()
        weights.append((layer.router.weight.detach().clone(), w_in, w2))
        before = layer.defaults.defaults_ED.clone()
        x, y = dw.batch(step, 0, rank)
        if mode == "fp16":
            loss = engine(x.half(), y.half())
        else:
            loss = engine(x, y)
            if step == 1 and rank == 0:
                loss = loss * float("inf")
        scale = scaler.get_scale() if scaler is not None else None
        engine.backward(loss)
        engine.step()
        applied.append(engine.was_step_applied() if scaler is None else scaler.get_scale() >= scale)
        if not applied[-1]:
            assert torch.equal(layer.defaults.defaults_ED, before) and layer.defaults.pending == 0
        D_seen.append(layer.defaults.defaults_ED.double().clone())
    assert not all(applied) and any(applied), applied  # skips, then steps
    assert layer.defaults.num_updates == sum(applied)
    ref = torch.zeros_like(D_seen[0])
    for step, ok in enumerate(applied):
        if not ok:
            continue
        parts = [torch.empty_like(captured[step]) for _ in range(world)]
        dist.all_gather(parts, captured[step])
        h = torch.cat(parts).double()
        router, w_in, w2 = (t.double() for t in weights[step])
        idx = torch.topk(torch.softmax(h @ router.t(), -1), K, -1).indices
        w1, w3 = w_in.chunk(2, dim=-1)
        E_ = router.shape[0]
        for e in range(E_):
            rows = (idx == e).any(-1)
            if rows.any():
                ref[e] = BETA * ref[e] + (1 - BETA) * expert_mlp(h[rows], w1[e], w3[e], w2[e]).mean(0)
    torch.testing.assert_close(D_seen[-1], ref, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("mode", ["fp16", "torch_autocast"])
def test_deepspeed_fp16_overflow_skip_drops_the_steps_statistics(mode):
    run_distributed(_deepspeed_fp16_overflow_skips, 2, mode)


def _deepspeed_pipeline_train_batch(rank: int, world: int) -> None:
    """DeepSpeed's pipeline engine steps inside `train_batch()` (never `engine.step()`): at one
    stage (DP 2, 2 micro-batches per step) D is committed once per `train_batch` with that step's
    statistics, equal to the float64 reference of every rank's micro-batches; more stages are
    refused by name before DeepSpeed builds anything."""
    import deepspeed
    import torch.nn.functional as F
    from deepspeed.pipe import PipelineModule
    from torch import nn

    import default_moe.integrations.deepspeed as dm_ds

    dm_ds.skip_cpu_jit_builds()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.moe = MoELayer(MoEConfig(hidden_size=D, num_experts=E, ffn_hidden_size=F_, top_k=1, router="topk", init_std=0.3))

        def forward(self, h):
            return h + self.moe(h)

    def pipeline(stages: int):
        torch.manual_seed(0)
        layers = [nn.Linear(4, D), Residual(), Residual(), nn.Linear(D, 4)]
        return PipelineModule(layers=layers, num_stages=stages, loss_fn=F.mse_loss, partition_method="uniform")

    config = {
        "train_micro_batch_size_per_gpu": 3,
        "gradient_accumulation_steps": 2,
        "steps_per_print": 10_000,
        "optimizer": {"type": "Adam", "params": {"lr": 0.0, "torch_adam": True}},  # D's reference needs fixed weights
        "default_moe": {"enabled": True, "router": "default", "ep_size": 1, "top_k": K, "beta": BETA},
    }
    with pytest.raises(ValueError, match="PipelineModule with num_stages=2 is not supported"):
        dm_ds.initialize(model=pipeline(2), config=config)
    model = pipeline(1)
    engine, *_ = dm_ds.initialize(model=model, config=config, model_parameters=list(model.parameters()))
    layers = [m for m in engine.module.modules() if isinstance(m, MoELayer)]
    seen = {id(m): [] for m in layers}
    for m in layers:
        m.register_forward_pre_hook(lambda mod, args: seen[id(mod)].append(args[0].detach().reshape(-1, D).clone()))
    g = torch.Generator().manual_seed(50 + rank)
    data = [(torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)) for _ in range(6)]
    it = iter(data)
    for step in range(3):
        engine.train_batch(data_iter=it)
        for m in layers:
            assert m.defaults.num_updates == step + 1 and m.defaults.pending == 0, (step, m.defaults.num_updates)
    for m in layers:
        w = Weights(
            router_ED=m.router.weight.detach().clone(),
            w1_EDF=m.experts.w_in.detach()[..., :F_].clone(),
            w3_EDF=m.experts.w_in.detach()[..., F_:].clone(),
            w2_EFD=m.experts.w2_LFD.detach().clone(),
        )
        steps = []
        for step in range(3):
            mine = torch.cat(seen[id(m)][2 * step : 2 * step + 2])
            parts = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(parts, mine)
            steps.append(parts)
        ref = reference_defaults(w, steps, stale="keep")
        torch.testing.assert_close(m.defaults.defaults_ED.double(), ref[-1], rtol=2e-5, atol=2e-6)


def test_deepspeed_pipeline_train_batch_commits_once_per_step():
    run_distributed(_deepspeed_pipeline_train_batch, 2)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("order", ["documented", "layer_first"])
def test_deepspeed_init_distributed_on_cpu_builds_nothing_and_waits_on_no_lock(tmp_path, order):
    """Issue 37 (6): the documented order (`import default_moe.deepspeed`, then
    `deepspeed.init_distributed()`), and a MoE layer built while DeepSpeed is imported before
    accelerate/the user initialises it (the HF Trainer path), skip DeepSpeed's CPU JIT build of its
    shared-memory op. A lock file left by a killed build is planted: a build would wait on it
    forever; the run ends in seconds."""
    import os
    import subprocess
    import sys

    ext = tmp_path / "torch_extensions"
    (ext / "deepspeed_shm_comm").mkdir(parents=True)
    (ext / "deepspeed_shm_comm" / "lock").write_text("")  # what a SIGKILLed build leaves
    first = (
        "import default_moe.deepspeed\n"
        if order == "documented"
        else "import deepspeed\nfrom default_moe import MoEConfig, MoELayer\n"
        "MoELayer(MoEConfig(hidden_size=8, num_experts=2, ffn_hidden_size=8, top_k=1))\n"
    )
    code = first + (
        "import deepspeed, time\n"
        "t = time.time()\n"
        "deepspeed.init_distributed(dist_backend='gloo', verbose=False)\n"
        "print('init took', round(time.time() - t, 1))\n"
    )
    env = {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": str(ext),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(__import__("dist").free_port()),
    }
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0 and "init took" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]
    assert "built successfully" not in out.stdout + out.stderr
