"""Process groups of an MoE layer: expert-parallel (EP), expert-data-parallel and data-parallel.

With `ep_size` = P and world size W (no tensor or pipeline parallelism), ranks are split into
W/P EP groups of P consecutive ranks: rank r holds experts [ep_rank*E/P, (ep_rank+1)*E/P) where
ep_rank = r % P. Ranks holding the same experts (same ep_rank) form an expert-data-parallel group;
their expert gradients are reduced there. Dense parameters and the EMA statistics are reduced over
the whole data-parallel group (here: the world). The same layout as DeepSpeed's `ep_size_P`
groups, so engines can hand over theirs through `ParallelGroups(...)` directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from default_moe.comm import group_size, is_distributed


@dataclass
class ParallelGroups:
    """The groups one MoE layer communicates over. `None` means "no communication" (size 1)."""

    ep_group: Optional[dist.ProcessGroup] = None
    expert_dp_group: Optional[dist.ProcessGroup] = None
    dp_group: Optional[dist.ProcessGroup] = None

    @property
    def ep_size(self) -> int:
        return group_size(self.ep_group)

    @property
    def ep_rank(self) -> int:
        return dist.get_rank(self.ep_group) if self.ep_size > 1 else 0

    @property
    def dp_size(self) -> int:
        return group_size(self.dp_group)

    @property
    def expert_dp_size(self) -> int:
        return group_size(self.expert_dp_group)

    @classmethod
    def single(cls) -> "ParallelGroups":
        """No parallelism: every collective is skipped."""
        return cls()


_CACHE: Dict[Tuple[int, int], ParallelGroups] = {}


def check_ep_size(ep_size: int, world_size: int) -> None:
    if world_size % ep_size != 0:
        raise ValueError(
            f"MoEConfig.ep_size ({ep_size}) must divide the world size ({world_size}); "
            f"allowed ep_size values here: {[d for d in range(1, world_size + 1) if world_size % d == 0]}"
        )


def build_groups(ep_size: int) -> ParallelGroups:
    """EP / expert-DP / DP groups from `torch.distributed` alone (cached per ep_size and world).

    Must be called on every rank in the same order (group creation is collective). Without an
    initialised process group, `ep_size` must be 1 and no groups are made.
    """
    if not is_distributed():
        check_ep_size(ep_size, 1)
        return ParallelGroups.single()
    world, rank = dist.get_world_size(), dist.get_rank()
    check_ep_size(ep_size, world)
    key = (ep_size, world)
    if key in _CACHE:
        return _CACHE[key]
    ep_group = expert_dp_group = None
    for start in range(0, world, ep_size):
        ranks = list(range(start, start + ep_size))
        g = dist.new_group(ranks)
        if rank in ranks:
            ep_group = g
    for ep_rank in range(ep_size):
        ranks = list(range(ep_rank, world, ep_size))
        g = dist.new_group(ranks)
        if rank in ranks:
            expert_dp_group = g
    groups = ParallelGroups(ep_group=ep_group, expert_dp_group=expert_dp_group, dp_group=dist.group.WORLD)
    _CACHE[key] = groups
    return groups


def clear_group_cache() -> None:
    """Forget cached groups (call after `destroy_process_group`)."""
    _CACHE.clear()


def init_distributed_from_env(timeout_s: float = 600.0) -> "tuple[int, int, torch.device]":
    """Initialises torch.distributed from torchrun's environment (NCCL with GPUs, gloo on CPU).

    Returns:
        (rank, world_size, device). Without torchrun variables: a single process, no group.
    """
    import datetime
    import os

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "WORLD_SIZE" not in os.environ or is_distributed():
        return (dist.get_rank(), dist.get_world_size(), device) if is_distributed() else (0, 1, device)
    backend, timeout = ("nccl" if cuda else "gloo"), datetime.timedelta(seconds=timeout_s)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(
            backend=backend,
            timeout=timeout,
            store=_elastic_store(restart, timeout),
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
        )
    import atexit

    atexit.register(_destroy_at_exit)
    return dist.get_rank(), dist.get_world_size(), device


def _destroy_at_exit() -> None:
    """Process groups still alive at interpreter exit (an exception, a script that never calls
    destroy_process_group) are destroyed while Python is whole: left to finalisation, gloo's worker
    threads release tensors after the interpreter is gone and the process aborts ("terminate
    called without an active exception"), which torchrun counts as a failure and restarts for
    nothing. Local to this process (gloo's destroy runs no collective), so it cannot hang."""
    import gc

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
    gc.collect()


def _elastic_store(restart: str, timeout) -> "dist.Store":
    """The rendezvous store under torchrun, with keys private to this restart round.

    torchrun (torch >= 2.4) shares one TCPStore across restart rounds and hands it to the workers
    unprefixed, so a restarted worker can read a dead worker's gloo/NCCL address from the previous
    round and fail with "connectFullMesh ... Connection refused" (or hang), depending on who starts
    first. Prefixing the keys with the round makes every round start from a clean slate. The round
    is counted in the store (how many times this rank has started), not taken from
    TORCHELASTIC_RESTART_COUNT: with several nodes that count is per agent, and an agent that
    restarts because another node re-joined (not because its own workers failed) does not raise
    it, so the nodes would use different prefixes and hang (seen on the SLURM test cluster).
    """
    import os

    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=not agent_store and int(os.environ["RANK"]) == 0,
        timeout=timeout,
        multi_tenant=True,
    )
    # Every round starts every rank once, so each rank's start count is the round number.
    round_ = store.add(f"default_moe/starts/rank{os.environ['RANK']}", 1)
    return dist.PrefixStore(f"default_moe/round_{round_}", store)


def check_same_config(config, group: Optional[dist.ProcessGroup] = None) -> None:
    """Compares a config across the ranks of `group` (all ranks call it): a config that differs
    (experts, ep_size, router, beta, ...) fails on every rank with a ValueError naming the fields,
    instead of a collective that hangs or silently mixes settings later."""
    if group_size(group) <= 1:
        return
    mine = config.to_dict()
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    diffs = sorted({k for other in gathered for k in mine if other.get(k) != mine.get(k)})
    if diffs:
        values = {k: [other.get(k) for other in gathered] for k in diffs}
        raise ValueError(f"MoEConfig differs between ranks in {diffs}: per-rank values {values}")
