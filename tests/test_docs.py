"""The README stays a five-minute read and the docs cannot drift from the code: README length,
every test the README's support table names exists, every docs page is in the site's nav, and the
configuration reference lists every MoEConfig field (the DeepSpeed section keys and the run config
are generated at build time by launch/docs_hooks.py; the test command builds the site strictly)."""

import dataclasses
import re
from pathlib import Path

from default_moe import MoEConfig

ROOT = Path(__file__).resolve().parents[1]


def test_readme_is_short_and_names_existing_tests():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    named = re.findall(r"`(tests/\w+\.py)(?:::(\w+))?`", readme)
    assert len(named) >= 10
    for path, name in named:
        assert (ROOT / path).exists(), path
        if name:
            assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), f"{path}::{name}"
    for link in re.findall(r"\]\((docs/[\w.]+)\)", readme):
        assert (ROOT / link).exists(), link


def test_readme_support_table_routers_are_the_codes():
    """The routers column of the README's support table is each adapter's own list of routers, so
    the table cannot claim a router an adapter refuses or miss one it takes."""
    from default_moe.integrations import autoep, deepspeed_moe, hf, megatron, torchtitan
    from default_moe.routing import registered_routers

    code = {
        "the layer, plain PyTorch": registered_routers(),
        "DeepSpeed-MoE models": deepspeed_moe.ENGINE_ROUTERS,
        "HF models": hf.HF_ROUTERS,
        "DeepSpeed AutoEP": autoep.AUTOEP_ROUTERS,
        "megatron-core": megatron.MEGATRON_ROUTERS,
        "torchtitan": torchtitan.ROUTERS,
    }
    readme = (ROOT / "README.md").read_text()
    rows = [line.split("|")[1:3] for line in readme.splitlines() if line.startswith("| ")]
    seen = set()
    for engine, routers in rows:
        for prefix, names in code.items():
            if engine.strip().startswith(prefix):
                listed = {r.strip() for r in routers.split(";")[0].split(",")}
                assert listed == set(names), f"README support table, {prefix}: {sorted(listed)} != code {sorted(names)}"
                seen.add(prefix)
    assert seen == set(code), f"rows not found: {set(code) - seen}"


def test_every_docs_page_is_in_the_nav():
    import yaml  # the "docs" extra (mkdocs brings it)

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text().replace("!!python", ""))["nav"]

    def pages(items):
        for item in items:
            for value in item.values():
                yield from (pages(value) if isinstance(value, list) else [value])

    listed = set(pages(nav))
    assert {p.name for p in (ROOT / "docs").glob("*.md")} == listed


def test_config_reference_lists_every_field():
    page = (ROOT / "docs" / "config.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    for f in dataclasses.fields(MoEConfig):
        assert any(f"`{f.name}`" in row.split("|")[1] for row in rows), f"docs/config.md lacks MoEConfig.{f.name}"
