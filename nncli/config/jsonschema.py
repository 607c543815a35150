"""The config format as a JSON Schema (2020-12), from the tables the validator reads (schema.py):
the fixed sections' keys, types, defaults and choices, the data sources' keys, the schedule's own
keys. Torch-free: what depends on the registries (layer types and their arguments, losses,
optimizers, schedulers) is given by the caller (nncli.report.config_schema) as `Choices`.

The schema catches what can be told from the file alone (an unknown key, a wrong type, a value
out of range, a misspelt choice); what needs the model or the data (shapes, a layer given an
argument its type lacks from a plugin) is `nncli validate`'s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nncli.config.schema import (
    CHECKPOINT,
    DATA_KEYS,
    FILE_KEYS,
    LOADER_KEYS,
    LOGGER_NAMES,
    MODEL,
    PAIR_KEYS,
    REQUIRED,
    SCHEDULE_KEYS,
    SOURCES,
    TOP,
    TRAIN,
    Key,
    compile_mode,
    fraction,
    non_negative,
    one_delimiter,
    positive,
)

DIALECT = "https://json-schema.org/draft/2020-12/schema"

JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
              type(None): "null"}
# The checks of schema.py that a JSON Schema keyword says exactly
BOUNDS = {positive: {"exclusiveMinimum": 0}, non_negative: {"minimum": 0},
          fraction: {"exclusiveMinimum": 0, "exclusiveMaximum": 1},
          one_delimiter: {"minLength": 1, "maxLength": 1}}


@dataclass(frozen=True)
class Choices:
    """A registry's names and, for each, the schema of the mapping that configures it (its
    arguments). `open`: names beyond these are accepted unchecked (a plugin's layer or loss)."""

    by_name: dict[str, dict]
    open: bool = False


def key_schema(key: Key) -> dict:
    """One key: its JSON types, default, choices or bounds, and a nested section's keys."""
    types = list(dict.fromkeys(JSON_TYPES[t] for t in key.types))
    out: dict[str, Any] = {"type": types[0] if len(types) == 1 else types}
    if key.default is not REQUIRED and (key.default is not None or type(None) in key.types):
        out["default"] = key.default
    choices = getattr(key.check, "choices", None)
    if choices is not None and key.check is not compile_mode:
        out["enum"] = list(choices) + ([None] if type(None) in key.types else [])
    elif key.check is compile_mode:  # true/false or one of torch.compile's modes
        out = {"anyOf": [{"type": "boolean"}, {"enum": list(choices)}], "default": key.default}
    elif key.check in BOUNDS:
        out.update(BOUNDS[key.check])
    if key.schema is not None:  # a mapping of its own (or null, where the key takes it)
        out.update({k: v for k, v in section_schema(key.schema).items() if k != "type"})
    return out


def section_schema(keys: dict[str, Key], extra: dict[str, dict] | None = None) -> dict:
    """A mapping that has exactly `keys` (and `extra`'s, already in JSON Schema)."""
    properties = {name: key_schema(key) for name, key in keys.items()}
    properties.update(extra or {})
    required = [name for name, key in keys.items() if key.default is REQUIRED]
    return {"type": "object", "properties": properties, "additionalProperties": False,
            **({"required": required} if required else {})}


def named(choices: Choices, *, required: bool = True, extra: dict | None = None) -> dict:
    """`NAME` or `{type: NAME, ...its arguments}`: each known name's mapping checked against its
    schema (`extra`: keys every mapping takes beside its arguments)."""
    names = list(choices.by_name)
    name = {"anyOf": [{"enum": names}, {"type": "string"}]} if choices.open else {"enum": names}
    branches = [{"if": {"properties": {"type": {"const": n}}, "required": ["type"]},
                 "then": _closed(schema, extra)} for n, schema in choices.by_name.items()]
    mapping = {"type": "object", "properties": {"type": name}, "allOf": branches,
               **({"required": ["type"]} if required else {})}
    return {"anyOf": [name, mapping]}


def _closed(arguments: dict, extra: dict | None) -> dict:
    """An arguments schema with `extra` keys and `type` allowed beside them."""
    properties = {"type": True, **(extra or {}), **arguments.get("properties", {})}
    out = {**arguments, "properties": properties}
    if "required" in arguments and extra and "args" in extra:  # given as args: [...] instead
        out.pop("required")
        out["anyOf"] = [{"required": ["args"]}, {"required": arguments["required"]}]
    return out


def data_schema() -> dict:
    """One source and a split, or `train:` and `val:` sources (schema.is_pair)."""
    def source(name: str, keys: dict[str, Key]) -> dict:
        own = section_schema({**SOURCES[name].keys, **keys}, {"source": {"const": name}})
        own["required"] = ["source", *own.get("required", [])]
        return own

    one = [source(name, DATA_KEYS) for name in SOURCES]
    pair_source = {"anyOf": [source(name, {}) for name in SOURCES]}
    pair = section_schema({k: v for k, v in PAIR_KEYS.items() if k not in ("train", "val")},
                          {"train": pair_source, "val": {"anyOf": [pair_source, {"type": "null"}]}})
    pair["required"] = ["train"]
    return {"anyOf": [{"type": "null"}, *one, pair], "default": None,
            "description": f"source: {', '.join(SOURCES)}; loader keys: {', '.join(LOADER_KEYS)}"}


def config_schema(layers: Choices, losses: Choices, optimizers: Choices, schedulers: Choices) -> dict:
    """The whole config format."""
    spec_keys = {"name": {"type": "string"}, "args": {"type": "array"},
                 "repeat": {"type": "integer", "minimum": 1}, "trainable": {"type": "boolean"},
                 "copies": {"type": "object", "description": "with repeat: changes to single copies, "
                            "{index: {dotted.key: value}}"}}
    layer_list = {"anyOf": [{"type": "array", "items": {"$ref": "#/$defs/layer"}, "minItems": 1},
                            {"type": "object", "additionalProperties": {"$ref": "#/$defs/layer"},
                             "minProperties": 1}]}
    groups = {"type": "array", "items": {"type": "object", "required": ["params"], "properties": {
        "params": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "name": {"type": "string"}}}}
    top = {name: key_schema(key) for name, key in TOP.items()}
    top.update({
        "model": section_schema(MODEL, {"layers": {"$ref": "#/$defs/layers"}}),
        "data": data_schema(),
        "loss": {**named(losses), "default": TOP["loss"].default},
        "optimizer": {**named(optimizers, extra={"groups": groups}), "default": TOP["optimizer"].default},
        "schedule": {"anyOf": [{"type": "null"}, named(schedulers, extra={
            name: key_schema(key) for name, key in SCHEDULE_KEYS.items()})], "default": None},
        "train": section_schema(TRAIN) | {"default": {}},
        "checkpoint": section_schema(CHECKPOINT) | {"default": {}},
        "loggers": {"type": "array", "items": {"enum": list(LOGGER_NAMES)}, "uniqueItems": True,
                    "contains": {"const": "csv"}, "default": TOP["loggers"].default},
        "seed": {"type": "integer", "minimum": 0, "maximum": 2**32 - 1, "default": TOP["seed"].default},
        "plugins": {"type": "array", "items": {"type": "string"}, "default": []},
        "metrics": {"type": ["array", "null"], "items": {"type": "string"}, "default": None},
        "device_ids": {"type": ["array", "null"], "items": {"type": "integer", "minimum": 0},
                       "default": None},
    })
    top.update({name: {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
                       "description": "config files this one builds on, relative to it"}
                for name in FILE_KEYS})
    layer_type = named(layers, extra=spec_keys)
    return {
        "$schema": DIALECT,
        "title": "nncli config",
        "description": "A network, its data, loss, optimizer, schedule and device, for nncli train.",
        "type": "object",
        "properties": top,
        # model: is required, unless a base file gives it
        "anyOf": [{"required": [name for name, key in TOP.items() if key.default is REQUIRED]},
                  {"required": list(FILE_KEYS)}],
        "additionalProperties": False,
        "$defs": {"layers": layer_list, "layer": layer_type},
    }
