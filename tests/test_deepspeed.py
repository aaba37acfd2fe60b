"""DeepSpeed engines (0.19, CPU, gloo, 2 processes) with the "default_moe" config section."""

import pytest

pytest.importorskip("deepspeed")

import ds_workers  # noqa: E402
from dist import run_distributed  # noqa: E402

pytestmark = pytest.mark.distributed


def test_deepspeed_section_engines_reference_checkpoints(tmp_path):
    run_distributed(ds_workers.all_checks, 2, str(tmp_path))


def test_deepspeed_own_moe_layers_converted(tmp_path):
    import ds_moe_workers

    run_distributed(ds_moe_workers.all_checks, 2, str(tmp_path))


def test_autoep_hf_models(tmp_path):
    pytest.importorskip("transformers")
    import autoep_workers

    run_distributed(autoep_workers.all_checks, 2, str(tmp_path))
