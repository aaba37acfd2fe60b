"""Identical, correct D in the parallel layouts megatron users run (megatron-core 0.16.1 and 0.19.2):
TP with sequence parallelism, expert-TP, EP, CP, PP, DP and products of them, each against a
float64 dense reference of D and of the layer output (tests/megatron_layout_workers.py)."""

import pytest

pytest.importorskip("megatron.core")
pytestmark = [pytest.mark.megatron, pytest.mark.distributed]

from dist import run_distributed  # noqa: E402


def test_layouts_on_2_ranks():
    import megatron_layout_workers as w

    run_distributed(w.all_layouts, 2, w.LAYOUTS_2)


def test_layouts_on_4_ranks():
    import megatron_layout_workers as w

    run_distributed(w.all_layouts, 4, w.LAYOUTS_4)


@pytest.mark.parametrize("vpp", [None, 2], ids=["1f1b", "interleaved"])
def test_pipeline_with_recompute_equals_no_recompute(vpp):
    """megatron's 1F1B and interleaved schedules, 2 stages, 4 micro-batches: full-layer and
    selective ("moe") recompute give router/expert gradients, D and the StableMoE step equal to
    no recompute (Default MoE and StableMoE across its stage boundary)."""
    import megatron_pipeline_workers as w

    run_distributed(w.pipeline_recompute, 2, vpp)
