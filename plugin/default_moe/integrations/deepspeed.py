"""DeepSpeed integration: the `"default_moe"` config section.

    engine, optimizer, _, _ = default_moe.deepspeed.initialize(model=model, config="ds.json", ...)

or, for scripts that should change by one line, `import default_moe.deepspeed` before calling
`deepspeed.initialize` (importing registers the hook; `register()` does it explicitly).

With `"default_moe": {"enabled": true, ...}` every `default_moe.MoELayer` of the model is
reconfigured from the section (router, top_k, beta, ep_size, ...), its experts are
sharded over DeepSpeed's expert-parallel group `ep_size_N`, its expert parameters get DeepSpeed's
MoE tags (reduced over the expert-data-parallel group, MoE optimizer param groups), and the
engine is made aware that the model has MoE layers. Without the section, or with
`"enabled": false`, this is exactly `deepspeed.initialize`.
"""

from __future__ import annotations

import contextlib
import functools
import dataclasses
import json
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from default_moe.config import LEGACY_FIELDS, MoEConfig, check_overrides
from default_moe import manifest
from default_moe.defaults import commit_defaults
from default_moe.step_state import discard_pending, step_states_in
from default_moe.checkpoint import (  # noqa: F401 (EXPERT_FILE, DEFAULTS_FILE: re-exported)
    DEFAULTS_FILE,
    EXPERT_FILE,
    UNIVERSAL_EP_REFUSAL,
    check_deepspeed_files,
    latest_tag,
    load_deepspeed_file,
    saved_ep_sizes,
)
from default_moe.experts import upgrade_expert_state_dict
from default_moe.layer import MoELayer
from default_moe.losses import AuxLossAutoScaler
from default_moe.parallel import ParallelGroups, check_ep_size

SECTION = "default_moe"
# Section keys that set MoEConfig fields; structural fields (sizes, activation) come from the model.
SECTION_FIELDS = (
    "router",
    "top_k",
    "beta",
    "ema_weighting",
    "normalize_topk",
    "ep_size",
    "capacity_factor",
    "drop_policy",
    "aux_loss_coeff",
    "z_loss_coeff",
    "sparsemixer",
    "stablemoe",
    "ema_stats_dtype",
    "nonfinite",
    "default_in_forward",
    "stale_defaults",
    "experts_backend",
    "score_function",
    "route_scale",
    "expert_bias",
    "expert_bias_update_rate",
    "num_expert_groups",
    "group_topk",
)

_ORIGINAL_INITIALIZE = None


@dataclasses.dataclass
class DeepSpeedMoESection:
    """The validated `"default_moe"` section of a DeepSpeed config."""

    enabled: bool = False
    overrides: Dict[str, Any] = dataclasses.field(default_factory=dict)
    # "checkpoint": {"keep_last": N}: complete checkpoints kept by save_checkpoint (0: all).
    keep_last: int = 0

    @classmethod
    def from_ds_config(cls, ds_config: Optional[Dict[str, Any]]) -> "DeepSpeedMoESection":
        section = (ds_config or {}).get(SECTION)
        if section is None:
            return cls(enabled=False)
        if not isinstance(section, dict):
            raise ValueError(f'DeepSpeed config "{SECTION}" must be an object, got {type(section).__name__}')
        allowed = ("enabled", "checkpoint") + SECTION_FIELDS + tuple(LEGACY_FIELDS)  # removed fields: warned, ignored
        unknown = sorted(set(section) - set(allowed))
        if unknown:
            raise ValueError(f'unknown key(s) {unknown} in DeepSpeed config "{SECTION}"; allowed keys: {list(allowed)}')
        enabled = section.get("enabled", True)
        if not isinstance(enabled, bool):
            raise ValueError(f'DeepSpeed config "{SECTION}.enabled" must be true or false, got {enabled!r}')
        ckpt = section.get("checkpoint", {})
        if not isinstance(ckpt, dict) or set(ckpt) - {"keep_last"}:
            raise ValueError(
                f'DeepSpeed config "{SECTION}.checkpoint" must be an object with the key "keep_last" only, got {ckpt!r}'
            )
        keep_last = ckpt.get("keep_last", 0)
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
            raise ValueError(
                f'DeepSpeed config "{SECTION}.checkpoint.keep_last" must be an integer >= 0 '
                f"(0 keeps every checkpoint), got {keep_last!r}"
            )
        overrides = {k: v for k, v in section.items() if k not in ("enabled", "checkpoint")}
        try:
            check_overrides(overrides)  # sizes come from the model; this names bad fields early
        except ValueError as e:
            raise ValueError(f'DeepSpeed config "{SECTION}": {e}') from None
        return cls(enabled=enabled, overrides=overrides, keep_last=keep_last)

    def config_for(self, layer_config: MoEConfig) -> MoEConfig:
        try:
            return dataclasses.replace(layer_config, **self.overrides)
        except ValueError as e:
            raise ValueError(f'DeepSpeed config "{SECTION}": {e}') from None


def _read_ds_config(args: Any, config: Any, config_params: Any) -> Optional[Dict[str, Any]]:
    """The config dict DeepSpeed will use: `config`, `config_params` or `args.deepspeed_config`."""
    cfg = config if config is not None else config_params
    if cfg is None and args is not None:
        cfg = getattr(args, "deepspeed_config", None)
    if cfg is None:
        return None
    if isinstance(cfg, (str, os.PathLike)):
        with open(cfg) as f:
            return json.load(f)
    if isinstance(cfg, dict):
        return cfg
    return None


def _fill_stablemoe_vocab(ds_config, model):
    """StableMoE's distilled router needs the vocabulary size: take it from a HF model's config
    when the section does not give it."""
    sec = (ds_config or {}).get(SECTION)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(sec, dict) or sec.get("router") != "stablemoe" or not isinstance(vocab, int):
        return ds_config
    sm = sec.get("stablemoe") or {}
    if not isinstance(sm, dict) or "vocab_size" in sm:
        return ds_config
    return {**ds_config, SECTION: {**sec, "stablemoe": {**sm, "vocab_size": vocab}}}


def skip_cpu_jit_builds() -> None:
    """On CPU, stop DeepSpeed from JIT-compiling its shared-memory comm op at init (minutes on 2
    cores, behind a lock file in ~/.cache/torch_extensions that a killed build leaves for every
    later run to wait on with no bound). Applied by `import default_moe.deepspeed` (so a
    `deepspeed.init_distributed()` after it, or accelerate's, builds nothing), by our `initialize`,
    and when a MoE layer is built while DeepSpeed is imported (the HF Trainer path). DeepSpeed then
    uses torch.distributed's collectives, as it does when the op is not available."""
    if torch.cuda.is_available():
        return
    import deepspeed.comm.torch  # noqa: F401  (the module object is only reachable via sys.modules)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def _deepspeed_groups(ep_size: int) -> ParallelGroups:
    from deepspeed.utils import groups

    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return ParallelGroups(
        ep_group=groups._get_expert_parallel_group(name),
        expert_dp_group=groups._get_expert_data_parallel_group(name),
        dp_group=groups._get_data_parallel_group(),
    )


def _moe_layers(model: torch.nn.Module) -> List[Tuple[str, MoELayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoELayer)]


def _live_parameters(model_parameters, model: torch.nn.Module, optimizer):
    """`model_parameters` after reconfiguration: a router of another kind has new parameters."""
    live = [p for p in model.parameters()]
    live_ids = {id(p) for p in live}

    def params_of(items):
        return [q for it in items for q in (it["params"] if isinstance(it, dict) else [it])]

    if isinstance(optimizer, torch.optim.Optimizer):
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
        if missing:
            raise ValueError(
                f'DeepSpeed config "{SECTION}": the router changed kind and its new parameters {missing[:4]} are not in '
                "the optimizer you passed; build the optimizer after initialize, or let DeepSpeed build it from the config"
            )
    if model_parameters is None:
        return None
    items = list(model_parameters)
    if all(id(p) in live_ids for p in params_of(items)) and {id(p) for p in params_of(items)} >= {
        id(p) for p in live if p.requires_grad
    }:
        return items
    if all(isinstance(it, torch.Tensor) for it in items):
        return [p for p in live if p.requires_grad]
    raise ValueError(
        f'DeepSpeed config "{SECTION}": the router changed kind, so the parameter groups passed as model_parameters '
        "no longer match the model; pass model.parameters() or build the groups after initialize"
    )


def _deepspeed_moe_layers(model: torch.nn.Module) -> list:
    from deepspeed.moe.layer import MoE

    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoE)]


def _tag_expert_params(layer: MoELayer) -> None:
    for p in layer.experts.parameters():
        p.allreduce = False
        p.group_name = f"ep_size_{layer.config.ep_size}"


def _split_optimizer_groups(optimizer: torch.optim.Optimizer) -> None:
    """Gives an optimizer built before initialize DeepSpeed's MoE param groups (in place)."""
    from deepspeed.moe.utils import is_moe_param_group, split_params_into_different_moe_groups_for_optimizer

    if any(is_moe_param_group(g) for g in optimizer.param_groups):
        return
    named = [{"name": f"group{i}", **g} for i, g in enumerate(optimizer.param_groups)]
    groups = split_params_into_different_moe_groups_for_optimizer(named)
    optimizer.param_groups = groups


@contextlib.contextmanager
def _engine_sees_our_layers():
    """While the engine is built, its `isinstance(module, MoE)` also matches our layers.

    The engine decides from that check whether the model has MoE layers (expert gradient
    reduction over expert-DP groups, MoE optimizer groups, ZeRO's expert partitions). The
    checkpoint code keeps the original check (our experts are saved by `_save_experts`).
    """
    import deepspeed.runtime.engine as engine_mod

    native = engine_mod.MoE

    class _Match(type):
        def __instancecheck__(cls, obj):
            return isinstance(obj, (native, MoELayer))

    class MoEOrDefaultMoE(metaclass=_Match):
        pass

    engine_mod.MoE = MoEOrDefaultMoE
    try:
        yield
    finally:
        engine_mod.MoE = native


def _expert_state(model) -> Dict[str, Dict[str, torch.Tensor]]:
    return {
        name: {n: p.detach().cpu().clone() for n, p in layer.experts.named_parameters()} for name, layer in _moe_layers(model)
    }


def _defaults_buffers(model) -> Dict[str, torch.Tensor]:
    return {n: b for n, b in model.named_buffers() if n.endswith("defaults_ED")}


def _install_common_hooks(engine) -> None:
    """For every engine our initialize builds with the section on (own layers, DeepSpeed-MoE,
    AutoEP, HF blocks): D in its own checkpoint file, and the aux-loss gradient scale.

    D is in the module state too, but a state filter can drop it on the way (DeepSpeed's non-MoE
    filter drops every key containing "expert" under a native MoE module, so a module named e.g.
    `expert_block` loses its D); `default_moe_defaults.pt` beside DeepSpeed's files keeps it and
    tells the two cases apart on load: the file present = written with Default MoE (D restored
    from it, a missing layer refused by name); absent = written before Default MoE was switched
    on (zeros, warned by each layer)."""
    save, load, backward, step = engine.save_checkpoint, engine.load_checkpoint, engine.backward, engine.step
    # The step contract: D is committed at the engine's optimizer step (the accumulation
    # boundary), over each layer's group; the process-wide torch-optimizer hook leaves these
    # layers alone (DeepSpeed's optimizer holds flat copies of the parameters, or none of ours).
    for state in step_states_in(engine.module):  # D and the expert bias
        state.committed_by = "deepspeed"

    def save_checkpoint(save_dir, tag=None, client_state=None, save_latest=True, **kw):
        tag = tag if tag is not None else f"global_step{engine.global_steps}"
        out = save(save_dir, tag=tag, client_state={} if client_state is None else client_state, save_latest=save_latest, **kw)
        if dist.get_rank() == 0:  # D is identical on every rank
            path = os.path.join(save_dir, str(tag), DEFAULTS_FILE)
            torch.save({n: b.detach().cpu().clone() for n, b in _defaults_buffers(engine.module).items()}, path + ".tmp")
            os.replace(path + ".tmp", path)
        dist.barrier()
        return out

    def load_checkpoint(load_dir, tag=None, **kw):
        # DeepSpeed unpickles its files without restriction: check every file it may read first
        # (nothing unpickled; `latest_universal` when it loads universal checkpoints), and have its
        # checkpoint engine load with the weights-only unpickler and DeepSpeed's allow-list, so a
        # file swapped after the check cannot run code either.
        universal = bool(getattr(engine, "load_universal_checkpoint", lambda: False)())
        named = tag if tag is not None else latest_tag(load_dir, universal=universal)
        if named is not None and os.path.isdir(os.path.join(load_dir, str(named))):
            check_deepspeed_files(os.path.join(load_dir, str(named)))
        ckpt_engine = getattr(engine, "checkpoint_engine", None)
        original_load = getattr(ckpt_engine, "load", None)
        if original_load is not None and type(ckpt_engine).__name__ == "TorchCheckpointEngine":
            ckpt_engine.load = lambda path, map_location=None: load_deepspeed_file(path, map_location)
        try:
            load_path, client_state = load(load_dir, tag=tag, **kw)
        finally:
            if original_load is not None and "load" in vars(ckpt_engine):
                del ckpt_engine.load
        if load_path is None:
            return load_path, client_state
        path = os.path.join(load_dir, str(named), DEFAULTS_FILE)
        if os.path.exists(path):
            saved = torch.load(path, map_location="cpu", weights_only=True)
            mine = _defaults_buffers(engine.module)
            missing = sorted(set(mine) - set(saved))
            if missing:
                raise ValueError(f"{path} has no defaults for {missing[:4]}: the checkpoint's MoE layers differ from the model's")
            with torch.no_grad():
                for n, buf in mine.items():
                    buf.copy_(saved[n])
        return load_path, client_state

    def backward_with_aux_scale(loss, *args, **kw):
        # The aux losses enter backward through the layer outputs, outside the engine's loss
        # scaling: give them the same 1/gradient_accumulation_steps (and fp16 loss scale).
        scale = 1.0 / engine.gradient_accumulation_steps()
        loss_scaler = getattr(engine.optimizer, "cur_scale", None)
        if engine.fp16_enabled() and loss_scaler is not None:
            scale *= float(loss_scaler)
        AuxLossAutoScaler.set_loss_scale(scale)
        return backward(loss, *args, **kw)

    def after_model_step(applied: bool) -> None:
        # After the step, as the torch-optimizer hook: a step DeepSpeed skipped (fp16 overflow,
        # agreed over its groups) did not happen, so its statistics are dropped, not committed.
        if applied:
            commit_defaults(engine.module)
        else:
            discard_pending(step_states_in(engine.module))

    engine.save_checkpoint = save_checkpoint
    engine.load_checkpoint = load_checkpoint
    engine.backward = backward_with_aux_scale
    _hook_model_step(engine, step, after_model_step)


def _hook_model_step(engine, step, after: Callable[[bool], None]) -> None:
    """Runs `after(applied)` once per optimizer step the engine takes. The seam is DeepSpeed's
    private `_take_model_step` (0.19): `engine.step()` calls it at the accumulation boundary, and
    so does the pipeline engine's `train_batch()`, which never calls `step()`. An engine without
    it gets `step` wrapped at the boundary (then `train_batch` would not commit)."""
    take = getattr(engine, "_take_model_step", None)
    if callable(take):

        def take_model_step_then(*args, **kw):
            scale = _z0_scale(engine)
            out = take(*args, **kw)
            after(_step_applied(engine, scale))
            return out

        engine._take_model_step = take_model_step_then
        return

    def step_then(*args, **kw):
        boundary = engine.is_gradient_accumulation_boundary()
        scale = _z0_scale(engine) if boundary else None
        out = step(*args, **kw)
        if boundary:
            after(_step_applied(engine, scale))
        return out

    engine.step = step_then


def _z0_scale(engine) -> Optional[float]:
    """The loss scale of DeepSpeed's own torch GradScaler (`torch_autocast` fp16 at ZeRO 0), if any."""
    scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
    return scaler.get_scale() if scaler is not None and scaler.is_enabled() else None


def _step_applied(engine, scale_before: Optional[float]) -> bool:
    """`engine.was_step_applied()`, except under DeepSpeed's torch-autocast fp16 scaler (ZeRO 0):
    it skips without setting the optimizer's `overflow`, so DeepSpeed reports the step applied;
    its backoff is the skip. Agreed over all ranks (max), so every rank commits or drops alike."""
    applied = engine.was_step_applied()
    if scale_before is None:
        return applied
    from default_moe.amp import agree_found_inf

    skipped = torch.tensor(float(engine.torch_autocast_z0_gradscaler.get_scale() < scale_before or not applied))
    return not bool(agree_found_inf([skipped], [None]) > 0)


def _install_engine_hooks(engine) -> None:
    """Checkpoint save/load of this rank's experts (our own MoE layers)."""
    model = engine.module
    layers = _moe_layers(model)
    ep_size = layers[0][1].config.ep_size
    ep_rank = layers[0][1].groups.ep_rank
    expert_dp_rank = dist.get_rank(layers[0][1].groups.expert_dp_group) if layers[0][1].groups.expert_dp_size > 1 else 0
    save, load = engine.save_checkpoint, engine.load_checkpoint

    def save_checkpoint(save_dir, tag=None, client_state=None, save_latest=True, **kw):
        tag = tag if tag is not None else f"global_step{engine.global_steps}"
        out = save(save_dir, tag=tag, client_state={} if client_state is None else client_state, save_latest=save_latest, **kw)
        # DeepSpeed writes the module state from DP rank 0 only: every EP rank adds its experts.
        if expert_dp_rank == 0:
            path = os.path.join(save_dir, str(tag), EXPERT_FILE.format(ep_size=ep_size, ep_rank=ep_rank))
            tmp = path + ".tmp"
            torch.save(
                {
                    "ep_size": ep_size,
                    "ep_rank": ep_rank,
                    "experts": _expert_state(model),
                    "moe_configs": {name: layer.config.to_dict() for name, layer in layers},
                },
                tmp,
            )
            os.replace(tmp, path)
        dist.barrier()
        return out

    def load_checkpoint(load_dir, tag=None, **kw):
        load_path, client_state = load(load_dir, tag=tag, **kw)
        if load_path is None:
            return load_path, client_state
        ckpt_dir = os.path.dirname(load_path)
        path = os.path.join(ckpt_dir, EXPERT_FILE.format(ep_size=ep_size, ep_rank=ep_rank))
        if not os.path.exists(path):
            universal = bool(getattr(engine, "load_universal_checkpoint", lambda: False)())
            if universal and not saved_ep_sizes(ckpt_dir):
                raise FileNotFoundError(
                    f"{path} is missing: DeepSpeed's ds_to_universal does not carry default_moe's expert and D files. "
                    "Convert with `default-moe to-universal CKPT_DIR --tag TAG` (it runs ds_to_universal and carries them), "
                    f"or copy default_moe_*.pt from the source tag folder into {ckpt_dir}"
                )
            if universal:
                raise FileNotFoundError(
                    f"{path} is missing: the checkpoint holds experts at ep_size={saved_ep_sizes(ckpt_dir) or '?'}, this "
                    f"model runs ep_size={ep_size}. " + UNIVERSAL_EP_REFUSAL
                )
            raise FileNotFoundError(f"{path} is missing: the checkpoint was not written by default_moe at ep_size={ep_size}")
        saved = torch.load(path, map_location="cpu", weights_only=True)["experts"]
        with torch.no_grad():
            for name, layer in layers:
                upgrade_expert_state_dict(saved[name], "")  # files written with separate w1/w3
                for n, p in layer.experts.named_parameters():
                    p.copy_(saved[name][n])
        return load_path, client_state

    engine.save_checkpoint = save_checkpoint
    engine.load_checkpoint = load_checkpoint


def _install_commit_protocol(engine, keep_last: int) -> None:
    """The outermost checkpoint hooks: saves are committed (`default_moe.manifest`: every rank's
    files, a barrier, the manifest, then `latest`; DeepSpeed is asked not to write `latest` itself,
    since it would point at the tag before our files exist), and a load without a tag takes the
    newest complete checkpoint, a named torn one refused. Universal checkpoints (made offline by
    DeepSpeed's converter, no manifest) are loaded from `latest_universal` as DeepSpeed does."""
    save, load = engine.save_checkpoint, engine.load_checkpoint

    def save_checkpoint(save_dir, tag=None, client_state=None, save_latest=True, **kw):
        tag = tag if tag is not None else f"global_step{engine.global_steps}"
        if dist.get_rank() == 0:
            os.makedirs(save_dir, exist_ok=True)
        out = save(save_dir, tag=tag, client_state={} if client_state is None else client_state, save_latest=False, **kw)
        layout = {
            "world_size": dist.get_world_size(),
            "ep_size": _ep_size_of(engine.module),
            "zero_stage": engine.zero_optimization_stage(),
        }
        manifest.commit(save_dir, str(tag), step=engine.global_steps, layout=layout, keep_last=keep_last, save_latest=save_latest)
        return out

    def load_checkpoint(load_dir, tag=None, **kw):
        if bool(getattr(engine, "load_universal_checkpoint", lambda: False)()):
            return load(load_dir, tag=tag, **kw)
        tag = manifest.resolve_tag(load_dir, tag, collective=True)
        if tag is None:
            return None, None  # DeepSpeed's answer for a folder without a checkpoint
        return load(load_dir, tag=tag, **kw)

    engine.save_checkpoint = save_checkpoint
    engine.load_checkpoint = load_checkpoint


def _ep_size_of(model) -> int:
    layers = _moe_layers(model)
    return layers[0][1].config.ep_size if layers else 1


def initialize(args=None, model=None, optimizer=None, model_parameters=None, *rest, **kwargs):
    """Drop-in for `deepspeed.initialize` (same arguments, same return value) honouring the
    `"default_moe"` section of the DeepSpeed config."""
    import deepspeed

    original = _ORIGINAL_INITIALIZE or deepspeed.initialize
    ds_config = _read_ds_config(args, kwargs.get("config"), kwargs.get("config_params"))
    ds_config = _fill_stablemoe_vocab(ds_config, model)
    section = DeepSpeedMoESection.from_ds_config(ds_config)
    install_section_guard()
    if not section.enabled or model is None:
        return original(args, model, optimizer, model_parameters, *rest, **kwargs)

    from default_moe.integrations import autoep, deepspeed_moe, hf

    layers = _moe_layers(model)
    ds_layers = _deepspeed_moe_layers(model)
    use_autoep = bool((ds_config.get("expert_parallel") or {}).get("enabled", False))
    if not layers and not ds_layers and not use_autoep:
        hf_blocks = hf.moe_blocks(model)  # refuses unsupported HF MoE blocks by name
        if not hf_blocks:
            raise ValueError(
                f'DeepSpeed config "{SECTION}" is enabled but the model has no default_moe.MoELayer, '
                f"no deepspeed.moe.layer.MoE, no supported HuggingFace MoE block ({sorted(hf.FAMILIES)}), "
                'and "expert_parallel" (AutoEP) is not enabled'
            )
        return _initialize_hf(original, section, args, model, optimizer, model_parameters, *rest, **kwargs)
    # Validate every layer's new config before anything is built or changed.
    new_configs = [section.config_for(layer.config) for _, layer in layers]
    ds_configs = [deepspeed_moe.layer_config(m, section.overrides) for _, m in ds_layers]
    autoep_settings = None
    if use_autoep:
        if layers or ds_layers:
            raise ValueError(f'DeepSpeed config "{SECTION}": AutoEP models cannot also hold default_moe or DeepSpeed MoE layers')
        try:
            autoep_settings = autoep.check_section(section.overrides)
        except ValueError as e:
            raise ValueError(f'DeepSpeed config "{SECTION}": {e}') from None
    ep_size = 1
    if layers:
        ep_sizes = {c.ep_size for c in new_configs}
        if len(ep_sizes) != 1:
            raise ValueError(f'DeepSpeed config "{SECTION}": all MoE layers must share one ep_size, got {sorted(ep_sizes)}')
        ep_size = ep_sizes.pop()
        world = int(os.environ.get("WORLD_SIZE", dist.get_world_size() if dist.is_initialized() else 1))
        try:
            check_ep_size(ep_size, world)
        except ValueError as e:
            raise ValueError(f'DeepSpeed config "{SECTION}": {e}') from None
    stages = getattr(model, "num_stages", 1) if type(model).__name__ == "PipelineModule" else 1
    if stages > 1:
        # Each stage holds other MoE layers while the statistics are summed over DeepSpeed's
        # data-parallel group: not built or tested (a 2-stage run timed out in a collective).
        raise ValueError(
            f'DeepSpeed config "{SECTION}": a PipelineModule with num_stages={stages} is not supported with default_moe '
            "layers; use num_stages=1 (train_batch then commits D at each step), or Megatron's pipeline schedules"
        )
    zero_stage = (ds_config.get("zero_optimization") or {}).get("stage", 0)
    if zero_stage == 3:
        raise ValueError(
            f'DeepSpeed config "{SECTION}": ZeRO stage 3 is not supported with default_moe layers; use stage 0, 1 or 2'
        )

    token_routers = ("hash", "stablemoe")
    if section.overrides.get("router") in token_routers and (ds_layers or use_autoep):
        # The engines' own MoE blocks do not receive input ids: record them at the model's input.
        from default_moe.token_context import capture_token_ids

        capture_token_ids(model)
    skip_cpu_jit_builds()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    for (_, moe), cfg in zip(ds_layers, ds_configs):
        deepspeed_moe.convert(moe, cfg)  # DeepSpeed's engine wires its groups as usual
    if layers:
        groups = _deepspeed_groups(ep_size)
        for (_, layer), cfg in zip(layers, new_configs):
            layer.reconfigure(cfg, groups)
            _tag_expert_params(layer)
    model_parameters = _live_parameters(model_parameters, model, optimizer)
    if isinstance(optimizer, torch.optim.Optimizer):
        _split_optimizer_groups(optimizer)
    autoep_ctx = autoep.building_with(autoep_settings) if use_autoep else contextlib.nullcontext()
    _INSIDE_OURS[0] += 1
    try:
        with _engine_sees_our_layers(), autoep_ctx:
            result = original(args, model, optimizer, model_parameters, *rest, **kwargs)
    finally:
        _INSIDE_OURS[0] -= 1
    if layers:
        _install_engine_hooks(result[0])
    _install_common_hooks(result[0])
    _install_commit_protocol(result[0], section.keep_last)
    return result


_INSIDE_OURS = [0]  # > 0 while our initialize runs DeepSpeed's


def _initialize_hf(original, section, args, model, optimizer, model_parameters, *rest, **kwargs):
    """HF MoE blocks without expert parallelism (replicated experts, any ZeRO stage): converted in
    place (`integrations.hf.convert`), EMA statistics over DeepSpeed's data-parallel group."""
    from default_moe.integrations import hf

    settings = dict(section.overrides)
    settings.pop("enabled", None)
    try:
        settings = hf.check_settings(settings)
    except ValueError as e:
        raise ValueError(f'DeepSpeed config "{SECTION}" (HuggingFace model, no "expert_parallel"): {e}') from None
    import deepspeed

    skip_cpu_jit_builds()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if not any(getattr(b, "_default_moe", None) is not None for _, b in hf.moe_blocks(model)):
        hf.convert(model, **settings)
    _INSIDE_OURS[0] += 1
    try:
        result = original(args, model, optimizer, model_parameters, *rest, **kwargs)
    finally:
        _INSIDE_OURS[0] -= 1
    _install_common_hooks(result[0])
    _install_commit_protocol(result[0], section.keep_last)
    return result


def install_section_guard() -> None:
    """Makes DeepSpeed's engine refuse an enabled `"default_moe"` section that did not come through
    our `initialize` (e.g. `from deepspeed import initialize` bound before the hook, or the import
    forgotten): without it DeepSpeed would ignore the section and train without Default MoE."""
    from deepspeed.runtime import engine as engine_mod

    cls = engine_mod.DeepSpeedEngine
    if getattr(cls.__init__, "_default_moe_guard", False):
        return
    original = cls.__init__

    @functools.wraps(original)
    def guarded(self, *args, **kwargs):
        params = getattr(kwargs.get("config_class"), "_param_dict", None)
        if params is None and isinstance(kwargs.get("config"), dict):
            params = kwargs["config"]
        section = (params or {}).get(SECTION) if isinstance(params, dict) else None
        if isinstance(section, dict) and section.get("enabled", True) and not _INSIDE_OURS[0]:
            raise ValueError(
                f'the DeepSpeed config has an enabled "{SECTION}" section, but this engine was not built by '
                "default_moe's initialize, so DeepSpeed would ignore it and train without Default MoE. Call "
                "deepspeed.initialize through the module attribute after `import default_moe.deepspeed` (not a "
                "`from deepspeed import initialize` name bound earlier), or call default_moe.deepspeed.initialize"
            )
        return original(self, *args, **kwargs)

    guarded._default_moe_guard = True
    cls.__init__ = guarded


def register() -> None:
    """Makes a plain `deepspeed.initialize(...)` honour the `"default_moe"` section."""
    global _ORIGINAL_INITIALIZE
    import deepspeed

    install_section_guard()
    skip_cpu_jit_builds()
    if _ORIGINAL_INITIALIZE is None:
        _ORIGINAL_INITIALIZE = deepspeed.initialize
        deepspeed.initialize = initialize


def unregister() -> None:
    """Restores DeepSpeed's own `deepspeed.initialize`."""
    global _ORIGINAL_INITIALIZE
    import deepspeed

    if _ORIGINAL_INITIALIZE is not None:
        deepspeed.initialize = _ORIGINAL_INITIALIZE
        _ORIGINAL_INITIALIZE = None
