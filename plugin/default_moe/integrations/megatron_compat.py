"""Everything that differs between the megatron-core versions the Megatron adapter supports.

Tested: megatron-core 0.16.1 (what pip resolves on Python 3.11) and 0.19.2 (the current release).
What changed between them, and where the adapter meets it:
- specs: 0.16 builds MoE layers from `ModuleSpec(module=MoELayer, params=..., submodules=...)`;
  0.17+ from `functools.partial(MoELayer, submodules=MoESubmodules(...))` (`build_moe_layer`).
- constructors: 0.17+ pass `is_mtp_layer=` and `name=` to `MoELayer`, and `is_mtp_layer=` to the
  router (`moe_layer_kwargs`, `router_kwargs`).
- where MoE specs come from (`spec_builder_sites`): 0.16 `gpt_layer_specs` calls its own import of
  `get_moe_module_spec_for_backend`; 0.19 also `moe_module_specs` (reached by the experimental
  attention variants, which import it inside a function) and `hybrid_layer_specs`, which builds
  its MoE spec (`moe`) and `hybrid_stack_spec` at import time.
- expert compute: 0.19's `routed_experts_compute` may pass zero-copy output buffers (NCCL-EP) and
  overlap the dispatch backward with the experts' weight gradients; `moe_latent_size` projects the
  experts into a latent space. The adapter needs the experts' raw outputs, so those are refused by
  name (`unsupported_features`).
"""

from __future__ import annotations

import functools
import importlib
import warnings
from typing import Any, Dict, List, Tuple

from megatron.core import parallel_state

try:
    from megatron.core.package_info import __version__ as MCORE_VERSION
except ImportError:  # pragma: no cover - very old megatron-core
    MCORE_VERSION = "0.0.0"

MCORE = tuple(int(p) for p in MCORE_VERSION.split(".")[:2])
TESTED = ("0.16.1", "0.19.2")
NEW_SPECS = MCORE >= (0, 17)  # functools.partial specs, is_mtp_layer/name kwargs


def moe_layer_kwargs(is_mtp_layer: bool, name) -> Dict[str, Any]:
    """The keyword arguments this megatron-core's `MoELayer.__init__` takes beyond 0.16's."""
    return {"is_mtp_layer": is_mtp_layer, "name": name} if NEW_SPECS else {}


def router_kwargs(is_mtp_layer: bool) -> Dict[str, Any]:
    return {"is_mtp_layer": is_mtp_layer} if NEW_SPECS else {}


def build_moe_layer(spec: Any, config, **kwargs):
    """Builds the MoE layer a (patched) MLP spec describes, on either spec form."""
    if isinstance(spec, functools.partial):
        return spec(config=config, **kwargs)
    return spec.module(config, spec.submodules, **spec.params, **kwargs)


def moe_spec_class(spec: Any):
    """The class a MoE spec builds (`ModuleSpec.module` or `partial.func`)."""
    return spec.func if isinstance(spec, functools.partial) else spec.module


def spec_builder_sites() -> List[Tuple[Any, str]]:
    """(module, attribute) pairs holding the MoE spec builder that GPT/hybrid layer specs call."""
    from megatron.core.models.gpt import gpt_layer_specs

    sites = [(gpt_layer_specs, "get_moe_module_spec_for_backend")]
    try:
        moe_specs = importlib.import_module("megatron.core.models.gpt.moe_module_specs")
    except ImportError:
        moe_specs = None
    if moe_specs is not None and moe_specs is not gpt_layer_specs and hasattr(moe_specs, "get_moe_module_spec_for_backend"):
        sites.append((moe_specs, "get_moe_module_spec_for_backend"))
    return sites


def prebuilt_spec_sites() -> List[Tuple[Any, str]]:
    """(module, attribute) pairs of MoE-containing specs megatron-core builds at import time
    (0.19: `hybrid_layer_specs.moe` and `hybrid_stack_spec`); patched in place by `install`."""
    try:
        hybrid = importlib.import_module("megatron.core.models.hybrid.hybrid_layer_specs")
    except ImportError:  # 0.16 has no hybrid layer specs
        return []
    except Exception as exc:  # pragma: no cover - optional dependencies of the hybrid stack
        # Not patched; a hybrid model built anyway is refused by install()'s MoELayer guard.
        warnings.warn(
            f"default-moe: megatron-core's hybrid_layer_specs did not import ({exc}); hybrid MoE specs are not patched",
            stacklevel=2,
        )
        return []
    return [(hybrid, name) for name in ("moe", "hybrid_stack_spec", "_hybrid_mtp_block_spec") if hasattr(hybrid, name)]


def model_classes() -> List[type]:
    """The model classes whose forward receives the input ids (token-id routers read them)."""
    from megatron.core.models.gpt import GPTModel

    classes = [GPTModel]
    try:
        from megatron.core.models.hybrid.hybrid_model import HybridModel

        classes.append(HybridModel)
    except ImportError:
        pass
    return classes


def stage_group():
    """All ranks of this pipeline stage (tensor x context x data parallel = expert-TP x EP x expert-DP).

    Every token of the stage's micro-batch is on exactly one rank of it, and each (token, expert)
    pair is computed by exactly one expert-TP group of it, so summing per-expert statistics over
    this group counts every routed token once (partial sums over expert-TP add up).
    """
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError(
            "Default MoE in megatron-core needs megatron's parallel state "
            "(megatron.core.parallel_state.initialize_model_parallel) to find the EMA's reduction group"
        )
    return parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)


def unsupported_features(config) -> List[str]:
    """Megatron-core features whose expert path the Default MoE layer cannot reproduce."""
    problems = []
    if getattr(config, "moe_latent_size", None):
        problems.append("moe_latent_size (experts in a latent space: the defaults would be latent vectors)")
    if getattr(config, "overlap_dispatch_backward_with_experts_wgrad", False):
        problems.append("overlap_dispatch_backward_with_experts_wgrad")
    if getattr(config, "transformer_impl", None) == "inference_optimized":
        problems.append("transformer_impl='inference_optimized' (inference dispatcher and router)")
    return problems


def cuda_graph_problems(config) -> List[str]:
    """CUDA-graph settings whose captured region includes the MoE router (0.16: enable_cuda_graph,
    external_cuda_graph, cuda_graph_impl; 0.19 adds 'full_iteration'): the router's dense softmax
    would be a graph output without autograd. Attention-only scopes are fine."""
    impl = getattr(config, "cuda_graph_impl", "none")
    on = (
        impl not in (None, "none") or getattr(config, "enable_cuda_graph", False) or getattr(config, "external_cuda_graph", False)
    )
    if not on:
        return []
    scope = getattr(config, "cuda_graph_scope", None)
    scopes = [getattr(s, "name", s) for s in (scope if isinstance(scope, (list, tuple)) else [scope])]
    scopes = [str(s).lower() for s in scopes if s is not None]
    if impl != "full_iteration" and scopes and all(s in ("attn",) for s in scopes):
        return []
    return [
        f"CUDA graphs over the router (cuda_graph_impl={impl!r}, cuda_graph_scope={scope!r}; an 'attn'-only scope is allowed)"
    ]


def expert_buffers(token_dispatcher) -> bool:
    """Whether the dispatcher hands the experts zero-copy output buffers (0.19 NCCL-EP)."""
    get = getattr(token_dispatcher, "get_expert_zero_copy_buffers", None)
    return get is not None and any(b is not None for b in get())


def moe_spec_kwargs(spec: Any) -> Dict[str, Any]:
    """The constructor keyword arguments a MoE spec carries (`ModuleSpec.params` or `partial.keywords`)."""
    return dict(spec.keywords) if isinstance(spec, functools.partial) else dict(spec.params)


def moe_spec_submodules(spec: Any):
    """The `MoESubmodules` of a MoE spec, on either spec form."""
    return spec.keywords["submodules"] if isinstance(spec, functools.partial) else spec.submodules


# The top-k selection before megatron-core drops routes over capacity. Both versions call
# `apply_router_token_dropping` through the name `router.py` imported, with the pre-drop map as
# its second argument; a renormalised gate's default term needs that selection (its Z counts the
# dropped experts). Recorded per thread; read and cleared by the router that asked.
_PRE_DROP = __import__("threading").local()


def _install_pre_drop_capture() -> None:
    from megatron.core.transformer.moe import router as router_module

    original = router_module.apply_router_token_dropping
    if getattr(original, "_default_moe_capture", False):
        return

    @functools.wraps(original)
    def capture(routing_probs, routing_map, *args, **kwargs):
        _PRE_DROP.map = routing_map
        return original(routing_probs, routing_map, *args, **kwargs)

    capture._default_moe_capture = True
    router_module.apply_router_token_dropping = capture


def take_pre_drop_map():
    """The [T, E] bool selection before capacity drops of the routing that just ran on this
    thread (None when nothing was dropped-checked: dropless)."""
    m = getattr(_PRE_DROP, "map", None)
    _PRE_DROP.map = None
    return m


_install_pre_drop_capture()
