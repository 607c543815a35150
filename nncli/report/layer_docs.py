"""`nncli layers`: the layer registry by category, and one layer's arguments."""
from __future__ import annotations

import inspect

from rich.console import Console
from rich.table import Table

from nncli.arguments import parameters_of
from nncli.model.layers import CATEGORY_ORDER, LAYERS


def print_registry(console: Console) -> None:
    by_category: dict[str, list[str]] = {}
    for name, entry in LAYERS.items():
        by_category.setdefault(entry.category, []).append(name)
    table = Table("Category", "Layers", show_lines=True)
    for category in sorted(by_category, key=lambda c: (CATEGORY_ORDER.index(c)
                                                      if c in CATEGORY_ORDER else len(CATEGORY_ORDER), c)):
        table.add_row(category, ", ".join(sorted(by_category[category])))
    console.print(table)
    console.print("`nncli layers NAME` shows a layer's arguments. Add your own with "
                  "nncli.register_layer and `plugins:` in the config; `--plugin FILE` lists them here.")


def print_layer(name: str, console: Console) -> None:
    entry = LAYERS.get(name)
    doc = inspect.cleandoc(entry.factory.__doc__ or "")  # its own, not nn.Module's (getdoc inherits)
    console.print(f"{entry.name} ({entry.category}, from {entry.source})")
    # the first paragraph that is prose (torch's RNN docstrings open with an `__init__(...)` line)
    intro = next((part for part in doc.split("\n\n")
                  if part.strip() and not part.startswith("__init__(")), "")
    if intro:
        console.print(intro)
    if entry.is_block:
        table = Table("Key", "Holds")
        for key, holds in entry.block_keys.items():
            table.add_row(f"{key}:", holds)
        console.print(table)
        console.print("Like any layer it also takes name, repeat (with copies), trainable.")
        return
    table = Table("Argument", "Default", "Inferred")
    parameters = parameters_of(entry.factory).values()
    for p in parameters:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            table.add_row(("*" if p.kind == p.VAR_POSITIONAL else "**") + p.name, "", "")
            continue
        if p.name in entry.defaults:
            default = f"{entry.defaults[p.name]!r} (nncli; torch: {p.default!r})"
        else:
            default = "required" if p.default is p.empty else repr(p.default)
        rule = entry.infer.get(p.name)
        table.add_row(p.name, default, f"from the input ({rule.noun.strip('()')})" if rule else "")
    console.print(table)
