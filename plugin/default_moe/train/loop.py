"""The main job's training loop: steps with gradient accumulation, logging, evaluation and router
diagnostics, checkpoints; the per-step helpers it uses."""

from __future__ import annotations

import sys
import time
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

from default_moe import data as data_mod
from default_moe.models.gpt import GPTConfig
from default_moe.train.config import RunConfig


def _out_of_time(run: RunConfig, t_start: float, device) -> bool:
    """Whether `max_minutes` has passed (rank 0's clock, so every rank stops at the same step)."""
    if run.max_minutes is None:
        return False
    flag = torch.tensor([float(time.perf_counter() - t_start >= 60.0 * run.max_minutes)], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def _rendezvous(run: RunConfig, stage: str, payload: dict) -> List[dict]:
    """Rank 0 of each `schedule_sync` run posts `payload` under `stage` and returns every run's,
    once `schedule_sync_runs` are in or `schedule_sync_wait_s` has passed (a run that died at
    start-up does not hold the others forever)."""
    import json
    import os
    from pathlib import Path

    folder = Path(run.schedule_sync) / stage
    folder.mkdir(parents=True, exist_ok=True)
    mine = folder / f"{os.getpid()}-{Path(run.run_dir).name}.json"
    tmp = mine.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, mine)
    deadline = time.perf_counter() + run.schedule_sync_wait_s
    while True:
        found = [json.loads(f.read_text()) for f in folder.glob("*.json")]
        if len(found) >= run.schedule_sync_runs or time.perf_counter() > deadline:
            return found
        time.sleep(0.2)


def start_together(job) -> None:
    """`schedule_sync`: a fresh run's first step waits for the other runs' (then all ranks of this
    run). Runs side by side on one device share it; a run that measured its warmup steps while the
    others were still starting up would propose more steps than fit once they all train."""
    run = job.run
    if not run.schedule_sync or job.start_step > 0:
        return
    if job.rank == 0:
        found = _rendezvous(run, "started", {"run_dir": run.run_dir})
        print(f"[train] started with {len(found)}/{run.schedule_sync_runs} runs of {run.schedule_sync}", flush=True)
    dist.barrier()


def _wall_per_step(job) -> float:
    """Wall seconds per iteration (step, logging, evaluations) over the middle half of warmup:
    after the first steps' one-time costs, and before the first runs of a `schedule_sync` batch
    reach the end of warmup and wait there, leaving the last ones the device to themselves (a
    window there measured 41 ms/step where the runs then took 53-70)."""
    ends = job.iteration_ends
    lo = max(1, len(ends) // 4)
    hi = max(lo + 1, (3 * len(ends)) // 4)
    if hi >= len(ends):  # too short a warmup for a window: the last step alone
        return job.history["step_time"][-1]
    return (ends[hi] - ends[lo]) / (hi - lo)


def size_schedule(job, done: int, eval_s: float) -> int:
    """`time_budget_minutes`: the number of steps that fit, from the wall time per iteration in
    the middle of warmup and the time of one evaluation (`eval_s`), keeping the final evaluations
    inside the budget; with `schedule_sync`, one number for all the runs, then broadcast from rank
    0 so every rank trains the same steps. At most the given `steps`."""
    run = job.run
    mine = {
        "run_dir": run.run_dir,
        "step_s": _wall_per_step(job),
        "eval_s": eval_s,
        "deadline": time.time() - (time.perf_counter() - job.t_start) + 60.0 * run.time_budget_minutes,
        "now": time.time(),
        "cap": run.steps,
    }
    found = [mine]
    if job.rank == 0 and run.schedule_sync:
        found = _rendezvous(run, "proposals", mine)
    total, note = _fit_steps(found, done, run.eval_every)
    if run.schedule_sync:
        note += f"; agreed with {len(found)}/{run.schedule_sync_runs} runs"
    flag = torch.tensor([total], dtype=torch.long, device=job.engine.device)
    dist.broadcast(flag, src=0)
    total = int(flag.item())
    job.history.setdefault("schedule", []).append({"at_step": done, "steps": total, "note": note})
    if job.rank == 0:
        print(f"[train] time budget {run.time_budget_minutes} min: {total} steps ({note})", flush=True)
    return total


def _fit_steps(found: List[dict], done: int, eval_every: int) -> Tuple[int, str]:
    """The steps that fit for every run in `found`, computed from what they posted only (so every
    run gets the same number): the slowest step and evaluation, the earliest deadline, from the
    moment the last run posted (when all go on), keeping the final and D-zeroed evaluations in."""
    step_s = max(f["step_s"] for f in found)
    eval_s = max(f["eval_s"] for f in found)
    left_s = min(f["deadline"] for f in found) - max(f["now"] for f in found) - 2.0 * eval_s
    fit = done + max(1, int(0.9 * left_s / (step_s + eval_s / eval_every)))
    return min(fit, *(f["cap"] for f in found)), f"step {step_s * 1e3:.0f} ms, eval {eval_s:.1f} s"


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


def global_expert_counts(layer) -> torch.Tensor:
    """[E] float64 token slots per expert of the layer's last forward, summed over all ranks."""
    # None when no forward ran: a run resumed at its final step (e.g. torchrun restarted the
    # workers after they had finished) only evaluates and writes its outputs.
    if layer.tokens_per_expert is None:
        counts = torch.zeros(layer.config.num_experts, dtype=torch.float64, device=next(layer.parameters()).device)
    else:
        counts = layer.tokens_per_expert.to(torch.float64).clone()
    dist.all_reduce(counts)
    return counts


def _expert_load(model) -> Tuple[List[float], float, List[List[float]]]:
    """Global load imbalance: per MoE layer, max/mean tokens over experts (1.0 = balanced), the
    worst layer's max/mean tokens over EP ranks (what sets an expert-parallel step's time), and
    per layer each expert's share of the token slots."""
    per_layer, rank_load, shares = [], 1.0, []
    for layer in model.moe_layers:
        counts = global_expert_counts(layer)
        per_layer.append((counts.max() / counts.mean().clamp_min(1e-9)).item())
        per_rank = counts.view(layer.config.ep_size, -1).sum(1)
        rank_load = max(rank_load, (per_rank.max() / per_rank.mean().clamp_min(1e-9)).item())
        shares.append([round(v, 5) for v in (counts / counts.sum().clamp_min(1)).tolist()])
    return per_layer, rank_load, shares


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
        for k, v in (diag.default_term_share(layer, h, ids) or {}).items():
            out[f"{k}_layer{i}"] = v
    return out


def train(job) -> None:
    """Runs the steps from `job.start_step` to `run.steps` (or `max_minutes`), logging to the
    progress bar and TensorBoard, evaluating and checkpointing on their schedules."""
    from tqdm import tqdm

    run, gpt, engine, rank, history = job.run, job.gpt, job.engine, job.rank, job.history
    bar = tqdm(
        range(job.start_step, run.steps),
        initial=job.start_step,
        total=run.steps,
        disable=rank != 0,
        desc="train",
        dynamic_ncols=True,
        file=sys.stdout,
        mininterval=1.0,
    )
    probe_state: Dict[int, torch.Tensor] = {}
    start_together(job)
    job.t_start = time.perf_counter()
    # A fresh run with a time budget sizes its schedule at the end of warmup (a resumed one keeps --steps).
    size_at = run.warmup_steps if run.time_budget_minutes is not None and job.start_step < run.warmup_steps else None
    for step in bar:
        t0 = time.perf_counter()
        if run.anneal_defaults_steps:
            anneal_defaults(job, step)
        loss_sum = 0.0
        for micro in range(job.gas):
            x, y = data_mod.sample_batch(job.train_tokens, run.micro_batch, gpt.seq_len, run.seed, step, rank, micro)
            loss = engine(x.to(engine.device), y.to(engine.device))
            engine.backward(loss)
            engine.step()
            loss_sum += loss.item()
        history["step_time"].append(time.perf_counter() - t0)
        done = step + 1
        last = done == run.steps or _out_of_time(run, job.t_start, engine.device)
        if done % run.log_every == 0 or last or done == size_at:
            _log_train(job, bar, done, loss_sum / job.gas)
        if done == size_at:
            t_eval = time.perf_counter()
            _evaluate_and_diagnose(job, done, probe_state)
            run.steps = size_schedule(job, done, time.perf_counter() - t_eval)
            bar.total = run.steps
            last = last or done >= run.steps
        elif done % run.eval_every == 0 or last:
            _evaluate_and_diagnose(job, done, probe_state)
        if done % run.ckpt_every == 0 or (last and run.save_final):
            engine.save_checkpoint(str(job.ckpt_dir), tag=f"step{done}", client_state=client_state(job, done))
        job.steps_done = done
        job.iteration_ends.append(time.perf_counter())
        if last:
            break
    bar.close()


def anneal_defaults(job, step: int) -> None:
    """D annealing: the default term's forward weight for 0-based `step`, linear from 1 to 0 over
    the last `anneal_defaults_steps` steps (0 at the last step, whose evaluation is the plain model)."""
    n = job.run.anneal_defaults_steps
    scale = min(1.0, max(0.0, (job.run.steps - 1 - step) / n))
    for layer in job.model.moe_layers:
        if layer.defaults is not None:
            layer.defaults.set_forward_scale(scale)


def client_state(job, done: int) -> dict:
    """What a checkpoint records beside the weights: the step and history (resume), the model's
    shape and the data of its validation batches (`default-moe export` rebuilds and probes it)."""
    import dataclasses

    run = job.run
    data = {k: getattr(run, k) for k in ("data", "tokenizer", "token_dtype", "micro_batch", "seed", "eval_batches")}
    scales = [float(layer.defaults.forward_scale) for layer in job.model.moe_layers if layer.defaults is not None]
    return {
        "step": done,
        "history": job.history,
        "gpt": dataclasses.asdict(job.gpt),
        "run_data": data,
        # D annealing's forward weight of the default term at this step (1: the term as configured).
        "defaults_forward_scale": scales[0] if scales else 1.0,
    }


def _log_train(job, bar, done: int, local_loss: float) -> None:
    history, writer, model, scheduler = job.history, job.writer, job.model, job.scheduler
    train_loss = _mean_over_ranks(local_loss, job.engine.device)
    history["train"].append((done, train_loss))
    load, rank_load, shares = _expert_load(model)
    history["load"].append((done, max(load)))
    history["rank_load"].append((done, rank_load))
    history.setdefault("expert_share", []).append((done, shares))
    if job.run.compile:
        from torch._dynamo.utils import counters

        # Graphs compiled so far in this process: flat after warm-up means no recompiles.
        history.setdefault("compiled_graphs", []).append((done, int(counters["stats"]["unique_graphs"])))
    if job.rank == 0:
        aux = {k: float(v) for k, v in model.moe_layers[0].aux_losses.items()}
        bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", load=f"{max(load):.2f}")
        writer.add_scalar("train/loss", train_loss, done)
        writer.add_scalar("train/lr", scheduler.get_last_lr()[0], done)
        for name, value in aux.items():
            writer.add_scalar(f"train/aux_{name}_layer0", value, done)
        for i, v in enumerate(load):
            writer.add_scalar(f"load/max_over_mean_layer{i}", v, done)
        writer.add_scalar("load/ep_rank_max_over_mean", rank_load, done)


def _evaluate_and_diagnose(job, done: int, probe_state: dict) -> None:
    from tqdm import tqdm

    run, gpt, engine, model, rank, history, writer = job.run, job.gpt, job.engine, job.model, job.rank, job.history, job.writer
    val = evaluate(engine, job.val_tokens, run, gpt, rank)
    history["val"].append((done, val))
    load, _, _ = _expert_load(model)
    diag = run_diagnostics(engine, model, job.val_tokens, run, gpt, rank, probe_state)
    history.setdefault("diagnostics", []).append((done, diag))
    if rank == 0:
        import math

        for k, v in diag.items():
            writer.add_scalar(f"diag/{k}", v, done)
        fid = " ".join(f"{diag[k]:.2f}" for k in sorted(diag) if k.startswith("fidelity"))
        flu = " ".join(f"{diag[k]:.2f}" for k in sorted(diag) if k.startswith("fluctuation"))
        tqdm.write(
            f"[train] step {done:5d}  router-gradient fidelity per layer {fid or 'n/a'}"
            + (f"  routing fluctuation {flu}" if flu else ""),
            file=sys.stdout,
        )
        writer.add_scalar("val/loss", val, done)
        writer.add_scalar("val/perplexity", math.exp(val), done)
        tqdm.write(
            f"[train] step {done:5d}  train {history['train'][-1][1]:.4f}  val {val:.4f}  "
            f"ppl {math.exp(val):8.2f}  expert load max/mean per layer "
            f"{' '.join(f'{v:.2f}' for v in load)}",
            file=sys.stdout,
        )
