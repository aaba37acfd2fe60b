"""Serving what was trained: a Default-MoE model exported to its plain form, which runtimes that
know only the family's own top-k MoE block (vLLM, SGLang, TensorRT-LLM, plain `transformers`)
compute — without the default term, without D, without this package.

What a user can deploy depends on the variant trained:
- `default_in_forward=false` (the main job's setting; auto for sigmoid gates): the forward *is* the
  family's routed forward, so the export is exact. The export checks it on a probe batch (logits
  equal to fp32 rounding) and fails loudly if not.
- D in the forward (the paper's variant; auto for softmax gates): the trained function includes
  sum_{i not selected} w_i D_i, which dropping D changes. The export measures the change on a probe
  batch (held-out tokens, or a data file) — max |logit difference| and the next-token loss of the
  trained and the exported model — prints it, and refuses (`DriftRefused`, nothing written) unless
  `accept_drift`.

Two ways a model leaves training (`default-moe export SRC DST`):
- an HF model converted with `integrations.hf.convert` and saved with `save_pretrained`:
  `export_hf` writes a `save_pretrained` folder of the plain family (no `default_moe` key in
  config.json, no `defaults_ED` tensor), which `transformers` loads as the original family;
- the main job's DeepSpeed checkpoint (`default_moe.models.gpt.GPT`, not an HF family):
  `export_main_job` writes `model.pt` (tensors only), `config.json` and `gpt_moe.py`, a modeling
  file in torch alone (`default_moe/serving/gpt_moe.py`), so a serving process needs neither
  default_moe nor DeepSpeed.
The source is never modified. Megatron and torchtitan checkpoints are not exported here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F


class DriftRefused(ValueError):
    """The trained model has D in its forward and the plain export computes something else; the
    check's numbers are in the message and `.check`."""

    def __init__(self, check: "ExportCheck") -> None:
        super().__init__(
            f"{check.line()}. The trained forward includes the default term sum w_i D_i, which a plain "
            "top-k MoE runtime does not compute: pass --accept-drift (accept_drift=True) to export anyway, or train "
            "with default_in_forward=false (the router's dense gradient without the term in the forward: exports exactly)"
        )
        self.check = check


@dataclasses.dataclass
class ExportCheck:
    """The trained model against the exported one on a probe batch."""

    d_in_forward: bool  # the trained forward included the default term (some D nonzero)
    probe: str  # where the probe tokens came from
    tokens: int
    max_abs_logit_diff: float
    max_abs_logit: float
    loss_trained: float
    loss_exported: float

    @property
    def exact(self) -> bool:
        """Equal to fp32 rounding (the same function; another order of the same sums)."""
        return self.max_abs_logit_diff <= 1e-5 * max(1.0, self.max_abs_logit)

    def line(self) -> str:
        kind = "D in the forward" if self.d_in_forward else "D out of the forward"
        return (
            f"export check ({kind}; {self.tokens} probe tokens, {self.probe}): max |logit difference| "
            f"{self.max_abs_logit_diff:.3g} (max |logit| {self.max_abs_logit:.3g}); next-token loss trained "
            f"{self.loss_trained:.4f}, exported {self.loss_exported:.4f} ({self.loss_exported - self.loss_trained:+.4f})"
        )


def _next_token_loss(logits_BSV: torch.Tensor, ids_BS: torch.Tensor) -> float:
    return F.cross_entropy(logits_BSV[:, :-1].float().reshape(-1, logits_BSV.shape[-1]), ids_BS[:, 1:].reshape(-1)).item()


def _check(trained: torch.Tensor, exported: torch.Tensor, ids: torch.Tensor, d_in_forward: bool, probe: str) -> ExportCheck:
    return ExportCheck(
        d_in_forward=d_in_forward,
        probe=probe,
        tokens=ids.numel(),
        max_abs_logit_diff=(trained.float() - exported.float()).abs().max().item(),
        max_abs_logit=trained.float().abs().max().item(),
        loss_trained=_next_token_loss(trained, ids),
        loss_exported=_next_token_loss(exported, ids),
    )


def _decide(check: ExportCheck, accept_drift: bool) -> None:
    if check.d_in_forward:
        if not accept_drift:
            raise DriftRefused(check)
    elif not check.exact:
        raise RuntimeError(
            f"{check.line()}: a model trained with D out of the forward must export exactly; this is a bug, please report it"
        )


def _d_in_forward(defaults) -> bool:
    return any(d.term_in_forward() for d in defaults)


# ---- HF ----


def export_hf(
    model: torch.nn.Module,
    dst: str,
    probe_ids: Optional[torch.Tensor] = None,
    accept_drift: bool = False,
    probe: str = "",
) -> ExportCheck:
    """Writes `model` (converted by `integrations.hf.convert`, trained) to `dst` as its plain HF
    family, after checking it against the trained model on `probe_ids` ([B, S] token ids; default:
    random ids of the vocabulary, seeded). Nothing is written when refused.

    Returns:
        The check (printed by the CLI).
    """
    from default_moe.integrations import hf

    if os.path.exists(dst):
        raise FileExistsError(f"{dst} exists: the export writes a new folder")
    blocks = [b for _, b in hf.moe_blocks(model) if getattr(b, "defaults", None) is not None]
    if not blocks:
        raise ValueError("the model has no converted Default MoE block (hf.convert): export it with save_pretrained")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if probe_ids is None:
        g = torch.Generator().manual_seed(0)
        probe_ids = torch.randint(0, config.vocab_size, (4, 32), generator=g)
        probe = probe or "random token ids (no probe data given)"
    device = next(model.parameters()).device
    probe_ids = probe_ids.to(device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        trained = model(probe_ids).logits
    model.train(was_training)
    d_in_forward = _d_in_forward([b.defaults for b in blocks])
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        with open(os.path.join(tmp, "config.json")) as f:
            cfg = json.load(f)
        cfg.pop("default_moe", None)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        attn = getattr(model.config, "_attn_implementation", None)
        kwargs = {"attn_implementation": attn} if attn else {}
        plain = type(model).from_pretrained(tmp, torch_dtype=next(model.parameters()).dtype, **kwargs).to(device).eval()
    with torch.no_grad():
        exported = plain(probe_ids).logits
    check = _check(trained, exported, probe_ids, d_in_forward, probe)
    _decide(check, accept_drift)
    if hasattr(plain.config, "default_moe"):
        del plain.config.default_moe
    plain.save_pretrained(dst)
    return check


def export_hf_folder(src: str, dst: str, probe_text: Optional[str] = None, accept_drift: bool = False) -> ExportCheck:
    """`export_hf` of a `save_pretrained` folder of a converted model: loaded, converted again
    with its recorded settings and D (`config.default_moe`), exported; the tokenizer and generation
    files are copied. The probe: `probe_text` tokenised with the folder's tokenizer, else random ids."""
    import transformers

    from default_moe.integrations import hf

    cfg_path = os.path.join(src, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{src}: no config.json (not a save_pretrained folder)")
    with open(cfg_path) as f:
        settings = dict(json.load(f).get("default_moe") or {})
    if settings.get("router", "default") != "default":
        raise ValueError(f"{src}: config.json has no Default MoE record (config.default_moe): nothing to export")
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    settings.pop("router", None)
    settings = {k: v for k, v in settings.items() if v is not None}
    hf.convert(model, router="default", state_from=src, **settings)
    probe_ids, probe = None, ""
    if probe_text is not None:
        tok = transformers.AutoTokenizer.from_pretrained(src)
        with open(probe_text, encoding="utf-8", errors="replace") as f:
            ids = tok(f.read(), return_tensors="pt").input_ids[0]
        n = min(4, max(1, ids.numel() // 64))
        probe_ids, probe = ids[: n * 64].view(n, 64), f"{probe_text}, {n}x64 tokens"
    check = export_hf(model, dst, probe_ids, accept_drift, probe)
    for name in os.listdir(src):
        if name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "generation_config")) and not os.path.exists(
            os.path.join(dst, name)
        ):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    return check


# ---- the main job ----

SERVING_FILE = "gpt_moe.py"
EXPORTABLE_ROUTERS = ("default", "topk")


def _standalone_config(gpt: Dict[str, Any], moe_configs: Dict[str, Dict[str, Any]], n_layers: int) -> Dict[str, Any]:
    layers = []
    for i in range(n_layers):
        c = moe_configs[f"blocks.{i}.moe"]
        if c["router"] not in EXPORTABLE_ROUTERS:
            raise ValueError(
                f"blocks.{i}.moe: router {c['router']!r} does not export to a plain top-k MoE (allowed: {list(EXPORTABLE_ROUTERS)})"
            )
        keys = ("num_experts", "top_k", "ffn_hidden_size", "activation", "score_function", "normalize_topk", "route_scale")
        keys += ("expert_bias", "num_expert_groups", "group_topk", "shared_expert_ffn_hidden_size", "shared_expert_gate")
        layers.append({k: c.get(k) for k in keys})
    return {
        "architecture": "gpt-moe (default_moe.models.gpt, exported by default-moe export)",
        **{k: gpt[k] for k in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads")},
        "moe_layers": layers,
    }


def _load_serving_module(folder: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("default_moe_export_gpt_moe", os.path.join(folder, SERVING_FILE))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def export_main_job(ckpt_dir: str, dst: str, tag: Optional[str] = None, accept_drift: bool = False) -> ExportCheck:
    """Exports the main job's DeepSpeed checkpoint (any ep_size; the newest complete checkpoint, or
    `tag`) to `dst`: `model.pt` without D, `config.json`, and the torch-only `gpt_moe.py`. The probe
    is the run's own validation batches (its data and seed, recorded in the checkpoint)."""
    from default_moe import checkpoint
    from default_moe import data as data_mod
    from default_moe.config import MoEConfig
    from default_moe.models.gpt import GPT, GPTConfig

    if os.path.exists(dst):
        raise FileExistsError(f"{dst} exists: the export writes a new folder")
    with tempfile.TemporaryDirectory() as tmp:
        extra = checkpoint.convert_deepspeed(ckpt_dir, os.path.join(tmp, "full.pt"), tag)
        payload = torch.load(os.path.join(tmp, "full.pt"), map_location="cpu", weights_only=True)
    module_file = os.path.join(extra["source"], "mp_rank_00_model_states.pt")
    client = checkpoint.load_deepspeed_file(module_file)
    if "gpt" not in client or "run_data" not in client:
        raise ValueError(
            f"{module_file} does not record the model's shape and data (checkpoints of the main job written before "
            "the export existed): re-save it with this version"
        )
    gpt_cfg = GPTConfig(**client["gpt"])
    model = GPT(gpt_cfg)
    for name, layer in zip([f"blocks.{i}.moe" for i in range(gpt_cfg.n_layers)], model.moe_layers):
        layer.reconfigure(MoEConfig(**{**payload["moe_configs"][name], "ep_size": 1}))
    state = payload["model"]
    model.load_state_dict(state, strict=True)
    for layer in model.moe_layers:  # D annealing's weight at the saved step (not in the state dict)
        if layer.defaults is not None:
            layer.defaults.set_forward_scale(float(client.get("defaults_forward_scale", 1.0)))
    model.eval()
    run_data = client["run_data"]
    tokens = data_mod.load_tokens(run_data["data"], run_data.get("tokenizer"), run_data.get("token_dtype", "uint16"))
    _, val = data_mod.split_train_val(tokens)
    batches = [
        data_mod.sample_batch(val, run_data["micro_batch"], gpt_cfg.seq_len, run_data["seed"] + 1, 0, 0, i)[0]
        for i in range(run_data.get("eval_batches", 2))
    ]
    ids = torch.cat(batches)
    with torch.no_grad():
        trained = model(ids)
    keep = {k: v for k, v in state.items() if ".defaults." not in k}
    cfg = _standalone_config(client["gpt"], payload["moe_configs"], gpt_cfg.n_layers)
    staging = tempfile.mkdtemp(prefix=".export-", dir=os.path.dirname(os.path.abspath(dst)) or ".")
    try:
        torch.save(keep, os.path.join(staging, "model.pt"))
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        shutil.copyfile(os.path.join(os.path.dirname(__file__), "serving", "gpt_moe.py"), os.path.join(staging, SERVING_FILE))
        plain = _load_serving_module(staging).load(staging)
        with torch.no_grad():
            exported = plain(ids)
        d_in_forward = _d_in_forward([layer.defaults for layer in model.moe_layers if layer.defaults is not None])
        check = _check(trained, exported, ids, d_in_forward, f"the run's validation batches ({run_data['data']})")
        _decide(check, accept_drift)
        os.replace(staging, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return check
