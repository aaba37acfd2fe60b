"""torchtitan's trainer on CPU with gloo: for the tests only (the plugin never imports this).

    torchrun --nproc_per_node 2 launch/torchtitan_cpu.py --module M --config F [torchtitan flags...]

torchtitan 0.3.0 targets CUDA and a newer torch than 2.13; the shims below are the ones measured
in ../shared/notes/torchtitan_cpu.md, each for one failure:
- device: `torchtitan.tools.utils.device_type/device_module` -> "cpu" and a CPU module with the
  memory-monitor calls (the trainer then picks gloo);
- FSDP2's gradient reduce-scatter uses PREMUL_SUM, which gloo lacks: force SUM + a local divide;
- `torch.distributed.set_timeout` (newer torch) -> `distributed_c10d._set_pg_timeout`;
- FlexAttention has no CPU backward: `cpu_attention` (an override passed with
  `--override.imports`) computes the same masked attention with SDPA from the block mask's
  `mask_mod`;
- `--parallelism.spmd-backend partial_dtensor` (the default spmd_types backend needs a newer torch);
- the block masks are built without torch.compile (the CPU attention reads only their mask_mod).
"""

from __future__ import annotations

import sys
import types

import torch


def _cpu_device_module() -> types.ModuleType:
    mod = types.ModuleType("cpu_device_module")
    mod.set_device = lambda device: None
    mod.current_device = lambda: 0
    mod.device_count = lambda: 1
    mod.get_device_name = lambda device=None: "cpu"
    mod.get_device_properties = lambda device=None: types.SimpleNamespace(total_memory=1 << 40)
    mod.memory_stats = lambda device=None: {}
    mod.reset_peak_memory_stats = lambda device=None: None
    mod.empty_cache = lambda: None
    mod.synchronize = lambda device=None: None
    mod.is_available = lambda: True
    mod.manual_seed = torch.manual_seed
    mod.manual_seed_all = torch.manual_seed
    return mod


def apply() -> None:
    """Applies the CPU shims (idempotent); call before importing torchtitan.train."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d
    from torch.distributed.fsdp import FSDPModule

    import torchtitan.tools.utils as tu

    tu.device_type, tu.device_module = "cpu", _cpu_device_module()
    if not hasattr(dist, "set_timeout"):
        dist.set_timeout = lambda timeout, group=None: distributed_c10d._set_pg_timeout(timeout, group)
    original = FSDPModule.set_gradient_divide_factor
    if not getattr(original, "_cpu_shim", False):

        def set_gradient_divide_factor(self, factor):
            original(self, factor)
            self.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM

        set_gradient_divide_factor._cpu_shim = True
        FSDPModule.set_gradient_divide_factor = set_gradient_divide_factor


def _plain_block_masks() -> None:
    """The CPU attention only reads the block mask's mask_mod: build it without torch.compile
    (compiling create_block_mask cost ~10 s per run here)."""
    from torch.nn.attention.flex_attention import create_block_mask

    from torchtitan.models.common import attention

    attention._compiled_create_block_mask = create_block_mask


def _flex_cpu_class():
    from dataclasses import dataclass

    import torch.nn.functional as F

    from torchtitan.models.common.attention import FlexAttention

    class CPUFlexAttention(FlexAttention):
        """FlexAttention's math with SDPA and the dense mask of the block mask (CPU backward)."""

        @dataclass(kw_only=True, slots=True)
        class Config(FlexAttention.Config):
            pass

        def forward(
            self,
            q_BLNH,
            k_BLNH,
            v_BLNH,
            *,
            attention_masks,
            score_mod=None,
            scale=None,
            enable_gqa=False,
            out_transform=None,
            **kwargs,
        ):
            assert score_mod is None and out_transform is None, "the CPU attention shim covers masks only"
            B, L, N, _ = q_BLNH.shape
            S = k_BLNH.shape[1]
            dev = q_BLNH.device
            b = torch.arange(B, device=dev)[:, None, None, None]
            h = torch.zeros(1, device=dev, dtype=torch.long)[None, :, None, None]
            qi = torch.arange(L, device=dev)[None, None, :, None]
            ki = torch.arange(S, device=dev)[None, None, None, :]
            mask = attention_masks.mask_mod(b, h, qi, ki).expand(B, 1, L, S)
            out = F.scaled_dot_product_attention(
                q_BLNH.transpose(1, 2),
                k_BLNH.transpose(1, 2),
                v_BLNH.transpose(1, 2),
                attn_mask=mask,
                scale=scale,
                enable_gqa=enable_gqa,
            )
            return out.transpose(1, 2)

    return CPUFlexAttention


def _register_cpu_attention():
    from torchtitan.config import derive, override
    from torchtitan.models.common.attention import FlexAttention

    cls = _flex_cpu_class()

    @override(target=FlexAttention.Config, description="CPU tests: FlexAttention via SDPA + dense mask")
    def cpu_attention(cfg):
        return derive(cfg, cls.Config)

    return cpu_attention


if __name__ != "__main__":
    # Importable as `torchtitan_cpu.cpu_attention` for --override.imports (launch/ on sys.path).
    try:
        apply()  # before torchtitan modules read tools.utils.device_type at import
        cpu_attention = _register_cpu_attention()
        _plain_block_masks()
    except ImportError:  # torchtitan not installed
        pass


def main() -> None:
    apply()
    argv = sys.argv[1:]
    if not any(a.startswith("--parallelism.spmd-backend") or a.startswith("--parallelism.spmd_backend") for a in argv):
        argv = ["--parallelism.spmd-backend", "partial_dtensor"] + argv  # before any subcommand
    sys.argv = [sys.argv[0]] + argv
    from torchtitan.train import main as train_main

    train_main()


if __name__ == "__main__":
    main()
