import os
import sys

import pytest

# Helper modules (reference, workers) import as top-level modules, also in spawned workers.
sys.path.insert(0, os.path.dirname(__file__))
# launch/megatron_cpu.py: the CPU/test-only megatron shims (not part of the installed plugin).
sys.path.insert(1, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch"))


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default=os.environ.get("DEFAULT_MOE_TEST_DEVICE", "cpu"),
        help="device for the layer tests that take one (cpu here; cuda in launch/device_check.py)",
    )


@pytest.fixture
def device(request):
    import torch

    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(f"--device {name}: no CUDA device")
    return torch.device(name)
