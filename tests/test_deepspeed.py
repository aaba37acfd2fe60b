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


def test_section_guard_without_importing_the_integration(tmp_path):
    """A model of MoELayers given to plain deepspeed.initialize with an enabled "default_moe" section
    is refused, though nothing imported default_moe.integrations.deepspeed: the layer's construction
    hook (registered by the package, not the core) installs the guard."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("deepspeed")
    script = tmp_path / "guard.py"
    script.write_text(
        "import os, sys\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='29731', RANK='0', WORLD_SIZE='1', LOCAL_RANK='0')\n"
        "import deepspeed, torch\n"
        "from default_moe import MoEConfig, MoELayer\n"
        "model = torch.nn.Sequential(MoELayer(MoEConfig(hidden_size=8, num_experts=2, ffn_hidden_size=8, top_k=1)))\n"
        "assert 'default_moe.integrations.deepspeed' in sys.modules  # imported by the hook, not by this script\n"
        "from default_moe.integrations.deepspeed import skip_cpu_jit_builds\n"
        "skip_cpu_jit_builds()\n"
        "cfg = {'train_micro_batch_size_per_gpu': 1, 'default_moe': {'enabled': True},\n"
        "       'optimizer': {'type': 'AdamW', 'params': {'lr': 1e-3, 'torch_adam': True}}}\n"
        "try:\n"
        "    deepspeed.initialize(model=model, config=cfg, model_parameters=model.parameters())\n"
        "except ValueError as e:\n"
        "    print('REFUSED' if \"was not built by default_moe's initialize\" in str(e) else 'OTHER: ' + str(e))\n"
        "else:\n"
        "    print('ACCEPTED')\n"
    )
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run(
        [sys.executable, str(script)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert "REFUSED" in res.stdout, (res.stdout + res.stderr)[-3000:]
