"""Test-only: lets the real Megatron-LM pretrain_gpt.py run on this CPU machine (gloo, no CUDA).

tests/test_megatron_lm.py puts this folder on PYTHONPATH of the torchrun workers it starts, so
Python imports it at start-up (before pretrain_gpt.py); it applies launch/megatron_cpu.py's shims.
Never part of the plugin or of the user's diff. Only in ranks (RANK is set), not in torchrun's
launcher process.
"""

import os
import sys

if os.environ.get("DEFAULT_MOE_MEGATRON_CPU_SHIMS") == "1" and "RANK" in os.environ:
    sys.path.insert(0, os.environ["DEFAULT_MOE_LAUNCH_DIR"])
    import megatron_cpu

    megatron_cpu.apply_training()
