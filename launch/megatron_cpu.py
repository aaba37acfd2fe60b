"""CPU/test-only: run megatron-core (0.16.1, 0.19.2) and Megatron-LM's training loop without CUDA (gloo).

    import megatron_cpu        # this file (launch/), not part of the installed plugin
    megatron_cpu.apply()       # before building megatron-core models; a no-op when CUDA is available
    megatron_cpu.apply_training()   # also Megatron-LM's megatron.training (pretrain_gpt.py)

megatron-core assumes CUDA in a handful of places (device placement, side streams, the RNG
tracker, split sizes of all-to-all); these shims replace those calls by CPU equivalents,
process-wide (they monkeypatch `torch.cuda.*` and a few megatron-core helpers, and keep a
TorchFunctionMode that maps `device="cuda"` to the CPU). For trying the Megatron path on a laptop
and for tests, never for training runs; the plugin never imports this module. Used by the test
suite (megatron-core 0.16.1 and 0.19.2; `tests/megatron_lm_site/sitecustomize.py` for the real
`pretrain_gpt.py`) and `launch/example_megatron.py`.
"""

from __future__ import annotations

import contextlib

import torch

_APPLIED = False


class _FakeStream:
    def __init__(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def record_event(self, *a, **k):
        return _FakeEvent()

    def synchronize(self):
        pass


class _FakeEvent(_FakeStream):
    def record(self, *a, **k):
        pass

    def wait(self, *a, **k):
        pass

    def query(self):
        return True


class _CudaToCpu(torch.overrides.TorchFunctionMode):
    """Maps device='cuda' arguments to the CPU (hard-coded in megatron's optimizer/schedules)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        dev = kwargs.get("device")
        if dev is not None and "cuda" in str(dev):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


_MODE = None


def apply() -> None:
    """Installs the shims (idempotent; a no-op when CUDA is available)."""
    global _APPLIED, _MODE
    if _APPLIED or torch.cuda.is_available():
        return
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.Stream = _FakeStream
    torch.cuda.Event = _FakeEvent
    torch.cuda.current_stream = lambda *a, **k: _FakeStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.cuda.set_device = lambda *a, **k: None
    import typing

    if not hasattr(typing, "override"):  # megatron.training 0.19 imports it from typing (3.12)
        import typing_extensions

        typing.override = typing_extensions.override

    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    moe_utils.te_general_gemm = None  # 0.16.1: NameError when Transformer Engine is missing

    def to_cpu(tensor, as_numpy=False, record_stream=False):
        # Upstream converts only CUDA tensors; CPU split sizes must become numpy too, or
        # all_to_all_single receives tensors for its split lists.
        if torch.is_tensor(tensor):
            tensor = tensor.cpu()
            return tensor.numpy() if as_numpy else tensor
        return tensor

    from megatron.core.tensor_parallel import mappings

    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def gather_uneven(input_, group, output_split_sizes=None, use_global_buffer=False):
        # gloo's all_gather needs equal sizes: pad to the largest split, gather, cut.
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        top = max(output_split_sizes)
        padded = input_.new_zeros((top, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in output_split_sizes]
        torch.distributed.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([p[:n] for p, n in zip(parts, output_split_sizes)])

    def reduce_scatter_uneven(input_, group, input_split_sizes=None, use_global_buffer=False):
        # gloo has no reduce_scatter: all-reduce, keep this rank's split.
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        torch.distributed.all_reduce(total, group=group)
        return torch.split(total, input_split_sizes, dim=0)[group.rank()].contiguous()

    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as transformer_utils

    def causal_mask(sq):
        # device="cuda" upstream; the TorchFunctionMode does not reach code that autograd runs
        # (activation-checkpoint recomputes inside torch.autograd.backward).
        return torch.triu(torch.ones(sq, sq), diagonal=1).bool()

    transformer_utils.get_default_causal_mask = fused_softmax.get_default_causal_mask = causal_mask
    mappings._gather_along_first_dim = gather_uneven
    mappings._reduce_scatter_along_first_dim = reduce_scatter_uneven
    moe_utils.maybe_move_tensor_to_cpu = to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = to_cpu
    _MODE = _CudaToCpu()
    _MODE.__enter__()
    _APPLIED = True


def apply_training() -> None:
    """Also lets Megatron-LM's `megatron.training` (pretrain, initialize) run on the CPU."""
    apply()
    if torch.cuda.is_available():
        return
    from megatron.core.datasets import utils as dataset_utils
    from megatron.training import arguments, initialize, training

    init = initialize.initialize_megatron

    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return init(*args, **kwargs)

    training.initialize_megatron = initialize.initialize_megatron = initialize_megatron

    def one_device(fn):
        # Megatron sets up model-parallel groups and the RNG tracker only when it sees a GPU.
        def wrapped(*args, **kwargs):
            count = torch.cuda.device_count
            torch.cuda.device_count = lambda: 1
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.device_count = count

        return wrapped

    initialize._initialize_distributed = one_device(initialize._initialize_distributed)
    initialize._set_random_seed = one_device(initialize._set_random_seed)
    try:
        import helpers_cpp  # noqa: F401  (built with megatron-core's sdist)

        dataset_utils.compile_helpers = lambda: None
    except ImportError:
        try:
            from megatron.core.datasets import helpers_cpp  # noqa: F401

            dataset_utils.compile_helpers = lambda: None
        except ImportError:
            pass
    if hasattr(initialize, "fused_kernels"):  # 0.16: builds CUDA kernels with nvcc at start-up
        initialize.fused_kernels.load = lambda args: None
    if hasattr(arguments, "get_device_arch_version"):
        arguments.get_device_arch_version = lambda: 0
