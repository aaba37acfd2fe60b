"""Communication cost model: bytes per rank per optimizer step of the MoE all-to-alls, the gradient
all-reduce and Default MoE's EMA sync, for real model shapes and a cluster layout.

    python launch/comm_model.py [--gas 8] [--tokens-per-rank 4096]

Assumptions (stated so they can be changed): pure data + expert parallelism (no TP/PP), EP ranks
inside the DP group as in DeepSpeed/Megatron; ring collectives (an all-reduce of S bytes moves
2 (N-1)/N S per rank); all-to-all moves (P-1)/P of its payload off the rank, four times per layer and
micro-batch (dispatch and combine, forward and backward); activations and gradients in bf16; the
EMA statistics of all MoE layers are one bucketed all-reduce of layers x E x (D+1) per optimizer
step (fp32 by default; the step contract of `default_moe.defaults`).
Parameter counts come from the published shapes (experts: 3 x D x F per SwiGLU expert).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass
class Shape:
    name: str
    moe_layers: int
    experts: int
    top_k: int
    hidden: int
    expert_ffn: int
    total_params: float
    gpus: int
    ep: int

    @property
    def expert_params(self) -> float:
        return self.moe_layers * self.experts * 3 * self.hidden * self.expert_ffn

    @property
    def dense_params(self) -> float:
        return self.total_params - self.expert_params


SHAPES = [
    Shape("Mixtral-8x7B", 32, 8, 2, 4096, 14336, 46.7e9, gpus=64, ep=8),
    Shape("DeepSeek-V3 (routed experts)", 58, 256, 8, 7168, 2048, 671e9, gpus=2048, ep=64),
]


def model(shape: Shape, tokens: int, gas: int, grad_bytes: int = 2) -> dict:
    ring = lambda n, size: 2 * (n - 1) / n * size  # noqa: E731
    P, N = shape.ep, shape.gpus
    a2a = 4 * tokens * shape.top_k * shape.hidden * 2 * (P - 1) / P * shape.moe_layers * gas
    # Dense gradients over all N ranks; each rank's expert gradients over its N/P expert-DP peers.
    grads = ring(N, shape.dense_params * grad_bytes) + ring(N // P, shape.expert_params / P * grad_bytes)
    ema_payload = shape.moe_layers * shape.experts * (shape.hidden + 1) * 4
    # bf16 mode: the sums in bf16, the counts beside them in fp32 (exact).
    ema_bf16 = shape.moe_layers * shape.experts * (shape.hidden * 2 + 4)
    variants = {
        "fp32, once per step (default)": ring(N, ema_payload),
        "bf16 statistics, once per step": ring(N, ema_bf16),
    }
    return {"a2a": a2a, "grads": grads, "ema_payload": ema_payload, "ema": variants}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens-per-rank", type=int, default=4096, help="tokens per rank per micro-batch")
    ap.add_argument("--gas", type=int, default=8, help="micro-batches per optimizer step")
    args = ap.parse_args(argv)
    gb = lambda b: f"{b / 1e9:,.3f} GB"  # noqa: E731
    print(
        f"# Communication per rank per optimizer step ({args.tokens_per_rank} tokens/rank/micro-batch, "
        f"{args.gas} micro-batches, bf16 activations and gradients)\n"
    )
    for s in SHAPES:
        m = model(s, args.tokens_per_rank, args.gas)
        print(
            f"## {s.name}: {s.moe_layers} MoE layers, E={s.experts}, k={s.top_k}, D={s.hidden}, "
            f"{s.total_params / 1e9:.0f}B params ({s.expert_params / 1e9:.0f}B in experts); {s.gpus} GPUs, EP={s.ep}\n"
        )
        print(
            f"EMA statistics payload: {s.moe_layers} x {s.experts} x ({s.hidden}+1) x 4 B = {gb(m['ema_payload'])} "
            "per optimizer step\n"
        )
        print("| traffic | bytes / rank / step | vs gradient sync |")
        print("|---|---|---|")
        print(f"| MoE all-to-alls | {gb(m['a2a'])} | {m['a2a'] / m['grads']:.2f}x |")
        print(f"| gradient all-reduce | {gb(m['grads'])} | 1 |")
        for name, b in m["ema"].items():
            flag = "" if b / m["grads"] < 0.01 else "  (over 1%)"
            print(f"| EMA sync, {name} | {gb(b)} | {100 * b / m['grads']:.3f}%{flag} |")
        print()
    print(
        'Options (MoEConfig): ema_stats_dtype="bfloat16" about halves the EMA bytes (counts stay fp32). The '
        "statistics of every micro-batch of the step are summed locally and all-reduced once, at the optimizer step."
    )


if __name__ == "__main__":
    main()
