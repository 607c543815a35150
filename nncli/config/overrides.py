"""`--set KEY=VALUE`: a dotted key and a YAML value, applied to the config's parsed tree before
it is checked, so that a value set on the command line is checked, and blamed, like the file's."""
from __future__ import annotations

from typing import Any

import yaml

from nncli.config.schema import TOP, home_of
from nncli.config.yamlio import YamlMap, parse_yaml
from nncli.errors import ConfigError, did_you_mean


def parse_override(text: str) -> tuple[list[str], Any]:
    """`--set train.epochs=3` -> (["train", "epochs"], 3); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"'{text}' is not KEY=VALUE (e.g. --set train.epochs=3)", key="--set")
    key, value = text.split("=", 1)
    if not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"'{text}': the key before '=' must be a dotted path like optimizer.lr",
                          key="--set")
    return key.strip().split("."), parse_yaml(value, f"--set {key}")


def apply_overrides(raw: YamlMap, overrides: list[str], source: str) -> None:
    """Apply `--set` overrides to the raw tree; a key path that the file cannot have is an error."""
    for text in overrides:
        path, value = parse_override(text)
        node: Any = raw
        for depth, part in enumerate(path):
            where = ".".join(path[:depth]) or "the config"
            last = depth == len(path) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"'{text}': {where} is a list of {len(node)}; use an index "
                                      f"from 0 to {len(node) - 1}", file="--set")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"'{text}': {where} is not a mapping, so it has no key '{part}'",
                                  file="--set")
            schema = _schema_at(path[:depth])
            if schema is not None and part not in schema:
                home = home_of(part, tuple(path[:depth]))
                hint = did_you_mean(part, schema) if home is None else \
                    f"Did you mean --set {'.'.join(filter(None, (home, *path[depth:])))}=" \
                    f"{text.split('=', 1)[1]}?"
                raise ConfigError(f"unknown key '{'.'.join(path[:depth + 1])}' in '{text}'; expected "
                                  f"one of: {', '.join(schema)}", file="--set", hint=hint)
            if path[:2] == ["model", "layers"] and depth >= 2 and part not in node:
                names = [str(k) for k in node]
                raise ConfigError(f"'{text}': {where} has no key '{part}' (it has: {', '.join(names)})",
                                  file="--set", hint=did_you_mean(part, names))
            if last:
                node[part] = value
            else:
                if node.get(part) is None:  # start from the section's default, if it has one
                    default = schema[part].default if schema is not None and part in schema else None
                    node[part] = parse_yaml(yaml.safe_dump(default), "--set") \
                        if isinstance(default, dict) and default else YamlMap()
                node = node[part]
        raw.overridden = [*getattr(raw, "overridden", []), ".".join(path)]


def _schema_at(path: list[str]) -> dict | None:
    """The fixed schema for the mapping at `path`, or None when its keys are open (e.g. optimizer)."""
    schema: dict | None = TOP
    for part in path:
        spec = schema.get(part) if schema else None
        schema = spec.schema if spec is not None else None
    return schema


def with_epochs(overrides: list[str], epochs: int | None) -> list[str]:
    """`--set` overrides, and `--epochs N` as one more: `train.epochs=N`."""
    return [*overrides, *([f"train.epochs={epochs}"] if epochs else [])]
