"""megatron-core (0.16.1 and 0.19.2: launch/test.sh runs these in both envs; CPU, gloo) with Default MoE patched into its specs."""

import argparse

import pytest

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.megatron

from dist import run_distributed  # noqa: E402


@pytest.mark.distributed
def test_megatron_layer_specs_training_checkpoint(tmp_path):
    import megatron_workers

    run_distributed(megatron_workers.all_checks, 2, str(tmp_path))


def test_megatron_lm_arguments():
    from default_moe.integrations import megatron as dm

    parser = dm.extra_args_provider(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            "--moe-router-type",
            "default",
            "--moe-default-beta",
            "0.95",
            "--moe-default-ema-stats-dtype",
            "bfloat16",
            "--moe-nonfinite",
            "raise",
        ]
    )
    assert dm.settings_from_args(args) == {
        "router": "default",
        "beta": 0.95,
        "ema_weighting": "mean",
        "ema_stats_dtype": "bfloat16",
        "nonfinite": "raise",
        "stale_defaults": "keep",
    }
    stale = parser.parse_args(["--moe-router-type", "default", "--moe-default-stale-defaults", "zero"])
    assert dm.validate_settings(dm.settings_from_args(stale))["stale_defaults"] == "zero"
    # The removed EMA-sync flags still parse (old launch scripts) and warn that they are ignored.
    with pytest.warns(FutureWarning, match="ema_sync was removed and is ignored"):
        old = dm.settings_from_args(parser.parse_args(["--moe-router-type", "default", "--moe-default-ema-sync", "async"]))
        assert "ema_sync" not in dm.validate_settings(old)
    assert dm.settings_from_args(parser.parse_args([]))["router"] == "topk"
    assert "default_in_forward" not in dm.settings_from_args(parser.parse_args([]))  # auto: by the score function
    for flag, value in (("true", True), ("false", False)):
        got = dm.settings_from_args(parser.parse_args(["--moe-router-type", "default", "--moe-default-in-forward", flag]))
        assert got["default_in_forward"] is value
    # Megatron-LM's pipeline stages get no token ids past the first: token-id routers refused by name.
    hashed = parser.parse_args(["--moe-router-type", "hash"])
    hashed.pipeline_model_parallel_size = 2
    with pytest.raises(ValueError, match="--moe-router-type hash routes by token id.*pipeline-model-parallel-size 2"):
        dm.install_from_args(hashed)
    assert not dm.installed()
    sm = parser.parse_args(["--moe-router-type", "stablemoe", "--moe-stablemoe-stage2-step", "100"])
    sm.padded_vocab_size = 512  # Megatron-LM sets it from the tokenizer
    assert dm.settings_from_args(sm)["stablemoe"] == {"vocab_size": 512, "stage2_step": 100, "router_dim": 50}
    with pytest.raises(ValueError, match="stablemoe.vocab_size is required"):
        dm.settings_from_args(parser.parse_args(["--moe-router-type", "stablemoe"]))
    for bad in (
        ["--moe-router-type", "nope"],
        ["--moe-default-beta", "1.0"],
        ["--moe-default-beta", "x"],
        ["--moe-default-ema-sync", "later"],
        ["--moe-nonfinite", "warn"],
        ["--moe-default-in-forward", "yes"],
        ["--moe-default-stale-defaults", "often"],
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_megatron_lm_provider_wrapper():
    """What patches/megatron-lm-pretrain_gpt.diff relies on: chained arg providers, and a model
    provider that builds its specs with Default MoE installed (and uninstalls afterwards)."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from default_moe.integrations import megatron as dm
    from default_moe.integrations import megatron_compat as compat

    seen = []
    parser = dm.chain_extra_args_providers(None, lambda p: seen.append(p) or p)(argparse.ArgumentParser())
    assert seen and parser.parse_args(["--moe-router-type", "default"]).moe_router_type == "default"
    args = parser.parse_args(["--moe-router-type", "default", "--moe-default-beta", "0.5"])

    def provider():
        return gpt_layer_specs.get_gpt_layer_local_spec(num_experts=4).submodules.mlp

    mlp = dm.wrap_model_provider(provider, get_args=lambda: args)()
    assert compat.moe_spec_class(mlp) is dm.DefaultMoELayer and compat.moe_spec_kwargs(mlp)["default_moe"]["beta"] == 0.5
    assert compat.moe_spec_class(gpt_layer_specs.get_gpt_layer_local_spec(num_experts=4).submodules.mlp) is MoELayer


def test_megatron_example_runs_on_cpu():
    """launch/example_megatron.py (docs/megatron.md's minimal provider, with the opt-in CPU shims) trains
    a megatron-core GPT with Default MoE layers under torchrun: loss falls, D is non-zero."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "launch/example_megatron.py"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [float(v) for v in re.findall(r"loss ([0-9.]+)", out.stdout)]
    norm = float(re.search(r"mean norm ([0-9.]+)", out.stdout).group(1))
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5 and norm > 0, out.stdout


def test_install_reaches_every_spec_path_and_refuses_the_rest():
    """install() patches every MoE spec source of this megatron-core (GPT layer specs; on 0.19 also
    the experimental attention variants and the hybrid specs built at import time); while
    installed, a megatron MoELayer that is not ours cannot be built; uninstall() restores all."""
    import types

    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from default_moe.integrations import megatron as dm
    from default_moe.integrations import megatron_compat as compat

    cfg = TransformerConfig(
        num_layers=2,
        hidden_size=16,
        num_attention_heads=2,
        num_moe_experts=4,
        moe_router_topk=2,
        moe_router_pre_softmax=True,
        use_cpu_initialization=True,
        add_bias_linear=False,
    )
    init = MoELayer.__init__
    before = {(m.__name__, a): getattr(m, a) for m, a in compat.spec_builder_sites() + compat.prebuilt_spec_sites()}
    dm.install(router="default", beta=0.7)
    try:
        assert compat.moe_spec_class(gpt_layer_specs.get_gpt_layer_local_spec(num_experts=4).submodules.mlp) is dm.DefaultMoELayer
        if compat.NEW_SPECS:
            from megatron.core.models.backends import LocalSpecProvider
            from megatron.core.models.gpt import experimental_attention_variant_module_specs as variants
            from megatron.core.models.hybrid import hybrid_layer_specs

            spec, _ = variants._get_moe_module_spec(cfg, backend=LocalSpecProvider())
            assert compat.moe_spec_class(spec) is dm.DefaultMoELayer
            assert compat.moe_spec_class(hybrid_layer_specs.moe) is dm.DefaultMoELayer
            moe_layer = hybrid_layer_specs.hybrid_stack_spec.submodules.moe_layer
            assert compat.moe_spec_class(moe_layer.submodules.mlp) is dm.DefaultMoELayer
            assert compat.moe_spec_kwargs(moe_layer.submodules.mlp)["default_moe"]["beta"] == 0.7
        with pytest.raises(RuntimeError, match="building a MoELayer from a spec it did not patch"):
            MoELayer(cfg)
    finally:
        dm.uninstall()
    assert MoELayer.__init__ is init
    assert {(m.__name__, a): getattr(m, a) for m, a in compat.spec_builder_sites() + compat.prebuilt_spec_sites()} == before
    # Features whose expert path Default MoE cannot see are refused by name.
    with pytest.raises(ValueError, match="moe_latent_size"):
        dm.check_megatron_config(types.SimpleNamespace(**{**vars(cfg), "moe_latent_size": 8}))
    with pytest.raises(ValueError, match="overlap_dispatch_backward_with_experts_wgrad"):
        dm.check_megatron_config(types.SimpleNamespace(**{**vars(cfg), "overlap_dispatch_backward_with_experts_wgrad": True}))
