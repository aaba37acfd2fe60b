"""Small helpers shared by the layer and the routers."""

import torch


def in_backward() -> bool:
    """True while the autograd engine runs, i.e. when activation checkpointing recomputes a layer."""
    return torch._C._current_graph_task_id() != -1
