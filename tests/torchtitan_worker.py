"""Per-rank body of the torchtitan tests (run by torchrun; launch/ and tests/ on PYTHONPATH).

Builds torchtitan's trainer from the command line exactly as `torchtitan.train` does (on CPU,
with launch/torchtitan_cpu.py's shims), gives every shard of the MoE weights distinct values
(CPU meshes have no DTensor RNG: FSDP shards start identical), trains, and writes to
OUT/rank{r}.pt what the test compares: the losses and grad norms per step, every layer's D on
this rank and, with --check-ema, one more training micro-batch's commit against a float64
reference of the routed tokens' expert outputs over all ranks' tokens.

    torchrun --nproc_per_node 2 tests/torchtitan_worker.py --out DIR [--check-ema] -- \\
        --module torchtitan_configs --config tiny_qwen3_moe ... (torchtitan flags)
"""

from __future__ import annotations

import argparse
import sys
import zlib

import torch
import torch.distributed as dist
import torch.nn.functional as F


def distinct_moe_weights(model, seed: int) -> None:
    """Every shard of the routers' and experts' weights gets its own N(0, 0.02) values."""
    rank = dist.get_rank()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".moe.router." in name or ".moe.routed_experts." in name:
                local = p.to_local() if hasattr(p, "to_local") else p
                key = name.replace("._checkpoint_wrapped_module", "")  # the same with or without AC
                g = torch.Generator().manual_seed(seed * 1000 + rank * 100 + zlib.crc32(key.encode()) % 97)
                local.copy_(torch.randn(local.shape, generator=g) * 0.02)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def gather_cat(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def ema_check(trainer) -> dict:
    """One more micro-batch through the trainer's own forward/backward, committed: layer 0's D
    equals beta D0 + (1 - beta) * mean of the raw expert outputs of the tokens routed to each
    expert over all ranks (a renormalised gate's first commit of an expert: the mean itself),
    the expert outputs recomputed in float64 from the gathered weights (the experts run in bf16:
    inputs and weights are rounded to bf16 first)."""
    from default_moe import commit_defaults
    from default_moe.integrations.torchtitan import DefaultMoE

    model = trainer.model_parts[0]
    moe = next(m for m in model.modules() if isinstance(m, DefaultMoE))
    cap = {}

    def keep(key, value):  # (hooks must return None: a value would replace the args or output)
        cap.setdefault(key, value.detach())

    h1 = moe.register_forward_pre_hook(lambda m, a: keep("x", a[0]))
    h2 = moe.router.register_forward_hook(lambda m, a, o: keep("ids", o[1]))
    D0 = moe.defaults.defaults_ED.clone()
    input_dict, labels = next(iter(trainer.dataloader))
    trainer.forward_backward_step(
        input_dict=input_dict, labels=labels, global_valid_tokens=torch.tensor(float(labels.numel() * dist.get_world_size()))
    )
    h1.remove(), h2.remove()
    commit_defaults(trainer.model_parts)
    x = cap["x"].to_local() if hasattr(cap["x"], "to_local") else cap["x"]
    ids = cap["ids"].to_local() if hasattr(cap["ids"], "to_local") else cap["ids"]
    H = x.shape[-1]
    X = gather_cat(x.reshape(-1, H).float()).bfloat16().double()
    IDS = gather_cat(ids.reshape(X.shape[0] // dist.get_world_size(), -1).long())
    inner = moe.routed_experts.inner_experts
    w1, w2, w3 = (full(getattr(inner, n)).detach().bfloat16().double() for n in ("w1_EFD", "w2_EDF", "w3_EFD"))
    E = w1.shape[0]
    beta = moe.defaults.beta
    D_ref = D0.double().clone()
    for e in range(E):
        rows = (IDS == e).any(-1)
        if not rows.any():
            continue
        xe = X[rows]
        h = (F.silu(xe @ w1[e].t()).bfloat16().double() * (xe @ w3[e].t()).bfloat16().double()).bfloat16().double()
        mean = (h @ w2[e].t()).mean(0)
        first = moe.defaults.gate.renormalized and not bool(D0[e].ne(0).any())
        D_ref[e] = mean if first else beta * D0[e].double() + (1 - beta) * mean
    D = moe.defaults.defaults_ED.double()
    err = ((D - D_ref).abs() / (D_ref.abs() + 1e-2)).max().item()
    return {
        "max_rel_err": err,
        "changed": bool(not torch.equal(moe.defaults.defaults_ED, D0)),
        "experts_seen": int(sum(bool((IDS == e).any()) for e in range(E))),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--check-ema", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args, rest = ap.parse_known_args()
    rest = [a for a in rest if a != "--"]

    import torchtitan_cpu

    torchtitan_cpu.apply()
    if not any(a.startswith("--parallelism.spmd") for a in rest):
        rest = ["--parallelism.spmd-backend", "partial_dtensor"] + rest  # before any subcommand
    sys.argv = [sys.argv[0]] + rest
    from torchtitan.config import ConfigManager
    from torchtitan.tools.logging import init_logger

    init_logger()
    config = ConfigManager().parse_args()
    trainer = config.build()
    try:
        distinct_moe_weights(trainer.model_parts[0], args.seed)
        record = []
        log = trainer.metrics_processor.log

        def logged(step, loss, max_loss, grad_norm, *a, **kw):
            record.append((int(step), float(loss), float(grad_norm)))
            return log(step, loss, max_loss, grad_norm, *a, **kw)

        trainer.metrics_processor.log = logged
        trainer.train()
        result = {"steps": record, "defaults": {}, "types": []}
        for name, module in trainer.model_parts[0].named_modules():
            d = getattr(module, "defaults", None)
            if d is not None and hasattr(d, "defaults_ED"):
                result["defaults"][name] = d.defaults_ED.detach().clone()
                result["types"].append(type(module).__name__)
                result.setdefault("updates", {})[name] = d.num_updates
        if args.check_ema:
            result["ema"] = ema_check(trainer)
        torch.save(result, f"{args.out}/rank{dist.get_rank()}.pt")
    finally:
        trainer.close()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
