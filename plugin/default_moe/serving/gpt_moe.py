"""The main job's GPT-MoE as a plain top-k MoE, in torch alone: the modeling file that
`default-moe export` writes beside the weights (`model.pt`, `config.json`), so a serving process
needs neither default_moe nor DeepSpeed. No default term: the model a runtime that knows only
top-k MoE computes.

    import importlib.util, json, torch
    spec = importlib.util.spec_from_file_location("gpt_moe", "EXPORT/gpt_moe.py")
    gpt_moe = importlib.util.module_from_spec(spec); spec.loader.exec_module(gpt_moe)
    model = gpt_moe.load("EXPORT")            # eval mode
    logits_BSV = model(token_ids_BS)

Architecture (default_moe.models.gpt): pre-LayerNorm blocks x + attn(ln1(x)), x + moe(ln2(x));
learned positions; causal attention; output head tied to the token embedding. Each MoE layer:
scores = softmax or sigmoid of x W_r^T (fp32), the top-k of scores (+ the expert bias, selection
only; optionally within the best groups), gates = the selected scores (renormalised over them
when `normalize_topk`) times `route_scale`, dropless; SwiGLU or GELU experts; an optional shared
expert (gated or not).

Legend: B batch, S sequence, D model width, V vocabulary, T tokens, E experts, K top-k.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn


class MoE(nn.Module):
    def __init__(self, d: int, layer: dict) -> None:
        super().__init__()
        self.cfg = layer
        E, Fh = layer["num_experts"], layer["ffn_hidden_size"]
        self.router_weight = nn.Parameter(torch.empty(E, d))
        self.expert_bias = nn.Parameter(torch.zeros(E), requires_grad=False) if layer.get("expert_bias") else None
        width = 2 * Fh if layer["activation"] == "swiglu" else Fh
        self.w_in = nn.Parameter(torch.empty(E, d, width))
        self.w2 = nn.Parameter(torch.empty(E, Fh, d))
        fs = layer.get("shared_expert_ffn_hidden_size") or 0
        self.shared_w13 = nn.Parameter(torch.empty(d, 2 * fs if layer["activation"] == "swiglu" else fs)) if fs else None
        self.shared_w2 = nn.Parameter(torch.empty(fs, d)) if fs else None
        self.shared_gate = nn.Parameter(torch.empty(d)) if fs and layer.get("shared_expert_gate") else None

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        if self.cfg["activation"] == "swiglu":
            a, b = h.chunk(2, dim=-1)
            return F.silu(a) * b
        return F.gelu(h)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        logits_TE = F.linear(x_TD.float(), self.router_weight.float())
        scores_TE = torch.softmax(logits_TE, -1) if c["score_function"] == "softmax" else torch.sigmoid(logits_TE)
        select_TE = scores_TE if self.expert_bias is None else scores_TE + self.expert_bias
        K = c["top_k"]
        if c.get("num_expert_groups"):
            T, E = select_TE.shape
            G = c["num_expert_groups"]
            group_TG = select_TE.view(T, G, -1).topk(K // c["group_topk"], dim=-1).values.sum(-1)
            keep_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter(1, group_TG.topk(c["group_topk"], -1).indices, True)
            select_TE = select_TE.masked_fill(~keep_TG.repeat_interleave(E // G, dim=1), float("-inf"))
        idx_TK = torch.topk(select_TE, K, dim=-1).indices
        gates_TK = scores_TE.gather(1, idx_TK)
        if c.get("normalize_topk"):
            gates_TK = gates_TK / (gates_TK.sum(-1, keepdim=True) + 1e-20)
        gates_TK = gates_TK * c.get("route_scale", 1.0)
        out_TD = torch.zeros_like(x_TD)
        for e in range(self.w_in.shape[0]):
            rows, slot = (idx_TK == e).nonzero(as_tuple=True)
            if rows.numel():
                y = self._act(x_TD[rows] @ self.w_in[e].to(x_TD.dtype)) @ self.w2[e].to(x_TD.dtype)
                out_TD.index_add_(0, rows, y * gates_TK[rows, slot, None].to(y.dtype))
        if self.shared_w13 is not None:
            y = self._act(x_TD @ self.shared_w13.to(x_TD.dtype)) @ self.shared_w2.to(x_TD.dtype)
            if self.shared_gate is not None:
                y = y * torch.sigmoid(x_TD @ self.shared_gate.to(x_TD.dtype))[:, None]
            out_TD = out_TD + y
        return out_TD


class Block(nn.Module):
    def __init__(self, cfg: dict, layer: dict) -> None:
        super().__init__()
        d = cfg["d_model"]
        self.n_heads = cfg["n_heads"]
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.moe = MoE(d, layer)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(self.ln1(x_BSD)).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x_BSD = x_BSD + self.proj(y.transpose(1, 2).reshape(B, S, D))
        return x_BSD + self.moe(self.ln2(x_BSD).reshape(-1, D)).view(B, S, D)


class GPTMoE(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg["vocab_size"], cfg["d_model"])
        self.pos = nn.Embedding(cfg["seq_len"], cfg["d_model"])
        self.blocks = nn.ModuleList([Block(cfg, layer) for layer in cfg["moe_layers"]])
        self.ln_f = nn.LayerNorm(cfg["d_model"])

    def forward(self, idx_BS: torch.Tensor) -> torch.Tensor:
        S = idx_BS.shape[1]
        x = self.tok(idx_BS) + self.pos(torch.arange(S, device=idx_BS.device))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.tok.weight)


# The exported state's names (default_moe.models.gpt) -> this file's.
RENAME = {
    "attn.qkv.weight": "qkv.weight",
    "attn.proj.weight": "proj.weight",
    "moe.router.weight": "moe.router_weight",
    "moe.router.expert_bias.expert_bias_E": "moe.expert_bias",
    "moe.experts.w13_LD2F": "moe.w_in",
    "moe.experts.w1_LDF": "moe.w_in",
    "moe.experts.w2_LFD": "moe.w2",
    "moe.shared_experts.w13_D2F": "moe.shared_w13",
    "moe.shared_experts.w2_FD": "moe.shared_w2",
    "moe.shared_experts.gate_D": "moe.shared_gate",
}


def load(folder: str, map_location: str = "cpu") -> GPTMoE:
    """The exported model in eval mode (`config.json` and `model.pt` of `folder`)."""
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    state = torch.load(os.path.join(folder, "model.pt"), map_location=map_location, weights_only=True)
    renamed = {}
    for key, value in state.items():
        for old, new in RENAME.items():
            if key.startswith("blocks.") and key.endswith(old):
                key = key[: -len(old)] + new
                break
        renamed[key] = value
    model = GPTMoE(cfg)
    model.load_state_dict(renamed, strict=True)
    return model.eval()
