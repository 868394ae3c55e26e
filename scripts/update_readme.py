"""Regenerate the README's generated sections from the code: the methods table (from the registry) and the recipe
reference (from the recipe dataclasses and each method's config). `tests/test_cli.py` fails when they are stale.

    python scripts/update_readme.py          # rewrite README.md in place
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def methods_table() -> str:
    from adaptune.errors import AdaptuneError
    from adaptune.loading import count_method_parameters
    from adaptune.methods import get_method, list_methods

    rows = [
        "| method | what it trains | trainable on ViT-B/16 (no head) | VTAB-1k reported (mean of group means) "
        "| folds into plain timm |",
        "|---|---|---|---|---|",
    ]
    for name in list_methods():
        spec = get_method(name)
        try:
            params = f"{count_method_parameters('vit_base_patch16_224', name)['method']:,}"
        except AdaptuneError:
            params = "n/a (CNN only)"
        reported = f"{spec.reported_vtab1k[0]:.2f} ({spec.reported_vtab1k[1]})" if spec.reported_vtab1k else "-"
        fold = "yes" if spec.foldable else "no (merged model, or ONNX)"
        rows.append(f"| `{name}` | {spec.summary} | {params} | {reported} | {fold} |")
    return "\n".join(rows)


def _fmt(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{}" if not value else str(value)
    return str(value)


def _table(cls: type, prefix: str) -> list[str]:
    from adaptune.recipe import field_docs

    return [
        f"| `{prefix}{name}` | {kind} | `{_fmt(default)}` | {help_.replace('|', '/')} |"
        for name, kind, default, help_ in field_docs(cls)
    ]


def recipe_reference() -> str:
    from adaptune.data.sources import get_source, list_sources
    from adaptune.methods import get_method, list_methods
    from adaptune.recipe import BackboneConfig, DataConfig, OutputConfig, TrainConfig

    sections = [("backbone", BackboneConfig, "backbone."), ("data", DataConfig, "data.")]
    sections += [(f"data.{n} (data.source: {n})", get_source(n).config_cls, f"data.{n}.") for n in list_sources()]
    sections += [("train", TrainConfig, "train."), ("output", OutputConfig, "output.")]
    out = []
    for title, cls, prefix in sections:
        out += [f"**{title}**", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        out += _table(cls, prefix)
        out.append("")
    for name in list_methods():
        rows = _table(get_method(name).config_cls, "method.")
        out += [f"**method: {name}**", ""]
        if rows:
            out += ["| key | type | default | meaning |", "|---|---|---|---|", *rows]
        else:
            out.append("No options.")
        out.append("")
    return "\n".join(out).rstrip()


def render(text: str) -> str:
    for tag, body in (("methods", methods_table()), ("recipe-reference", recipe_reference())):
        pattern = re.compile(rf"(<!-- {tag}:start -->\n).*?(<!-- {tag}:end -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no <!-- {tag}:start --> ... <!-- {tag}:end --> section")
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    return text


if __name__ == "__main__":
    new = render(README.read_text())
    if "--check" in sys.argv:
        sys.exit(0 if new == README.read_text() else 1)
    README.write_text(new)
