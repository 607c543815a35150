"""`nncli schema`: the config format's JSON Schema, with the registries' names and arguments.

The fixed sections come from nncli.config.jsonschema (the validator's own tables); this module
adds what needs torch: every layer type with its constructor's arguments (their annotations as
JSON types, their defaults, nncli's defaults where they differ, and which are required unless
nncli infers them or `args:` gives them), the losses, optimizers and schedulers with theirs.
Layer types and losses beyond the registry's (a plugin's) are accepted unchecked; an optimizer
or a scheduler is one of torch's.
"""
from __future__ import annotations

import inspect
import json
import types
import typing
from collections.abc import Callable
from typing import Any

import torch

from nncli.arguments import SEQUENCES, describe_annotation, parameters_of, type_hints
from nncli.config.jsonschema import Choices, config_schema
from nncli.model.blocks import MERGES
from nncli.model.layers import LAYERS, SIZE_ARGUMENTS
from nncli.optim.losses import LOSSES
from nncli.optim.optimizers import OPTIMIZERS
from nncli.optim.schedules import SCHEDULERS

GENERATED_WITH = "written by nncli schema from the registries of torch "
# What a config never gives a constructor: nncli passes these itself
NOT_FROM_CONFIG = {"self", "params", "optimizer", "device", "dtype"}


def annotation_schema(hint: Any) -> dict:
    """An annotation as the JSON values that fit it (arguments.fits_annotation's rules)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        branches = [annotation_schema(a) for a in args]
        return {} if {} in branches else {"anyOf": branches}
    if origin is typing.Literal:
        return {"enum": list(args)}
    simple = {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string"}
    if hint in simple:
        return {"type": simple[hint]}
    if hint is torch.Tensor:  # a number or a list of them
        return {"anyOf": [{"type": "number"}, {"type": "array"}]}
    if origin in SEQUENCES or hint in (tuple, list) or hint is torch.Size:
        if origin is tuple and args and args[-1] is not Ellipsis:
            items = [annotation_schema(a) for a in args]
            return {"type": "array", "prefixItems": items, "minItems": len(items), "maxItems": len(items)}
        return {"type": "array", **({"items": annotation_schema(args[0])} if args else {})}
    return {}  # a class YAML cannot give (a dtype, a module): the constructor decides


def _json_default(value: Any) -> tuple[bool, Any]:
    """(whether `value` is a JSON value, it as one): tuples as lists."""
    if isinstance(value, (tuple, list)):
        items = [_json_default(v) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    return (value is None or isinstance(value, (bool, int, float, str))) and value == value, value


def arguments_schema(factory: Callable[..., Any], defaults: dict | None = None,
                     optional: set[str] = frozenset()) -> dict:
    """The mapping of `factory`'s keyword arguments: closed unless it takes **kwargs; those without
    a default are required, but for `optional` ones (nncli infers them, or gives them)."""
    params = parameters_of(factory)
    if not params:  # no readable signature: anything goes
        return {"type": "object"}
    hints, defaults = type_hints(factory), defaults or {}
    properties, required = {}, []
    for name, param in params.items():
        if name in NOT_FROM_CONFIG or param.kind not in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            continue
        schema = annotation_schema(hints[name]) if name in hints else {}
        if name in hints:
            schema["description"] = describe_annotation(hints[name])
        default = defaults.get(name, param.default)
        ok, shown = _json_default(default)
        if default is not inspect.Parameter.empty and ok:
            schema["default"] = shown
        if default is inspect.Parameter.empty and name not in optional:
            required.append(name)
        properties[name] = schema
    closed = not any(p.kind == p.VAR_KEYWORD for p in params.values())
    return {"type": "object", "properties": properties, "additionalProperties": not closed,
            **({"required": required} if required else {})}


def _layer(entry: Any) -> dict:
    schema = arguments_schema(entry.factory, entry.defaults, set(entry.infer))
    properties = schema.setdefault("properties", {})
    for name in SIZE_ARGUMENTS & set(properties) if entry.infer else ():  # groups: in_channels
        properties[name] = {"anyOf": [properties[name], {"enum": list(entry.infer)}]}
    for key, holds in entry.block_keys.items():
        properties[key] = ({"$ref": "#/$defs/layers"} if key == "layers"
                           else {"enum": list(MERGES), "description": holds} if key == "merge"
                           else {"description": holds})
    if entry.is_block:  # the paths a block must have
        schema["required"] = [key for key in ("layers", "branches") if key in entry.block_keys]
    doc = inspect.cleandoc(entry.factory.__doc__ or "").split("\n\n")[0].replace("\n", " ")
    return {**schema, "description": f"{entry.name} ({entry.category}, from {entry.source}). {doc}".strip()}


def _usable(registry: Any) -> dict:
    return {name: entry for name, entry in registry.items() if not getattr(entry, "unsupported", None)}


def build_schema() -> dict:
    """The config format's JSON Schema (2020-12), for the registries as they are now (a plugin
    imported before this call adds its layers)."""
    layers = Choices({name: _layer(entry) for name, entry in LAYERS.items()}, open=True)
    losses = Choices({name: arguments_schema(entry.factory) for name, entry in LOSSES.items()}, open=True)
    optimizers = Choices({name: arguments_schema(entry.factory)
                          for name, entry in _usable(OPTIMIZERS).items()})
    # what nncli fills in from the run: the run's length, OneCycleLR's max_lr (the optimizer's lr)
    schedulers = Choices({name: arguments_schema(entry.factory, optional={entry.length_argument, "max_lr"})
                          for name, entry in SCHEDULERS.items()})
    schema = config_schema(layers, losses, optimizers, schedulers)
    # the layers' and optimizers' arguments are those of this torch
    schema["$comment"] = f"{GENERATED_WITH}{torch.__version__}"
    return schema


def schema_text() -> str:
    """The schema as the JSON file `nncli schema` writes (sorted keys: a stable diff)."""
    return json.dumps(build_schema(), indent=1, sort_keys=True) + "\n"
