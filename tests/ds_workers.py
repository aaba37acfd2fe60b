"""Per-rank bodies of the DeepSpeed engine tests (2 gloo processes, CPU)."""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import default_moe.integrations.deepspeed as dm_ds
from default_moe import AuxLossAutoScaler, MoEConfig, MoELayer, count_collectives

D_IN, D, E, D_OUT = 8, 16, 4, 4
SECTION = {"enabled": True, "router": "default", "ep_size": 2, "top_k": 2, "beta": 0.8}


class ToyMoEModel(nn.Module):
    """Linear -> 2 residual MoE layers -> Linear, MSE loss. Built with ep_size=1, router topk."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(D_IN, D)
        cfg = MoEConfig(hidden_size=D, num_experts=E, ffn_hidden_size=32, top_k=1, router="topk", init_std=0.3)
        self.moe1 = MoELayer(cfg)
        self.moe2 = MoELayer(cfg)
        self.out = nn.Linear(D, D_OUT)

    def forward(self, x, y):
        h = self.inp(x)
        h = h + self.moe1(h)
        h = h + self.moe2(h)
        return F.mse_loss(self.out(h), y)


def batch(step: int, mb: int, rank: int):
    g = torch.Generator().manual_seed(10_000 + 100 * step + 10 * mb + rank)
    return torch.randn(4, 6, D_IN, generator=g), torch.randn(4, 6, D_OUT, generator=g)


def ds_config(stage: int, gas: int = 1, clip: float = 0.0, section: Dict = SECTION, optimizer: bool = True) -> Dict:
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": gas,
        "zero_optimization": {"stage": stage},
        "gradient_clipping": clip,
        "steps_per_print": 10_000,
    }
    if optimizer:
        cfg["optimizer"] = {"type": "Adam", "params": {"lr": 0.02, "weight_decay": 0.0, "torch_adam": True}}
    if section is not None:
        cfg["default_moe"] = section
    return cfg


def train_engine(engine, steps: int, gas: int, first_step: int = 0) -> List[float]:
    """Mean over ranks of each micro-batch loss."""
    rank = dist.get_rank()
    losses = []
    for step in range(first_step, first_step + steps):
        for mb in range(gas):
            x, y = batch(step, mb, rank)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / dist.get_world_size())
    return losses


def train_reference(steps: int, gas: int, clip: float, world: int, section: Dict = SECTION) -> List[float]:
    """The same model, not sharded, plain torch, on the union of all ranks' micro-batches."""
    model = ToyMoEModel(seed=0)
    overrides = {k: v for k, v in section.items() if k not in ("enabled", "ep_size")}
    for m in (model.moe1, model.moe2):
        m.reconfigure(MoEConfig(**{**m.config.to_dict(), **overrides}), groups=m.groups)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for step in range(steps):
        opt.zero_grad()
        for mb in range(gas):
            xs, ys = zip(*[batch(step, mb, r) for r in range(world)])
            loss = model(torch.cat(xs), torch.cat(ys))
            AuxLossAutoScaler.set_loss_scale(1.0 / gas)
            (loss / gas).backward()
            losses.append(loss.item())
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return losses


def assert_losses(got, want, what, rtol=2e-5):
    assert len(got) == len(want), (what, got, want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert abs(a - b) <= rtol * abs(b) + 1e-7, f"{what}: loss {i}: deepspeed {a} vs reference {b}\n{got}\n{want}"


def check_offline_conversion(engine, model, ckpt: str, rank: int) -> None:
    """`default-moe convert-deepspeed` (no process group) turns the EP=2 DeepSpeed checkpoint into
    one that loads into an EP=1 model with the same eval losses as the engine on each rank's batch."""
    from default_moe import ParallelGroups, checkpoint
    from default_moe.cli import main as cli_main

    engine.eval()
    x, y = batch(99, 0, rank)
    with torch.no_grad():
        engine_loss = engine(x, y).item()
    engine.train()
    if rank == 0:
        assert cli_main(["convert-deepspeed", ckpt, f"{ckpt}.pt"]) == 0
        assert cli_main(["convert-deepspeed", ckpt, f"{ckpt}.pt"]) == 2  # no silent overwrite
    dist.barrier()
    single = ToyMoEModel(seed=321)
    for name in ("moe1", "moe2"):
        cfg = MoEConfig.from_dict({**getattr(model, name).config.to_dict(), "ep_size": 1})
        setattr(single, name, MoELayer(cfg, ParallelGroups.single()))
    extra = checkpoint.load(single, f"{ckpt}.pt")
    assert extra["saved_ep_size"] == 2 and single.moe1.experts.w_in.shape[0] == E
    single.eval()
    with torch.no_grad():
        single_loss = single(x, y).item()
    assert abs(single_loss - engine_loss) <= 1e-6 * abs(engine_loss), (rank, single_loss, engine_loss)
    dist.barrier()


def all_checks(rank: int, world: int, tmpdir: str) -> None:
    import deepspeed

    dm_ds.skip_cpu_jit_builds()
    plain_initialize = deepspeed.initialize

    # 1. Bad sections fail before any engine or collective.
    for bad, needle in [
        ({"enabled": True, "beta": 1.5}, "MoEConfig.beta"),
        ({"enabled": True, "router": "nope"}, "MoEConfig.router must be one of"),
        ({"enabled": True, "betaa": 0.9}, "unknown key(s) ['betaa']"),
        ({"enabled": True, "ep_size": 3}, "ep_size"),
        ({"enabled": True, "top_k": 8}, "MoEConfig.top_k must be <= num_experts (4)"),
        ({"enabled": "yes"}, "enabled"),
    ]:
        model = ToyMoEModel()
        with count_collectives() as c:
            try:
                dm_ds.initialize(model=model, config=ds_config(0, section=bad))
            except ValueError as e:
                assert needle in str(e) and "default_moe" in str(e), (bad, str(e))
            else:
                raise AssertionError(f"accepted {bad}")
        assert c.records == [] and model.moe1.config.router == "topk"

    # 2. Flag off (and no section) == plain DeepSpeed.
    for section in [None, {"enabled": False, "router": "default"}]:
        e_ours, *_ = dm_ds.initialize(model=ToyMoEModel(), config=ds_config(0, section=section))
        e_plain, *_ = plain_initialize(model=ToyMoEModel(), config=ds_config(0, section=section))
        assert e_ours.module.moe1.config.router == "topk"
        a, b = train_engine(e_ours, 2, 1), train_engine(e_plain, 2, 1)
        assert a == b, (a, b)

    # 3. Flag on == the dense single-process reference of the union batch.
    ref_cache = {}
    for stage, gas, clip, client_opt in [(0, 1, 0.0, False), (1, 1, 0.05, False), (2, 2, 0.05, True), (1, 2, 0.0, True)]:
        model = ToyMoEModel()
        opt = torch.optim.Adam(model.parameters(), lr=0.02) if client_opt else None
        engine, *_ = dm_ds.initialize(model=model, optimizer=opt, config=ds_config(stage, gas, clip, optimizer=not client_opt))
        assert engine.has_moe_layers and model.moe1.config.ep_size == 2 and model.moe1.config.router == "default"
        assert model.moe1.experts.w_in.shape[0] == E // 2
        got = train_engine(engine, 3, gas)
        key = (gas, clip)
        if key not in ref_cache:
            ref_cache[key] = train_reference(3, gas, clip, world)
        assert_losses(got, ref_cache[key], f"zero {stage} gas {gas} clip {clip} client_opt {client_opt}")
        Ds = [m.defaults.defaults_ED.clone() for m in (model.moe1, model.moe2)]
        for Dm in Ds:
            others = [torch.empty_like(Dm) for _ in range(world)]
            dist.all_gather(others, Dm)
            assert all(torch.equal(o, Dm) for o in others) and Dm.abs().sum() > 0

    # 4. save -> continue vs load -> continue: the next step's loss is identical.
    for stage in [0, 1, 2]:
        ckpt = f"{tmpdir}/ckpt_zero{stage}"
        model = ToyMoEModel()
        engine, *_ = dm_ds.initialize(model=model, config=ds_config(stage, 2))
        train_engine(engine, 2, 2)
        engine.save_checkpoint(ckpt)
        D_saved = model.moe2.defaults.defaults_ED.clone()
        if stage == 1:
            check_offline_conversion(engine, model, ckpt, rank)
        cont = train_engine(engine, 2, 2, first_step=2)

        model2 = ToyMoEModel(seed=123)
        engine2, *_ = dm_ds.initialize(model=model2, config=ds_config(stage, 2))
        engine2.load_checkpoint(ckpt)
        assert torch.equal(model2.moe2.defaults.defaults_ED, D_saved)
        resumed = train_engine(engine2, 2, 2, first_step=2)
        assert resumed == cont, f"zero {stage}: resumed {resumed} vs uninterrupted {cont}"

    # 5. The one-import form: a plain deepspeed.initialize honours the section.
    import default_moe.deepspeed  # noqa: F401

    try:
        assert deepspeed.initialize is not plain_initialize
        model = ToyMoEModel()
        engine, *_ = deepspeed.initialize(model=model, config=ds_config(1, 1, 0.05))
        assert model.moe1.config.router == "default" and engine.has_moe_layers
        assert_losses(train_engine(engine, 3, 1), ref_cache[(1, 0.05)], "one-import form")
    finally:
        dm_ds.unregister()
    assert deepspeed.initialize is plain_initialize

    # 6. The section reaching DeepSpeed's own initialize (a name bound before the hook, or the
    # import forgotten) is refused before any engine exists, instead of being ignored.
    try:
        plain_initialize(model=ToyMoEModel(), config=ds_config(1, 1, 0.05))
    except ValueError as e:
        assert "was not built by default_moe's initialize" in str(e), str(e)
    else:
        raise AssertionError("an enabled default_moe section reached plain DeepSpeed unnoticed")
