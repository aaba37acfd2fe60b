"""Token ids for routers that route by token (hash, StableMoE) inside engine-owned layers.

megatron-core, HF models under AutoEP and `deepspeed.moe.layer.MoE` do not pass input ids to
their MoE blocks. `capture_token_ids(model)` registers a forward pre-hook on the model's root
module that records its input ids (the `input_ids` keyword, else the first integer tensor
argument); the engine adapters read them through `ids_for(record)`, which keeps them in the
forward's record (`layer_utils.ForwardSnapshots`): an activation-checkpoint recompute replays the
ids its own forward used, also when a pipeline schedule ran other forwards in between.

The ids are held process-wide, not per thread: on CUDA, autograd runs backward and
activation-checkpoint recomputation on per-device worker threads, which must read the ids the
caller's thread recorded.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

_IDS: list = [None]  # one slot for the whole process (see the module docstring)


def set_current(ids: Optional[torch.Tensor]) -> None:
    _IDS[0] = ids


def current(what: str = "this router") -> torch.Tensor:
    ids = _IDS[0]
    if ids is None:
        raise ValueError(
            f"{what} routes by token id, but this forward's model input had no token ids (call "
            "default_moe.token_context.capture_token_ids(model) on the model's root module once; under pipeline "
            "parallelism every stage's model chunk must be given the input ids — Megatron-LM's get_batch loads them "
            "on the first and last stages only, so hash/StableMoE routing needs a data path that passes them on)"
        )
    return ids


def ids_for(record: dict, what: str = "this router") -> torch.Tensor:
    """The token ids of the forward `record` belongs to (a `ForwardSnapshots` value): recorded at
    the forward, replayed by its recompute (the recompute contract), however many forwards ran in
    between."""
    if "ids" not in record:
        record["ids"] = current(what)
    return record["ids"]


def _find_ids(args, kwargs) -> Optional[torch.Tensor]:
    ids = kwargs.get("input_ids")
    if isinstance(ids, torch.Tensor):
        return ids
    for a in args:
        if isinstance(a, torch.Tensor) and not a.is_floating_point() and a.dtype != torch.bool:
            return a
    return None


def capture_token_ids(model: nn.Module):
    """Records the root module's input ids at every forward; returns the hook handle."""
    if getattr(model, "_default_moe_token_hook", None) is not None:
        return model._default_moe_token_hook

    def hook(module, args, kwargs):
        # Every forward replaces the ids, also with None: a forward without ids (a middle pipeline
        # stage under Megatron-LM, whose get_batch loads tokens on the first stage only; inputs_embeds)
        # must fail by name, never route with another micro-batch's ids.
        ids = _find_ids(args, kwargs)
        set_current(ids.detach() if ids is not None else None)

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    model._default_moe_token_hook = handle
    return handle
