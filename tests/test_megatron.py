"""megatron-core (0.16.x, CPU, gloo, 2 processes) with Default MoE patched into its specs."""

import argparse

import pytest

pytest.importorskip("megatron.core")

from dist import run_distributed  # noqa: E402


@pytest.mark.distributed
def test_megatron_layer_specs_training_checkpoint(tmp_path):
    import megatron_workers

    run_distributed(megatron_workers.all_checks, 2, str(tmp_path))


def test_megatron_lm_arguments():
    from default_moe.integrations import megatron as dm

    parser = dm.extra_args_provider(argparse.ArgumentParser())
    args = parser.parse_args(["--moe-router-type", "default", "--moe-default-beta", "0.95", "--moe-default-ema-sync", "async"])
    assert dm.settings_from_args(args) == {"router": "default", "beta": 0.95, "ema_sync": "async", "ema_weighting": "mean"}
    assert dm.settings_from_args(parser.parse_args([]))["router"] == "topk"
    for bad in (["--moe-router-type", "nope"], ["--moe-default-beta", "1.0"], ["--moe-default-beta", "x"],
                ["--moe-default-ema-sync", "later"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
