"""Plain-PyTorch data parallelism for EP models (issue 15): `reduce_gradients`, `wrap_ddp` and
`fully_shard_moe` (FSDP2) each equal the float64 reference of the union batch over 3 SGD steps
(gradients after reduction, D identical on every rank, weights after the updates)."""

import pytest

import data_parallel_workers
from dist import run_distributed

pytestmark = pytest.mark.distributed


def test_world2_ep2():
    """EP = world: every expert on one rank (expert-DP size 1)."""
    run_distributed(data_parallel_workers.all_ways, 2, 2)


def test_world4_ep2():
    """EP 2 x DP 2: experts replicated over pairs of ranks (sharded there under FSDP2)."""
    run_distributed(data_parallel_workers.all_ways, 4, 2)
