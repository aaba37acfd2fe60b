"""The main job's set-up: process group, data, model, DeepSpeed engine with the "default_moe"
section, and the resume from the newest complete checkpoint; everything the loop needs in a `Job`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from default_moe import data as data_mod
from default_moe.integrations import deepspeed as dm_ds
from default_moe.models.gpt import GPT, GPTConfig
from default_moe.parallel import init_distributed_from_env
from default_moe.train.config import RunConfig, lr_lambda


@dataclasses.dataclass
class Job:
    """The state one run of the main job carries from set-up through the loop to the report."""

    run: RunConfig
    gpt: GPTConfig
    rank: int
    world: int
    run_dir: Path
    ckpt_dir: Path
    train_tokens: Any
    val_tokens: Any
    model: Any
    engine: Any
    scheduler: Any
    gas: int
    start_step: int = 0
    history: Dict[str, list] = dataclasses.field(
        default_factory=lambda: {"train": [], "val": [], "step_time": [], "load": [], "rank_load": []}
    )
    writer: Optional[Any] = None
    t_start: float = 0.0
    # The last step trained (== run.steps unless max_minutes stopped the run).
    steps_done: int = 0
    # perf_counter at the end of each iteration of this session (the step, its logging,
    # evaluation and checkpoint): what a step costs in wall time, for time_budget_minutes.
    iteration_ends: List[float] = dataclasses.field(default_factory=list)

    @property
    def moe_config(self):
        return self.model.moe_layers[0].config

    def params(self) -> Dict[str, float]:
        """Total parameters (experts counted once over the EP group) and active per token."""
        cfg = self.moe_config
        n_params = sum(p.numel() for p in self.model.parameters())
        n_expert = sum(p.numel() for layer in self.model.moe_layers for p in layer.experts.parameters())
        total = n_params + n_expert * (cfg.ep_size - 1)
        return {"total": total, "active": total - n_expert * cfg.ep_size * (1 - cfg.top_k / cfg.num_experts)}


def _quiet_engine_logs() -> None:
    import logging
    import warnings

    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    # torch 2.13 deprecates a collective DeepSpeed's ZeRO still calls every step.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


def build(run: RunConfig, gpt: GPTConfig, ds_config: Dict[str, Any], resume: bool) -> Job:
    """Process group, tokens (rank 0 tokenises once into the cache), model, engine, resume."""
    import deepspeed

    _quiet_engine_logs()
    dm_ds.skip_cpu_jit_builds()
    # Our init first (DeepSpeed's then finds the group made): it scopes torchrun's store per restart
    # round, so a job restarted by `--max-restarts` does not meet the old round's addresses.
    init_distributed_from_env(run.dist_timeout_s)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    run_dir = Path(run.run_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        data_mod.load_tokens(run.data, run.tokenizer, run.token_dtype)  # tokenise once into the cache
    dist.barrier()
    tokens = data_mod.load_tokens(run.data, run.tokenizer, run.token_dtype)
    train_tokens, val_tokens = data_mod.split_train_val(tokens)
    if int(tokens.max()) >= gpt.vocab_size:
        raise ValueError(f"token id {int(tokens.max())} >= GPTConfig.vocab_size {gpt.vocab_size}")

    torch.manual_seed(run.seed)  # same initial weights on every rank; the section shards experts
    model = GPT(gpt)
    if run.compile:
        import torch.fx.experimental._config as fx_config

        # Per block, in place (state-dict keys unchanged): the MoE layer's data-dependent split
        # sizes break each block's graph where the host needs them, and nowhere else. Without
        # size-oblivious guards dynamo specialises an expert's token count of 0 or 1 (contiguity
        # checks on its rows) and compiles a new graph whenever some expert gets 0 or 1 tokens.
        fx_config.backed_size_oblivious = True
        for block in model.blocks:
            block.compile()
    ds_config = dict(ds_config)
    ds_config["train_micro_batch_size_per_gpu"] = run.micro_batch
    ds_config.setdefault("gradient_accumulation_steps", 1)
    ds_config.pop("train_batch_size", None)
    ds_config["optimizer"]["params"]["lr"] = run.lr
    engine, _, _, scheduler = dm_ds.initialize(
        model=model,
        model_parameters=list(model.parameters()),
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(run)),
    )
    job = Job(
        run=run,
        gpt=gpt,
        rank=rank,
        world=world,
        run_dir=run_dir,
        ckpt_dir=run_dir / "ckpt",
        train_tokens=train_tokens,
        val_tokens=val_tokens,
        model=model,
        engine=engine,
        scheduler=scheduler,
        gas=engine.gradient_accumulation_steps(),
    )
    if resume:
        # `resume` is True (the checkpoint `latest` names, or the newest complete one in commit
        # order) or a tag (--resume-from). Torn saves are skipped with a warning naming them.
        tag = resume if isinstance(resume, str) else None
        load_path, client = engine.load_checkpoint(str(job.ckpt_dir), tag=tag)
        if load_path is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint in {job.ckpt_dir}")
        job.start_step, job.history = client["step"], client["history"]
        apply_run_lr(job)
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        job.writer = SummaryWriter(str(run_dir / "tb"))
    return job


def apply_run_lr(job: Job) -> None:
    """A resumed run trains with its own --lr: the checkpoint restored the schedule's base LR of
    the run that saved it, so a changed value (lowering the LR after a loss spike) would be
    silently ignored. The schedule's shape and position are kept; the change is printed."""
    scheduler, run = job.scheduler, job.run
    saved = list(scheduler.base_lrs)
    if all(abs(b - run.lr) <= 1e-12 * max(1.0, abs(run.lr)) for b in saved):
        return
    scheduler.base_lrs = [run.lr for _ in saved]
    factor = lr_lambda(run)(scheduler.last_epoch)
    for group in scheduler.optimizer.param_groups:
        group["initial_lr"] = run.lr
        group["lr"] = run.lr * factor
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]
    if job.rank == 0:
        print(
            f"[train] --lr {run.lr:g} differs from the checkpoint's {saved[0]:g}: training on with {run.lr:g} "
            f"(schedule position kept, step {scheduler.last_epoch}: lr now {run.lr * factor:.3g})",
            flush=True,
        )


def announce(job: Job, resumed: bool) -> None:
    """Rank 0 prints the run's shape once."""
    if job.rank != 0:
        return
    cfg, gpt, engine, params = job.moe_config, job.gpt, job.engine, job.params()
    print(
        f"[train] world={job.world} device={engine.device} router={cfg.router} ep_size={cfg.ep_size} "
        f"experts={cfg.num_experts} top_k={cfg.top_k} beta={cfg.beta} "
        f"default_in_forward={'auto' if cfg.default_in_forward is None else cfg.default_in_forward} "
        f"zero={engine.zero_optimization_stage()} gas={job.gas}"
    )
    print(
        f"[train] model: d={gpt.d_model} layers={gpt.n_layers} vocab={gpt.vocab_size} seq={gpt.seq_len}; "
        f"params {params['total'] / 1e6:.2f}M total, {params['active'] / 1e6:.2f}M active per token; "
        f"data: {len(job.train_tokens):,} train / {len(job.val_tokens):,} val tokens"
        + (f"; resumed at step {job.start_step}" if resumed else "")
    )
