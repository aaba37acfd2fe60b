"""MkDocs hook (mkdocs.yml `hooks:`): fills the generated parts of the docs from the code at build
time, so they cannot drift: the DeepSpeed section's keys and the main job's run/model config."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

_PLUGIN = str(Path(__file__).resolve().parents[1] / "plugin")


def _default(f) -> str:
    if f.default is not dataclasses.MISSING:
        return f"`{f.default!r}`"
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f"`{f.default_factory()!r}`"  # type: ignore[misc]
    return "required"


def _table(cls, flag_prefix: str = "--") -> str:
    rows = ["| field | flag | type | default |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        rows.append(f"| `{f.name}` | `{flag_prefix}{f.name.replace('_', '-')}` | `{f.type}` | {_default(f)} |")
    return "\n".join(rows)


def generated() -> dict:
    if _PLUGIN not in sys.path:  # (mkdocs may reset sys.path after loading the hooks)
        sys.path.insert(0, _PLUGIN)
    from default_moe.integrations.deepspeed import SECTION_FIELDS
    from default_moe.models.gpt import GPTConfig
    from default_moe.train import RunConfig

    return {
        "deepspeed-section": ", ".join(f"`{k}`" for k in ("enabled", "checkpoint", *SECTION_FIELDS)),
        "run-config": "### `RunConfig`\n\n" + _table(RunConfig) + '\n\n### `GPTConfig` (`"model"`)\n\n' + _table(GPTConfig),
    }


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "<!-- generated:" not in markdown:
        return markdown
    for key, text in generated().items():
        markdown = markdown.replace(f"<!-- generated:{key} -->", text)
    return markdown
