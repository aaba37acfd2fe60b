"""The local experts of one expert-parallel rank: L MLPs stored as stacked weights.

Tokens arrive sorted by local expert with `counts_L` rows each. Two backends run the same
arithmetic (`MoEConfig.experts_backend`):

- "loop": one GEMM per local expert over its whole slice (megatron-core's SequentialMLP pattern);
  needs the row counts as host ints (the dispatcher fetches them in its one host sync).
- "grouped_mm": `torch._grouped_mm` over all local experts at once (megatron-core's TEGroupedMLP,
  torchtitan's GroupedExperts); the group offsets stay on the device. Runs on CPU (fp32, bf16) and on
  CUDA where the torch build has it.
- "auto" (default): "grouped_mm" for bf16/fp16 tensors on CUDA when torch has `_grouped_mm` and
  D and F rows are 16-byte aligned (its requirement), else "loop".

Under torch.compile, "grouped_mm" needs bf16 (the op's shape function accepts nothing else); other
dtypes run the loop there. Without expert parallelism and drops, the grouped backend needs no host
count at all: the layer then has no host sync and no graph break.

The SwiGLU input projection is ONE fused parameter `w13_LD2F` = [w1 | w3] along the last dim
(megatron-core's fc1, torchtitan's w13): the forward never concatenates weights, so autograd saves
no weight-sized copy. State dicts with the old separate `w1_LDF` / `w3_LDF` load through a
pre-hook (`upgrade_expert_state_dict`).

Initialisation: global expert i is drawn from its own generator seeded from one draw of the
default generator, so every rank (seeded alike) gives expert i the same weights whatever the EP
size, and different experts differ.

Legend: N routed rows, L local experts, D hidden, F expert hidden.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn


def mark_expert_params(module: nn.Module) -> None:
    """Marks parameters as expert-parallel: engines reduce their gradients over the
    expert-data-parallel group (not the whole DP group) and divide by the DP size.

    Engine-specific tags are added by the integrations (DeepSpeed: `allreduce=False`,
    `group_name="ep_size_N"`), so a plain engine that does not know them is not confused.
    """
    for p in module.parameters():
        p.expert_parallel = True


def upgrade_expert_state_dict(state_dict: Dict[str, torch.Tensor], prefix: str) -> None:
    """Rewrites separate SwiGLU `w1_LDF` / `w3_LDF` entries under `prefix` into the fused `w13_LD2F`, in place."""
    w1, w3 = prefix + "w1_LDF", prefix + "w3_LDF"
    if w3 in state_dict and w1 in state_dict:
        state_dict[prefix + "w13_LD2F"] = torch.cat([state_dict.pop(w1), state_dict.pop(w3)], dim=-1)


def grouped_mm_available() -> bool:
    return hasattr(torch, "_grouped_mm")


def grouped_mm_aligned(dtype: torch.dtype, *dims: int) -> bool:
    """`_grouped_mm` needs every row stride to be a multiple of 16 bytes (D and F of the experts)."""
    size = torch.finfo(dtype).bits // 8
    return all((d * size) % 16 == 0 for d in dims)


def resolve_backend(backend: str, device_type: str, dtype: torch.dtype, dims: tuple = ()) -> str:
    """The backend that runs for inputs of this device type, dtype and expert dims (module docstring).

    Raises:
        ValueError: "grouped_mm" asked for with dims whose rows are not 16-byte aligned.
    """
    if backend == "grouped_mm" and not grouped_mm_aligned(dtype, *dims):
        raise ValueError(
            f"MoEConfig.experts_backend='grouped_mm' needs hidden_size and ffn_hidden_size whose rows are "
            f"multiples of 16 bytes in {dtype} (got {list(dims)}); use 'loop' or 'auto'"
        )
    if backend == "grouped_mm" and dtype != torch.bfloat16 and torch.compiler.is_compiling():
        # torch.compile's shape function for _grouped_mm accepts bf16 only (eager CPU runs fp32 too).
        return "loop"
    if backend != "auto":
        return backend
    if (
        device_type == "cuda"
        and dtype in (torch.bfloat16, torch.float16)
        and grouped_mm_available()
        and grouped_mm_aligned(dtype, *dims)
    ):
        return "grouped_mm"
    return "loop"


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous (`_grouped_mm`'s backward refuses
    the expanded gradients that e.g. `.sum()` produces)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def grouped_mm(x_ND: torch.Tensor, w_LDF: torch.Tensor, offs_L: torch.Tensor) -> torch.Tensor:
    """Rows [offs[l-1], offs[l]) of `x_ND` times `w_LDF[l]`, as one grouped GEMM.

    Args:
        x_ND: rows sorted by group.
        w_LDF: L stacked weights.
        offs_L: int32 cumulative row counts (device tensor; its last entry is N).
    """
    return _ContiguousGrad.apply(torch._grouped_mm(x_ND, w_LDF, offs=offs_L))


class GroupedExperts(nn.Module):
    """L expert MLPs (SwiGLU or GELU).

    Args:
        num_local_experts: L.
        hidden_size: D.
        ffn_hidden_size: F.
        activation: "swiglu" (w2 (silu(x w1) * x w3), w1|w3 fused) or "gelu" (w2 gelu(x w1)).
        init_std: normal init std.
        first_expert: global id of the first local expert (EP rank * L).
        backend: "auto", "loop" or "grouped_mm".
    """

    def __init__(
        self,
        num_local_experts: int,
        hidden_size: int,
        ffn_hidden_size: int,
        activation: str,
        init_std: float,
        first_expert: int = 0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.activation, self.backend = activation, backend
        L, D, F_ = num_local_experts, hidden_size, ffn_hidden_size
        if activation == "swiglu":
            self.w13_LD2F = nn.Parameter(torch.empty(L, D, 2 * F_))
        else:
            self.w1_LDF = nn.Parameter(torch.empty(L, D, F_))
        self.w2_LFD = nn.Parameter(torch.empty(L, F_, D))
        self.init_weights(init_std, first_expert)
        self._register_load_state_dict_pre_hook(self._upgrade_hook)

    @property
    def w_in(self) -> nn.Parameter:
        """The input projection: `w13_LD2F` (SwiGLU) or `w1_LDF` (GELU)."""
        return self.w13_LD2F if self.activation == "swiglu" else self.w1_LDF

    @torch.no_grad()
    def init_weights(self, std: float, first_expert: int = 0) -> None:
        """Normal(0, std) per global expert, identical for expert i at any EP size (module docstring)."""
        seed = int(torch.randint(0, 2**62, (), dtype=torch.long))  # one draw: ranks seeded alike agree
        for p in self.parameters():
            if p.is_meta:
                continue
            for i in range(p.shape[0]):
                g = torch.Generator().manual_seed((seed + 1_000_003 * (first_expert + i)) % 2**63)
                p[i].copy_(torch.randn(p.shape[1:], generator=g, dtype=torch.float32) * std)
            seed += 7  # the parameters of one expert differ from each other

    @staticmethod
    def _upgrade_hook(state_dict, prefix, *args):
        upgrade_expert_state_dict(state_dict, prefix)

    def needs_host_counts(self, device_type: str, dtype: torch.dtype) -> bool:
        """Whether `forward` needs the row counts as host ints (the loop backend's slices)."""
        return resolve_backend(self.backend, device_type, dtype, tuple(self.w2_LFD.shape[1:])) != "grouped_mm"

    def forward(self, x_ND: torch.Tensor, counts: Optional[List[int]], counts_L: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Runs each expert on its contiguous slice of `x_ND`.

        Args:
            x_ND: rows sorted by local expert.
            counts: L row counts (host ints), summing to N; may be None for the grouped backend.
            counts_L: the same counts on the device (the grouped backend's offsets; computed from
                `counts` when None).

        Returns:
            y_ND: raw (un-gated) expert outputs, in the input dtype.
        """
        w_in = self.w_in.to(x_ND.dtype)
        w2_LFD = self.w2_LFD.to(x_ND.dtype)
        if not self.needs_host_counts(x_ND.device.type, x_ND.dtype):
            if counts_L is None:
                counts_L = torch.tensor(counts, device=x_ND.device)
            offs_L = torch.cumsum(counts_L, 0).to(torch.int32)
            h_NF = self._activation(grouped_mm(x_ND, w_in, offs_L))
            return grouped_mm(h_NF, w2_LFD, offs_L)
        outs = []
        # unbind, not w[e]: indexing's backward writes each expert's gradient into a zeroed copy of
        # the whole [L, ...] tensor (O(L^2) traffic: 55% of the step at L=32, F=128); unbind's
        # backward stacks the L gradients once. The unbound slices are views of the parameters, so
        # autograd saves no weight copy.
        for x_nD, w_D2F, w_FD in zip(torch.split(x_ND, counts), w_in.unbind(0), w2_LFD.unbind(0)):
            outs.append(self._activation(x_nD @ w_D2F) @ w_FD)
        # Empty slices run too: their GEMMs give zero (not missing) gradients, so every expert
        # weight has a gradient on every rank and step, which bucketed reducers rely on.
        return torch.cat(outs, dim=0)

    def _activation(self, h: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            a, b = h.chunk(2, dim=-1)
            return F.silu(a) * b
        return F.gelu(h)


class SharedExpert(nn.Module):
    """A dense expert every token passes through, beside the routed ones (DeepSeek-V3, Qwen2-MoE,
    megatron-core's shared experts), optionally scaled per token by sigmoid(w . x).

    Args:
        hidden_size: D.
        ffn_hidden_size: F of the shared expert.
        activation: "swiglu" (fused `w13_D2F`) or "gelu".
        gated: add the per-token sigmoid gate.
        init_std: normal init std.
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str, gated: bool, init_std: float) -> None:
        super().__init__()
        self.activation = activation
        width = 2 * ffn_hidden_size if activation == "swiglu" else ffn_hidden_size
        self.w13_D2F = nn.Parameter(torch.empty(hidden_size, width).normal_(std=init_std))
        self.w2_FD = nn.Parameter(torch.empty(ffn_hidden_size, hidden_size).normal_(std=init_std))
        self.gate_D = nn.Parameter(torch.empty(hidden_size).normal_(std=init_std)) if gated else None

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        h = x_TD @ self.w13_D2F.to(x_TD.dtype)
        if self.activation == "swiglu":
            a, b = h.chunk(2, dim=-1)
            h = F.silu(a) * b
        else:
            h = F.gelu(h)
        y_TD = h @ self.w2_FD.to(x_TD.dtype)
        if self.gate_D is not None:
            y_TD = y_TD * torch.sigmoid(x_TD @ self.gate_D.to(x_TD.dtype))[:, None]
        return y_TD
