"""A short expert-parallel demo of the Default MoE layer (run by launch/run.sh under torchrun).

Each rank holds E/ep experts; a two-layer residual MoE model fits a fixed random teacher network
for a few steps. Printed: the config, the loss curve, per-expert load, the defaults' norms and the
collectives one step issues (Default vs what TopK would issue).
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from default_moe import MoEConfig, MoELayer, count_collectives
from default_moe.data_parallel import reduce_gradients
from default_moe.parallel import init_distributed_from_env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--router", default="default")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per rank per step")
    args = ap.parse_args()

    rank, world, device = init_distributed_from_env()
    torch.manual_seed(0)  # identical initial weights on every rank (dense params are replicated)
    cfg = MoEConfig(
        hidden_size=args.hidden,
        num_experts=args.experts,
        ffn_hidden_size=2 * args.hidden,
        top_k=args.top_k,
        router=args.router,
        ep_size=world,
        init_std=0.1,
    )
    layers = torch.nn.ModuleList([MoELayer(cfg) for _ in range(2)]).to(device)
    teacher = torch.nn.Sequential(torch.nn.Linear(args.hidden, args.hidden), torch.nn.Tanh()).to(device)
    opt = torch.optim.Adam(layers.parameters(), lr=3e-3)
    if rank == 0:
        print(
            f"[demo] world={world} ep_size={cfg.ep_size} device={device} router={cfg.router} "
            f"experts={cfg.num_experts} (local {cfg.num_local_experts}) top_k={cfg.top_k} beta={cfg.beta}"
        )
    gen = torch.Generator(device="cpu").manual_seed(100 + rank)  # each rank its own data
    for step in range(1, args.steps + 1):
        x = torch.randn(args.tokens, args.hidden, generator=gen).to(device)
        with torch.no_grad():
            target = teacher(x)
        with count_collectives() as counter:
            h = x
            for layer in layers:
                h = h + layer(h)
            loss = torch.nn.functional.mse_loss(h, target)
            opt.zero_grad()
            loss.backward()
        # Dense grads averaged over DP; expert grads summed over their expert-DP group and divided
        # by the DP size (what DeepSpeed does for MoE parameters).
        reduce_gradients(layers)
        opt.step()
        if rank == 0 and (step == 1 or step % 10 == 0):
            load = layers[0].tokens_per_expert.tolist()
            aux = sum(v.item() for v in layers[0].aux_losses.values())
            print(f"[demo] step {step:3d} loss {loss.item():.4f} aux {aux:.4f} layer0 load {load}")
    if rank == 0:
        for i, layer in enumerate(layers):
            if layer.defaults is not None:
                norms = layer.defaults.defaults_ED.norm(dim=1)
                print(
                    f"[demo] layer {i} default-vector norms {[round(v, 3) for v in norms.tolist()]} "
                    f"after {layer.defaults.num_updates} EMA updates"
                )
        summary = {op: f"{calls} calls, {nbytes / 1024:.1f} KiB" for op, (calls, nbytes) in counter.summary().items()}
        print(f"[demo] collectives in the last step on rank 0: {summary}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
