"""An independent dense reference of the MoE layer, written out from the formulas.

Every expert is computed for every token (float64), selection and capacity are done with plain
loops, and the Default MoE term and EMA update follow the paper's equations directly. Nothing here
imports the package's routing, dispatch, experts or defaults code.

Legend: T tokens, E experts, K top-k, D hidden, F expert hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F


@dataclass
class Weights:
    router_ED: torch.Tensor
    w1_EDF: torch.Tensor
    w3_EDF: Optional[torch.Tensor]
    w2_EFD: torch.Tensor

    @staticmethod
    def random(E: int, D: int, F_: int, swiglu: bool, seed: int, std: float = 0.2) -> "Weights":
        g = torch.Generator().manual_seed(seed)
        r = lambda *s: torch.randn(*s, generator=g) * std  # noqa: E731
        return Weights(r(E, D), r(E, D, F_), r(E, D, F_) if swiglu else None, r(E, F_, D))

    def double(self, requires_grad: bool = True) -> "Weights":
        def f(t):
            return None if t is None else t.detach().double().requires_grad_(requires_grad)

        return Weights(f(self.router_ED), f(self.w1_EDF), f(self.w3_EDF), f(self.w2_EFD))


def load_into_layer(layer, w: Weights) -> None:
    """Copies global weights into a MoELayer (its local experts only)."""
    ids = list(layer.local_expert_ids)
    with torch.no_grad():
        layer.router.weight.copy_(w.router_ED)
        w_in = w.w1_EDF[ids] if w.w3_EDF is None else torch.cat([w.w1_EDF[ids], w.w3_EDF[ids]], dim=-1)
        layer.experts.w_in.copy_(w_in)
        layer.experts.w2_LFD.copy_(w.w2_EFD[ids])


def expert_grads(layer) -> dict:
    """The layer's local expert gradients as {"w1": [L,D,F], "w3": [L,D,F] or None, "w2": [L,F,D]}."""
    ex = layer.experts
    if ex.activation == "swiglu":
        w1, w3 = ex.w13_LD2F.grad.chunk(2, dim=-1)
    else:
        w1, w3 = ex.w1_LDF.grad, None
    return {"w1": w1, "w3": w3, "w2": ex.w2_LFD.grad}


def expert_mlp(x_TD, w1_DF, w3_DF, w2_FD):
    h = x_TD @ w1_DF
    h = F.silu(h) * (x_TD @ w3_DF) if w3_DF is not None else F.gelu(h)
    return h @ w2_FD


@dataclass
class RefResult:
    out_TD: torch.Tensor
    loss_aux: torch.Tensor
    defaults_used_ED: torch.Tensor
    defaults_after_ED: torch.Tensor
    selected_TE: torch.Tensor
    kept_TE: torch.Tensor
    probs_TE: torch.Tensor


def reference_moe(
    x_TD: torch.Tensor,
    w: Weights,
    *,
    top_k: int,
    use_defaults: bool,
    defaults_ED: torch.Tensor,
    beta: float = 0.9,
    weighting: str = "mean",
    training: bool = True,
    stats_mask_T: Optional[torch.Tensor] = None,
    normalize_topk: bool = False,
    chunks: Optional[List[int]] = None,
    aux_coeff: float = 0.0,
    z_coeff: float = 0.0,
    capacity_factor: Optional[float] = None,
    drop_policy: str = "probs",
    score_function: str = "softmax",
    route_scale: float = 1.0,
    default_in_forward: Optional[bool] = None,
) -> RefResult:
    """Dense forward of the whole (global) batch.

    `chunks` gives the token counts of each data-parallel rank (the batch is their concatenation):
    capacity and the per-rank aux losses are computed per chunk, exactly as each rank would.
    Returns the output and the sum over ranks of the aux losses. `stats_mask_T`: tokens that enter
    the EMA statistics (False: padding).

    Default MoE per gate form g_i = s a_i / Z (docs/method.md), written as the dense output with
    every expert that did not run replaced by its default: s * sum_i w_i E^_i, w_i = a_i / sum_j a_j
    for a normalising gate (softmax, or renormalised over the selected), w_i = a_i for a plain
    sigmoid (then y = y_S + s sum_{not run} w_i D_i). A renormalised gate's experts without a
    committed D take the routed output as their default (E^_i = y_S / s). default_in_forward
    False (auto for sigmoid): the forward is y_S, and the router gets the term's gradient.
    """
    T, D = x_TD.shape
    E = w.router_ED.shape[0]
    chunks = chunks if chunks is not None else [T]
    logits_TE = x_TD @ w.router_ED.t()
    if score_function == "softmax":
        a_TE = torch.exp(logits_TE - logits_TE.max(-1, keepdim=True).values)
        probs_TE = a_TE / a_TE.sum(-1, keepdim=True)
    else:
        a_TE = probs_TE = 1.0 / (1.0 + torch.exp(-logits_TE))
    all_ETD = torch.stack(
        [expert_mlp(x_TD, w.w1_EDF[e], None if w.w3_EDF is None else w.w3_EDF[e], w.w2_EFD[e]) for e in range(E)]
    )

    selected_TE = torch.zeros(T, E, dtype=torch.bool)
    for t in range(T):
        order = sorted(range(E), key=lambda e: -probs_TE[t, e].item())
        for e in order[:top_k]:
            selected_TE[t, e] = True

    kept_TE = selected_TE.clone()
    if capacity_factor is not None:
        start = 0
        for n in chunks:
            cap = math.ceil(capacity_factor * n * top_k / E)
            for e in range(E):
                toks = [t for t in range(start, start + n) if selected_TE[t, e]]
                if drop_policy == "probs":
                    toks.sort(key=lambda t: -probs_TE[t, e].item())
                for t in toks[cap:]:
                    kept_TE[t, e] = False
            start += n

    gates_TE = probs_TE * selected_TE
    if normalize_topk:
        gates_TE = gates_TE / gates_TE.sum(-1, keepdim=True)
    gates_TE = gates_TE * route_scale

    defaults_after = defaults_ED.double().clone()
    if use_defaults and training:
        for e in range(E):
            toks = kept_TE[:, e] if stats_mask_T is None else kept_TE[:, e] & stats_mask_T
            if toks.any():
                wt = probs_TE[toks, e].detach() if weighting == "prob" else torch.ones(int(toks.sum()), dtype=torch.float64)
                m = (all_ETD[e, toks].detach() * wt[:, None]).sum(0) / wt.sum()
                if normalize_topk and not defaults_after[e].ne(0).any():
                    defaults_after[e] = m  # a renormalised gate's default starts at the first mean
                else:
                    defaults_after[e] = beta * defaults_after[e] + (1 - beta) * m
    # The step contract: this step's forwards use the committed D; the commit at the optimizer
    # step produces defaults_after.
    used = defaults_ED.double()

    y_S = torch.zeros(T, D, dtype=torch.float64)
    for e in range(E):
        y_S = y_S + (gates_TE[:, e] * kept_TE[:, e])[:, None] * all_ETD[e]
    out_TD = y_S
    if use_defaults:
        in_forward = default_in_forward if default_in_forward is not None else score_function == "softmax"
        normalising = score_function == "softmax" or normalize_topk
        w_TE = a_TE / a_TE.sum(-1, keepdim=True) if normalising else a_TE
        y_ref = y_S if in_forward else y_S.detach()
        if normalize_topk:
            # s * sum_i w_i E^_i over ALL experts: E_i where it ran, D_i or y_S / s where it did not.
            dense = torch.zeros(T, D, dtype=torch.float64)
            for e in range(E):
                observed = bool(used[e].ne(0).any())
                E_hat = torch.where(
                    kept_TE[:, e : e + 1],
                    all_ETD[e] if in_forward else all_ETD[e].detach(),
                    used[e][None, :] if observed else y_ref / route_scale,
                )
                dense = dense + route_scale * w_TE[:, e : e + 1] * E_hat
        else:
            dense = y_ref
            for e in range(E):
                dense = dense + route_scale * (w_TE[:, e] * ~kept_TE[:, e])[:, None] * used[e][None, :]
        if in_forward:
            out_TD = dense
        else:
            # The forward stays y_S; the router gets the term's gradient with the experts' outputs
            # and the routed output held fixed (for a renormalised gate: moving mass w_i from y_S to
            # s D_i, sum_{not run, with D} w_i (s D_i - y_S)).
            extra = torch.zeros(T, D, dtype=torch.float64)
            for e in range(E):
                if normalize_topk:
                    if bool(used[e].ne(0).any()):
                        extra = extra + (w_TE[:, e] * ~kept_TE[:, e])[:, None] * (route_scale * used[e][None, :] - y_ref)
                else:
                    extra = extra + route_scale * (w_TE[:, e] * ~kept_TE[:, e])[:, None] * used[e][None, :]
            out_TD = y_S + extra - extra.detach()

    loss_aux = torch.zeros((), dtype=torch.float64)
    counts_E = selected_TE.sum(0).double() / len(chunks)  # averaged over DP ranks
    start = 0
    for n in chunks:
        if n > 0:
            p = probs_TE[start : start + n]
            if score_function == "sigmoid":  # the balance loss sees per-token normalised scores
                p = p / p.sum(-1, keepdim=True)
            if aux_coeff:
                loss_aux = loss_aux + aux_coeff * E / (n * n * top_k) * (p.sum(0) * counts_E).sum()
            if z_coeff:
                loss_aux = loss_aux + z_coeff * torch.logsumexp(logits_TE[start : start + n], -1).square().mean()
        start += n
    return RefResult(out_TD, loss_aux, used, defaults_after, selected_TE, kept_TE, probs_TE)
