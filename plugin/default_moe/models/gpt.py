"""A small decoder-only GPT whose FFNs are `MoELayer`s (the main job's model).

Pre-LayerNorm blocks: x + attn(ln(x)), x + moe(ln(x)); learned positions; output head tied to
the token embedding. The MoE layers are built from `GPTConfig`'s MoE fields; an engine integration
(the DeepSpeed "default_moe" section) may reconfigure them (router, ep_size, ...).

Legend: B batch, S sequence, D model width, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from default_moe.config import MoEConfig
from default_moe.layer import MoELayer


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    seq_len: int = 128
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    num_experts: int = 8
    top_k: int = 2
    ffn_hidden_size: int = 256
    # As built, without an engine section: a plain TopK MoE (the "default_moe" section switches).
    router: str = "topk"
    activation: str = "swiglu"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "ffn_hidden_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"GPTConfig.{name} must be an integer >= 1, got {v!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"GPTConfig.d_model ({self.d_model}) must be divisible by GPTConfig.n_heads ({self.n_heads})")

    def moe_config(self) -> MoEConfig:
        return MoEConfig(
            hidden_size=self.d_model,
            num_experts=self.num_experts,
            ffn_hidden_size=self.ffn_hidden_size,
            top_k=self.top_k,
            router=self.router,
            activation=self.activation,
            init_std=self.init_std,
        )


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.moe = MoELayer(cfg.moe_config())

    def forward(self, x_BSD: torch.Tensor, idx_BS: torch.Tensor) -> torch.Tensor:
        x_BSD = x_BSD + self.attn(self.ln1(x_BSD))
        # Token ids reach the MoE layer for routers that route by token (hash, StableMoE).
        return x_BSD + self.moe(self.ln2(x_BSD), token_ids=idx_BS)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        for i, block in enumerate(self.blocks):
            block.moe.layer_name = f"blocks.{i}.moe"
        self.ln_f = nn.LayerNorm(cfg.d_model)
        for name, p in self.named_parameters():
            if p.dim() == 2 and "moe" not in name:
                nn.init.normal_(p, std=cfg.init_std)

    @property
    def moe_layers(self):
        return [b.moe for b in self.blocks]

    def forward(self, idx_BS: torch.Tensor, targets_BS: torch.Tensor = None) -> torch.Tensor:
        """Returns the mean next-token cross-entropy when `targets_BS` is given, else logits."""
        B, S = idx_BS.shape
        x = self.tok(idx_BS) + self.pos(torch.arange(S, device=idx_BS.device))
        for block in self.blocks:
            x = block(x, idx_BS)
        logits_BSV = F.linear(self.ln_f(x), self.tok.weight)
        if targets_BS is None:
            return logits_BSV
        return F.cross_entropy(logits_BSV.float().view(-1, logits_BSV.shape[-1]), targets_BS.reshape(-1))
