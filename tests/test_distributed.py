"""Multi-process (gloo) checks: outputs, gradients and defaults equal the dense reference of the
union batch for world 2 and 4, EP 1/2/4, uneven routing, empty ranks and experts, capacity mode."""

import pytest

import workers
from dist import run_distributed

pytestmark = pytest.mark.distributed


def case(name, chunks, **config):
    skew = config.pop("skew", False)
    config.setdefault("router", "default")
    config.setdefault("aux_loss_coeff", 0.01)
    return {"name": name, "chunks": chunks, "skew": skew, "config": config}


WORLD2 = [
    case("ep2 default", [24, 24], ep_size=2),
    case("ep2 topk", [24, 24], ep_size=2, router="topk", z_loss_coeff=0.01),
    case("ep1 (EP < world) default", [20, 20], ep_size=1),
    case("ep2 uneven routing + empty expert", [24, 24], ep_size=2, skew=True, top_k=1),
    case("ep2 rank with zero tokens", [40, 0], ep_size=2, aux_loss_coeff=0.0),
    case("ep2 uneven token counts", [31, 9], ep_size=2, aux_loss_coeff=0.0, ema_weighting="prob"),
    case("ep2 capacity probs", [32, 32], ep_size=2, capacity_factor=0.6, skew=True),
    case("ep2 capacity position gelu", [32, 32], ep_size=2, capacity_factor=1.0, drop_policy="position", activation="gelu"),
    case("ep2 bf16 stats", [24, 24], ep_size=2, ema_stats_dtype="bfloat16"),
]

WORLD4 = [
    case("ep4 default", [16, 16, 16, 16], ep_size=4),
    case("ep2 of world4 default", [16, 16, 16, 16], ep_size=2, skew=True),
    case("ep4 zero-token rank + capacity", [30, 0, 20, 14], ep_size=4, aux_loss_coeff=0.0, capacity_factor=1.0),
    case("ep4 topk async-irrelevant", [16, 16, 16, 16], ep_size=4, router="topk", top_k=3),
]


def test_world2_equivalence_collectives_and_bad_ep():
    run_distributed(workers.world2_all, 2, WORLD2)


def test_world4_equivalence():
    run_distributed(workers.run_cases, 4, WORLD4)
