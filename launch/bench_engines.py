"""Benchmark: one MoE layer's forward+backward in our layer vs DeepSpeed's and megatron-core's.

Run by `bash launch/bench_engines.sh` on 1 or 2 processes (EP = number of processes; gloo on CPU).
Same shapes for every implementation: T tokens per rank, hidden D, E experts, top-k, SwiGLU
experts of width F, fp32. Rows:
  - ours, router topk / default (dropless);
  - DeepSpeed `deepspeed.moe.layer.MoE` (capacity factor 1.25, and drop_tokens=False = dropless
    padded to the largest expert), SwiGLU experts as an nn.Module;
  - megatron-core `MoELayer` (alltoall dispatcher, SequentialMLP, gated SwiGLU, pre-softmax top-k).
The variants are timed in interleaved rounds (median); each row reports ms/step, tokens/s over all
ranks and the ratio to our TopK. megatron-core runs on CPU through the test shims
(tests/megatron_cpu.py), as in the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


class SwiGLU(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.w1 = nn.Linear(d, f, bias=False)
        self.w3 = nn.Linear(d, f, bias=False)
        self.w2 = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def build(args, world):
    from default_moe import MoEConfig, MoELayer

    out = {}
    for router in ("topk", "default"):
        torch.manual_seed(0)
        out[f"ours {router}"] = MoELayer(MoEConfig(hidden_size=args.hidden, num_experts=args.experts,
                                                   ffn_hidden_size=args.ffn, top_k=args.top_k, router=router,
                                                   ep_size=world))
    import deepspeed
    from deepspeed.moe.layer import MoE

    import default_moe.integrations.deepspeed as dm_ds

    dm_ds.skip_cpu_jit_builds()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    for name, drop in (("deepspeed cf1.25", True), ("deepspeed dropless", False)):
        torch.manual_seed(0)
        moe = MoE(hidden_size=args.hidden, expert=SwiGLU(args.hidden, args.ffn), num_experts=args.experts,
                  ep_size=world, k=args.top_k, capacity_factor=1.25, eval_capacity_factor=1.25, min_capacity=4,
                  drop_tokens=drop, use_rts=False)
        moe.set_deepspeed_parallelism()
        out[name] = moe
    import megatron_cpu

    megatron_cpu.apply()
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.moe.moe_layer import MoELayer as McoreMoE

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, expert_model_parallel_size=world)
    model_parallel_cuda_manual_seed(0)
    cfg = TransformerConfig(num_layers=1, hidden_size=args.hidden, num_attention_heads=4, num_moe_experts=args.experts,
                            moe_router_topk=args.top_k, moe_ffn_hidden_size=args.ffn, ffn_hidden_size=args.ffn,
                            moe_token_dispatcher_type="alltoall", moe_router_pre_softmax=True,
                            moe_aux_loss_coeff=0.01, use_cpu_initialization=True, add_bias_linear=False,
                            gated_linear_unit=True, activation_func=F.silu, expert_model_parallel_size=world)
    spec = get_gpt_layer_local_spec(num_experts=args.experts, moe_grouped_gemm=False)
    out["megatron-core"] = McoreMoE(cfg, spec.submodules.mlp.submodules)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the rows here (rank 0)")
    args = ap.parse_args()

    from default_moe.parallel import init_distributed_from_env

    rank, world, _ = init_distributed_from_env()
    if not dist.is_initialized():  # one process: a world of one, for the engines
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29511", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group("gloo", rank=0, world_size=1)
        rank, world = 0, 1
    layers = build(args, world)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.tokens, args.hidden, generator=g)
    grad = torch.randn(args.tokens, args.hidden, generator=g)

    def step(name, layer):
        if name == "megatron-core":
            xi = x.view(args.tokens, 1, args.hidden).detach().requires_grad_(True)
            out = layer(xi)[0].view(args.tokens, args.hidden)
        elif name.startswith("deepspeed"):
            xi = x.view(1, args.tokens, args.hidden).detach().requires_grad_(True)
            out = layer(xi)[0].view(args.tokens, args.hidden)
        else:
            xi = x.detach().requires_grad_(True)
            out = layer(xi)
        (out * grad).sum().backward()

    names = list(layers)
    for n in names:
        for _ in range(2):
            step(n, layers[n])
    times = {n: [] for n in names}
    for r in range(args.rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                step(n, layers[n])
            dist.barrier()
            times[n].append((time.perf_counter() - t0) / args.iters)
    if rank == 0:
        base = statistics.median(times["ours topk"])
        rows = []
        print(f"EP={world} processes={world} tokens/rank={args.tokens} D={args.hidden} F={args.ffn} (SwiGLU) "
              f"E={args.experts} k={args.top_k} fp32 CPU, median of {args.rounds} interleaved rounds x {args.iters}")
        print("| implementation | ms / fwd+bwd | tokens/s (all ranks) | time / ours topk |")
        print("|---|---|---|---|")
        for n in names:
            t = statistics.median(times[n])
            rows.append({"name": n, "ms": t * 1e3, "tokens_per_s": args.tokens * world / t, "ratio": t / base})
            print(f"| {n} | {t*1e3:.1f} | {args.tokens*world/t:,.0f} | {t/base:.3f} |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"world": world, "args": vars(args), "rows": rows}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
