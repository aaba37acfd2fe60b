"""Bad input is rejected with a ValueError naming the field, before anything is built."""

import json
import subprocess
import sys

import pytest
import torch

from default_moe import MoEConfig, MoELayer, count_collectives

BASE = dict(hidden_size=16, num_experts=8, ffn_hidden_size=32)


@pytest.mark.parametrize(
    "override,field,allowed",
    [
        ({"top_k": 9}, "top_k", "num_experts"),
        ({"top_k": 0}, "top_k", ">= 1"),
        ({"ep_size": 3}, "ep_size", "divisible"),
        ({"beta": 1.0}, "beta", "[0.0, 1.0)"),
        ({"beta": -0.1}, "beta", "[0.0, 1.0)"),
        ({"beta": float("nan")}, "beta", "[0.0, 1.0)"),
        ({"router": "expert_choice"}, "router", "'default'"),
        ({"activation": "relu"}, "activation", "'swiglu'"),
        ({"ema_weighting": "median"}, "ema_weighting", "'prob'"),
        ({"capacity_factor": 0.0}, "capacity_factor", "> 0"),
        ({"drop_policy": "random"}, "drop_policy", "'probs'"),
        ({"hidden_size": 0}, "hidden_size", ">= 1"),
        ({"num_experts": 2.5}, "num_experts", "integer"),
        ({"normalize_topk": "yes"}, "normalize_topk", "true or false"),
        ({"aux_loss_coeff": -1}, "aux_loss_coeff", "[0.0"),
    ],
)
def test_bad_config_values(override, field, allowed):
    with pytest.raises(ValueError) as e:
        MoEConfig(**{**BASE, **override})
    assert f"MoEConfig.{field}" in str(e.value) and allowed in str(e.value), str(e.value)


def test_from_dict_rejects_unknown_and_missing_fields():
    with pytest.raises(ValueError, match=r"unknown MoEConfig field\(s\) \['betta'\]"):
        MoEConfig.from_dict({**BASE, "betta": 0.9})
    with pytest.raises(ValueError, match=r"missing required field\(s\) \['ffn_hidden_size'\]"):
        MoEConfig.from_dict({"hidden_size": 4, "num_experts": 2})
    assert MoEConfig.from_dict(BASE, beta=0.5).beta == 0.5


def test_bad_layer_input_and_no_collective():
    layer = MoELayer(MoEConfig(**BASE))
    with count_collectives() as c:
        with pytest.raises(ValueError, match=r"last dimension must equal MoEConfig.hidden_size \(16\)"):
            layer(torch.randn(4, 15))
        with pytest.raises(ValueError, match="floating-point tensor, got torch.int64"):
            layer(torch.ones(4, 16, dtype=torch.long))
    assert c.records == []


def test_ep_size_needs_a_matching_world():
    with pytest.raises(ValueError, match=r"ep_size \(2\) must divide the world size \(1\)"):
        MoELayer(MoEConfig(**BASE, ep_size=2))


def test_cli_check_config(tmp_path):
    good = tmp_path / "ds.json"
    # A DeepSpeed section is validated as initialize() will: no sizes (they come from the model).
    good.write_text(json.dumps({"train_batch_size": 8, "default_moe": {"enabled": True, "beta": 0.8}}))
    out = subprocess.run(
        [sys.executable, "-m", "default_moe.cli", "check-config", str(good), "--section", "default_moe"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and json.loads(out.stdout)["beta"] == 0.8
    good.write_text(json.dumps({"train_batch_size": 8, "default_moe": {"enabled": True, **BASE}}))
    out = subprocess.run(
        [sys.executable, "-m", "default_moe.cli", "check-config", str(good), "--section", "default_moe"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "unknown key(s) ['ffn_hidden_size', 'hidden_size', 'num_experts']" in out.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**BASE, "ema_weighting": "eventually"}))
    out = subprocess.run([sys.executable, "-m", "default_moe.cli", "check-config", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2 and "MoEConfig.ema_weighting must be one of ['mean', 'prob']" in out.stderr
    out = subprocess.run([sys.executable, "-m", "default_moe.cli", "routers"], capture_output=True, text=True)
    assert out.returncode == 0 and "default" in out.stdout and "topk" in out.stdout


def test_check_config_accepts_the_readme_deepspeed_section(tmp_path):
    """`default-moe check-config ds.json --section default_moe` on the docs' own DeepSpeed config
    validates the section as DeepSpeed's initialize will (sizes come from the model)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "deepspeed.md").read_text()
    after = page[page.index("# DeepSpeed: switch it on") :]
    block = re.search(r"```json\n(.*?)```", after, re.S).group(1)
    (tmp_path / "ds.json").write_text(block)
    out = subprocess.run(
        [sys.executable, "-m", "default_moe.cli", "check-config", str(tmp_path / "ds.json"), "--section", "default_moe"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert '"router": "default"' in out.stdout and "valid DeepSpeed" in out.stderr
    (tmp_path / "bad.json").write_text(block.replace('"beta": 0.9', '"beta": 1.5'))
    out = subprocess.run(
        [sys.executable, "-m", "default_moe.cli", "check-config", str(tmp_path / "bad.json"), "--section", "default_moe"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "MoEConfig.beta must be a number" in out.stderr, out.stderr


def test_docs_section_table_lists_every_section_key():
    from pathlib import Path

    from default_moe.integrations.deepspeed import SECTION_FIELDS

    docs = (Path(__file__).resolve().parents[1] / "docs" / "hf.md").read_text()
    row = next(line for line in docs.splitlines() if line.startswith("| `router`, `top_k`"))
    missing = [k for k in SECTION_FIELDS if f"`{k}`" not in row]
    assert not missing, f'docs/hf.md\'s "default_moe" key table lacks {missing}'


def test_removed_ema_sync_fields_still_load_with_a_warning():
    """ema_sync / ema_sync_every (D is now committed once per optimizer step) are accepted from old
    configs, sections and checkpoints, and said to be ignored."""
    from default_moe import MoEConfig

    with pytest.warns(FutureWarning, match="MoEConfig.ema_sync was removed and is ignored"):
        cfg = MoEConfig(hidden_size=4, num_experts=2, ffn_hidden_size=4, ema_sync="async")
    assert not hasattr(cfg, "ema_sync")
    with pytest.warns(FutureWarning, match="ema_sync_every was removed"):
        MoEConfig.from_dict({"hidden_size": 4, "num_experts": 2, "ffn_hidden_size": 4, "ema_sync_every": 4})
