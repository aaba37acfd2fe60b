"""The main job: train a small GPT whose FFNs are MoE layers, through DeepSpeed with the
"default_moe" section, on the shipped corpus (or your own), on all local ranks.

    torchrun --nproc_per_node 2 launch/train.py --config configs/gpt_tiny.json [--steps 300] [--resume]

Every `RunConfig` field is a command-line flag (`--micro-batch 8`); the run config file sets the
defaults and names the DeepSpeed JSON, whose "default_moe" section `--router`, `--beta`,
and `--ep-size` override. Writes to `--run-dir`: checkpoints (ckpt/), TensorBoard
events (tb/), `metrics.json`, and `loss.png`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from default_moe import data as data_mod
from default_moe import manifest
from default_moe.integrations import deepspeed as dm_ds
from default_moe.models.gpt import GPT, GPTConfig
from default_moe.parallel import init_distributed_from_env


@dataclass
class RunConfig:
    """Run settings (model shape in GPTConfig fields, optimisation, logging)."""

    deepspeed_config: str = "configs/ds_gpt_tiny.json"
    run_dir: str = "runs/gpt_tiny"
    data: str = data_mod.SHIPPED
    tokenizer: Optional[str] = None
    token_dtype: str = "uint16"
    steps: int = 500
    micro_batch: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    eval_every: int = 50
    eval_batches: int = 8
    ckpt_every: int = 250
    # Complete checkpoints kept in run_dir/ckpt (0: all; None: the DeepSpeed section's
    # "checkpoint": {"keep_last"}); the newest complete one is never deleted.
    keep_last: Optional[int] = None
    log_every: int = 10
    seed: int = 1234
    # Every collective fails after this long instead of hanging (a dead or diverged rank).
    dist_timeout_s: float = 600.0
    # Stop (with a final eval and checkpoint) after the step that passes this much wall time.
    max_minutes: Optional[float] = None
    # Overrides of the DeepSpeed "default_moe" section (None: keep the JSON's value).
    router: Optional[str] = None
    beta: Optional[float] = None
    ep_size: Optional[int] = None
    ema_weighting: Optional[str] = None
    ema_stats_dtype: Optional[str] = None
    default_in_forward: Optional[bool] = None
    model: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch", "eval_every", "eval_batches", "ckpt_every", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"RunConfig.{name} (--{name.replace('_', '-')}) must be an integer >= 1, got {v!r}")
        if not (self.lr > 0):
            raise ValueError(f"RunConfig.lr (--lr) must be > 0, got {self.lr!r}")
        if self.max_minutes is not None and not (self.max_minutes > 0):
            raise ValueError(f"RunConfig.max_minutes (--max-minutes) must be > 0, got {self.max_minutes!r}")
        if not (self.dist_timeout_s > 0):
            raise ValueError(f"RunConfig.dist_timeout_s (--dist-timeout-s) must be > 0 seconds, got {self.dist_timeout_s!r}")
        if self.keep_last is not None and (isinstance(self.keep_last, bool) or self.keep_last < 0):
            raise ValueError(f"RunConfig.keep_last (--keep-last) must be an integer >= 0 (0 keeps all), got {self.keep_last!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"RunConfig.warmup_steps (--warmup-steps) must be >= 0, got {self.warmup_steps!r}")


def _flag_bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def parse_args(argv: Optional[List[str]] = None) -> tuple:
    """Run config file + command-line overrides -> (RunConfig, GPTConfig, DeepSpeed config dict, resume)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/gpt_tiny.json", help="run config JSON")
    ap.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in run_dir/ckpt")
    ap.add_argument("--auto-resume", action="store_true",
                    help="resume if run_dir/ckpt has a checkpoint, else start fresh (for torchrun --max-restarts)")
    # Passed by the `deepspeed` launcher; the rank comes from the environment it also sets.
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    for f in dataclasses.fields(RunConfig):
        if f.name == "model":
            continue
        typ = {"int": int, "float": float, "str": str, "bool": _flag_bool}.get(
            str(f.type).replace("Optional[", "").rstrip("]"), str)
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=typ, default=None, help=f"(RunConfig.{f.name})")
    for f in dataclasses.fields(GPTConfig):
        if f.name in ("router",):
            continue
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None, dest=f"model_{f.name}",
                        help=f"(GPTConfig.{f.name})")
    args = ap.parse_args(argv)
    try:
        with open(args.config) as fh:
            file_cfg = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        ap.error(f"--config {args.config}: {e}")
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(file_cfg) - known)
    if unknown:
        ap.error(f"{args.config}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    values = dict(file_cfg)
    for f in dataclasses.fields(RunConfig):
        v = getattr(args, f.name, None)
        if v is not None and f.name != "model":
            values[f.name] = v
    model = dict(values.get("model", {}))
    for f in dataclasses.fields(GPTConfig):
        v = getattr(args, f"model_{f.name}", None)
        if v is not None:
            model[f.name] = v
    values["model"] = model
    try:
        run = RunConfig(**values)
        gpt_unknown = sorted(set(model) - {f.name for f in dataclasses.fields(GPTConfig)})
        if gpt_unknown:
            raise ValueError(f'unknown key(s) {gpt_unknown} in "model"')
        gpt = GPTConfig(**model)
        with open(run.deepspeed_config) as fh:
            ds_config = json.load(fh)
        section = dict(ds_config.get("default_moe", {"enabled": True}))
        for key in ("router", "beta", "ep_size", "ema_weighting", "ema_stats_dtype", "default_in_forward"):
            if getattr(run, key) is not None:
                section[key] = getattr(run, key)
        if section.get("router") == "stablemoe" and "stablemoe" not in section:
            # The distilled router embeds token ids; stage 2 from 10% of training (the paper's).
            gas = int(ds_config.get("gradient_accumulation_steps", 1))
            section["stablemoe"] = {"vocab_size": gpt.vocab_size, "stage2_step": max(1, run.steps // 10) * gas}
        if run.keep_last is not None:
            section["checkpoint"] = {**section.get("checkpoint", {}), "keep_last": run.keep_last}
        ds_config["default_moe"] = section
        dm_ds.DeepSpeedMoESection.from_ds_config(ds_config)  # fail early, before any process group
        if section.get("enabled", True):
            dataclasses.replace(gpt.moe_config(), **{k: v for k, v in section.items() if k not in ("enabled", "checkpoint")})
    except (ValueError, TypeError, OSError, json.JSONDecodeError) as e:
        ap.error(str(e))
    resume = args.resume or (args.auto_resume and manifest.has_checkpoint(str(Path(run.run_dir) / "ckpt")))
    return run, gpt, ds_config, resume


def lr_lambda(run: RunConfig):
    def f(step: int) -> float:
        if step < run.warmup_steps:
            return (step + 1) / run.warmup_steps
        progress = min(1.0, (step - run.warmup_steps) / max(1, run.steps - run.warmup_steps))
        return run.min_lr_ratio + (1 - run.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _out_of_time(run: RunConfig, t_start: float, device) -> bool:
    """Whether `max_minutes` has passed (rank 0's clock, so every rank stops at the same step)."""
    if run.max_minutes is None:
        return False
    flag = torch.tensor([float(time.perf_counter() - t_start >= 60.0 * run.max_minutes)], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def _mean_over_ranks(value: float, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


@torch.no_grad()
def evaluate(engine, val_tokens, run: RunConfig, gpt: GPTConfig, rank: int) -> float:
    engine.eval()
    losses = []
    for i in range(run.eval_batches):
        # A fixed validation set: the same windows at every evaluation.
        x, y = data_mod.sample_batch(val_tokens, run.micro_batch, gpt.seq_len, run.seed + 1, 0, rank, i)
        losses.append(engine(x.to(engine.device), y.to(engine.device)).item())
    engine.train()
    return _mean_over_ranks(sum(losses) / len(losses), engine.device)


def _expert_load(model) -> Tuple[List[float], float]:
    """Global load imbalance: per MoE layer, max/mean tokens over experts (1.0 = balanced), and
    the worst layer's max/mean tokens over EP ranks (what sets an expert-parallel step's time)."""
    per_layer, rank_load = [], 1.0
    for layer in model.moe_layers:
        # None when no forward ran: a run resumed at its final step (e.g. torchrun restarted the
        # workers after they had finished) only evaluates and writes its outputs.
        if layer.tokens_per_expert is None:
            counts = torch.zeros(layer.config.num_experts, dtype=torch.float64, device=next(layer.parameters()).device)
        else:
            counts = layer.tokens_per_expert.to(torch.float64).clone()
        dist.all_reduce(counts)
        per_layer.append((counts.max() / counts.mean().clamp_min(1e-9)).item())
        per_rank = counts.view(layer.config.ep_size, -1).sum(1)
        rank_load = max(rank_load, (per_rank.max() / per_rank.mean().clamp_min(1e-9)).item())
    return per_layer, rank_load


def run_diagnostics(engine, model, val_tokens, run: RunConfig, gpt: GPTConfig, rank: int, state: dict) -> Dict[str, float]:
    """Router diagnostics on a fixed probe batch (the first validation batch)."""
    from default_moe import diagnostics as diag

    x, _ = data_mod.sample_batch(val_tokens, run.micro_batch, gpt.seq_len, run.seed + 2, 0, rank, 0)
    x = x.to(engine.device)
    inputs = {}
    hooks = [
        layer.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: inputs.__setitem__(i, (args[0].detach(), kwargs.get("token_ids"))),
            with_kwargs=True,
        )
        for i, layer in enumerate(model.moe_layers)
    ]
    engine.eval()
    try:
        with torch.no_grad():
            engine(x)
    finally:
        engine.train()
        for h in hooks:
            h.remove()
    out: Dict[str, float] = {}
    for i, layer in enumerate(model.moe_layers):
        h, ids = inputs[i]
        fidelity = diag.router_gradient_fidelity(layer, h, ids, seed=run.seed + i)
        if fidelity is not None:
            out[f"fidelity_layer{i}"] = fidelity
        frac, state[i] = diag.routing_fluctuation(layer, h, ids, state.get(i))
        if frac is not None:
            out[f"fluctuation_layer{i}"] = frac
        report = diag.defaults_report(layer)
        for k, v in (report or {}).items():
            out[f"defaults_{k}_layer{i}"] = v
    return out


def plot(history: Dict[str, list], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if history["train"]:
        steps, losses = zip(*history["train"])
        ax.plot(steps, losses, label="train loss", alpha=0.8)
    if history["val"]:
        steps, losses = zip(*history["val"])
        ax.plot(steps, losses, "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _quiet_engine_logs() -> None:
    import logging
    import warnings

    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    # torch 2.13 deprecates a collective DeepSpeed's ZeRO still calls every step.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


def main(argv: Optional[List[str]] = None) -> int:
    run, gpt, ds_config, resume = parse_args(argv)
    import deepspeed

    _quiet_engine_logs()
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    dm_ds.skip_cpu_jit_builds()
    # Our init first (DeepSpeed's then finds the group made): it scopes torchrun's store per restart
    # round, so a job restarted by `--max-restarts` does not meet the old round's addresses.
    init_distributed_from_env(run.dist_timeout_s)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    run_dir = Path(run.run_dir)
    ckpt_dir = run_dir / "ckpt"
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)

    if rank == 0:  # tokenise once into the cache; the other ranks then read it
        tokens = data_mod.load_tokens(run.data, run.tokenizer, run.token_dtype)
    dist.barrier()
    tokens = data_mod.load_tokens(run.data, run.tokenizer, run.token_dtype)
    train_tokens, val_tokens = data_mod.split_train_val(tokens)
    if int(tokens.max()) >= gpt.vocab_size:
        raise ValueError(f"token id {int(tokens.max())} >= GPTConfig.vocab_size {gpt.vocab_size}")

    torch.manual_seed(run.seed)  # same initial weights on every rank; the section shards experts
    model = GPT(gpt)
    ds_config = dict(ds_config)
    ds_config["train_micro_batch_size_per_gpu"] = run.micro_batch
    ds_config.setdefault("gradient_accumulation_steps", 1)
    ds_config.pop("train_batch_size", None)
    ds_config["optimizer"]["params"]["lr"] = run.lr
    engine, _, _, scheduler = dm_ds.initialize(
        model=model, model_parameters=list(model.parameters()), config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(run)),
    )
    gas = engine.gradient_accumulation_steps()
    moe_cfg = model.moe_layers[0].config
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for layer in model.moe_layers for p in layer.experts.parameters())
    total_params = n_params + n_expert * (moe_cfg.ep_size - 1)
    active = total_params - n_expert * moe_cfg.ep_size * (1 - moe_cfg.top_k / moe_cfg.num_experts)

    history: Dict[str, list] = {"train": [], "val": [], "step_time": [], "load": [], "rank_load": []}
    start_step = 0
    if resume:
        # The newest complete checkpoint (torn saves skipped with a warning naming them).
        load_path, client = engine.load_checkpoint(str(ckpt_dir))
        if load_path is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint in {ckpt_dir}")
        start_step, history = client["step"], client["history"]

    writer = SummaryWriter(str(run_dir / "tb")) if rank == 0 else None
    if rank == 0:
        print(f"[train] world={world} device={engine.device} router={moe_cfg.router} ep_size={moe_cfg.ep_size} "
              f"experts={moe_cfg.num_experts} top_k={moe_cfg.top_k} beta={moe_cfg.beta} "
              f"zero={engine.zero_optimization_stage()} gas={gas}")
        print(f"[train] model: d={gpt.d_model} layers={gpt.n_layers} vocab={gpt.vocab_size} seq={gpt.seq_len}; "
              f"params {total_params/1e6:.2f}M total, {active/1e6:.2f}M active per token; "
              f"data: {len(train_tokens):,} train / {len(val_tokens):,} val tokens"
              + (f"; resumed at step {start_step}" if resume else ""))
    tokens_per_step = run.micro_batch * gpt.seq_len * gas * world
    probe_state: Dict[int, torch.Tensor] = {}
    bar = tqdm(range(start_step, run.steps), initial=start_step, total=run.steps, disable=rank != 0,
               desc="train", dynamic_ncols=True, file=sys.stdout, mininterval=1.0)
    t_start = time.perf_counter()
    for step in bar:
        t0 = time.perf_counter()
        loss_sum = 0.0
        for micro in range(gas):
            x, y = data_mod.sample_batch(train_tokens, run.micro_batch, gpt.seq_len, run.seed, step, rank, micro)
            loss = engine(x.to(engine.device), y.to(engine.device))
            engine.backward(loss)
            engine.step()
            loss_sum += loss.item()
        history["step_time"].append(time.perf_counter() - t0)
        done = step + 1
        last = done == run.steps or _out_of_time(run, t_start, engine.device)
        if done % run.log_every == 0 or last:
            train_loss = _mean_over_ranks(loss_sum / gas, engine.device)
            history["train"].append((done, train_loss))
            load, rank_load = _expert_load(model)
            history["load"].append((done, max(load)))
            history["rank_load"].append((done, rank_load))
            if rank == 0:
                aux = {k: float(v) for k, v in model.moe_layers[0].aux_losses.items()}
                bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                                load=f"{max(load):.2f}")
                writer.add_scalar("train/loss", train_loss, done)
                writer.add_scalar("train/lr", scheduler.get_last_lr()[0], done)
                for name, value in aux.items():
                    writer.add_scalar(f"train/aux_{name}_layer0", value, done)
                for i, v in enumerate(load):
                    writer.add_scalar(f"load/max_over_mean_layer{i}", v, done)
                writer.add_scalar("load/ep_rank_max_over_mean", rank_load, done)
        if done % run.eval_every == 0 or last:
            val = evaluate(engine, val_tokens, run, gpt, rank)
            history["val"].append((done, val))
            load, _ = _expert_load(model)
            diag = run_diagnostics(engine, model, val_tokens, run, gpt, rank, probe_state)
            history.setdefault("diagnostics", []).append((done, diag))
            if rank == 0:
                for k, v in diag.items():
                    writer.add_scalar(f"diag/{k}", v, done)
                fid = " ".join(f"{diag[k]:.2f}" for k in sorted(diag) if k.startswith("fidelity"))
                flu = " ".join(f"{diag[k]:.2f}" for k in sorted(diag) if k.startswith("fluctuation"))
                tqdm.write(f"[train] step {done:5d}  router-gradient fidelity per layer {fid or 'n/a'}"
                           + (f"  routing fluctuation {flu}" if flu else ""), file=sys.stdout)
                writer.add_scalar("val/loss", val, done)
                writer.add_scalar("val/perplexity", math.exp(val), done)
                tqdm.write(f"[train] step {done:5d}  train {history['train'][-1][1]:.4f}  val {val:.4f}  "
                           f"ppl {math.exp(val):8.2f}  expert load max/mean per layer "
                           f"{' '.join(f'{v:.2f}' for v in load)}", file=sys.stdout)
        if done % run.ckpt_every == 0 or last:
            engine.save_checkpoint(str(ckpt_dir), tag=f"step{done}", client_state={"step": done, "history": history})
        if last:
            break
    bar.close()

    # Per-expert share of token slots of the last forward (the final diagnostics' probe batch).
    expert_share = []
    for layer in model.moe_layers:
        # None when no forward ran: a run resumed at its final step (e.g. torchrun restarted the
        # workers after they had finished) only evaluates and writes its outputs.
        if layer.tokens_per_expert is None:
            counts = torch.zeros(layer.config.num_experts, dtype=torch.float64, device=next(layer.parameters()).device)
        else:
            counts = layer.tokens_per_expert.to(torch.float64).clone()
        dist.all_reduce(counts)
        expert_share.append((counts / counts.sum().clamp_min(1)).tolist())
    # How much the trained model leans on its defaults: validation loss with D zeroed.
    val_no_defaults = None
    with_defaults = [layer.defaults for layer in model.moe_layers if layer.defaults is not None]
    if with_defaults:
        kept = [d.defaults_ED.clone() for d in with_defaults]
        for d in with_defaults:
            d.defaults_ED.zero_()
        val_no_defaults = evaluate(engine, val_tokens, run, gpt, rank)
        for d, k in zip(with_defaults, kept):
            d.defaults_ED.copy_(k)

    if rank == 0:
        elapsed = time.perf_counter() - t_start
        recent = history["step_time"][-min(50, len(history["step_time"])):] or [float("nan")]
        step_time = sorted(recent)[len(recent) // 2]
        final_val = history["val"][-1][1] if history["val"] else float("nan")
        metrics = {
            "steps": run.steps, "router": moe_cfg.router, "ep_size": moe_cfg.ep_size, "world": world,
            "final_train_loss": history["train"][-1][1] if history["train"] else None,
            "final_val_loss": final_val, "final_val_ppl": math.exp(final_val),
            "median_step_s": step_time, "tokens_per_s": tokens_per_step / step_time,
            "wall_s_this_session": elapsed, "params_total": total_params, "params_active": active,
            "final_val_loss_without_defaults": val_no_defaults, "expert_share_per_layer": expert_share,
            "tokens_per_step": tokens_per_step,
            "history": history,
        }
        norms = [layer.defaults.defaults_ED.norm(dim=1).mean().item() for layer in model.moe_layers if layer.defaults is not None]
        metrics["default_norm_per_layer"] = norms
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        plot(history, run_dir / "loss.png", f"GPT-MoE {moe_cfg.router}, {moe_cfg.num_experts} experts top-{moe_cfg.top_k}")
        print("[train] ---- summary ----")
        print(f"[train] steps {run.steps}, final train loss {metrics['final_train_loss']:.4f}, "
              f"validation loss {final_val:.4f} (perplexity {math.exp(final_val):.2f})")
        print(f"[train] median step {step_time*1e3:.0f} ms, {metrics['tokens_per_s']:,.0f} tokens/s over {world} ranks; "
              f"{elapsed:.0f} s this session")
        if norms:
            print(f"[train] mean default-vector norm per layer: {' '.join(f'{n:.3f}' for n in norms)}; validation "
                  f"loss with the defaults zeroed {val_no_defaults:.4f} ({val_no_defaults - final_val:+.4f})")
        print(f"[train] wrote {run_dir/'loss.png'}, {run_dir/'metrics.json'}, TensorBoard events in {run_dir/'tb'}, "
              f"checkpoints in {ckpt_dir}")
        writer.close()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
