"""From the `model:` section to a plain `torch.nn.Sequential`.

`plan_model` reads the layer specs, checks every argument against the layer's signature, fills
in the input-size arguments from the shape flowing in, constructs each layer and runs it once to
learn its output shape, parameter count and (on request) multiply-accumulates. By default this
happens on PyTorch's `meta` device: no memory, no arithmetic, so `summary` and `validate` work
for models far too big to allocate. Planned on a real device, the constructed layers are the
model: built in file order, so a model built with a given seed has the same weights as the same
network written by hand.

What nncli knows about a layer type (which arguments it infers, whether it is a block, takes
token ids or a recurrent layer's state) is on its registry entry (model.layers).
"""
from __future__ import annotations

import contextlib
import inspect
import math
from collections import OrderedDict
from collections.abc import Iterator
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from nncli.arguments import (
    accepted_arguments,
    as_argument,
    describe_annotation,
    fits_annotation,
    has_nan,
    signature_of,
    type_hints,
)
from nncli.config import Config
from nncli.config.yamlio import YamlList, YamlMap, line_of, to_plain
from nncli.dynamo_free import skip_disable_wrappers
from nncli.errors import ConfigError, did_you_mean, first_line, is_out_of_memory
from nncli.model.blocks import MERGES
from nncli.model.layers import LAYERS, SIZE_ARGUMENTS, LayerEntry

# The keys of every layer's spec that are not its arguments; a block's own keys (layers, shortcut,
# branches, ...) are on its registry entry.
SPEC_KEYS = {"type", "name", "args", "repeat", "copies", "trainable"}


@dataclass
class LayerPlan:
    """One layer (or block) as it will be built, with what the shape pass learned about it."""

    name: str
    path: str
    type: str
    line: int | None
    entry: LayerEntry
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    children: list[LayerPlan] | None = None  # for blocks
    trainable: bool = True
    depth: int = 0
    input_shape: Any = None  # with the batch dimension; a tuple of shapes for tuple outputs
    output_shape: Any = None
    params: int = 0
    trainable_params: int = 0
    macs: int = 0  # for the whole batch of the shape pass
    activation_bytes: int = 0  # the size of this layer's output (leaves only)

    def walk(self) -> Iterator[LayerPlan]:
        yield self
        for child in self.children or ():
            yield from child.walk()


@dataclass
class ModelPlan:
    """The checked model: its layers, shapes and costs, and the model itself (on `meta`, without
    weights, unless planned on a real device)."""

    input_shape: tuple  # one sample's shape
    batch_size: int
    layers: list[LayerPlan]
    model: nn.Sequential

    @property
    def output_shape(self) -> Any:
        return self.layers[-1].output_shape if self.layers else (self.batch_size, *self.input_shape)

    def walk(self) -> Iterator[LayerPlan]:
        for layer in self.layers:
            yield from layer.walk()


def describe_shape(shape: Any) -> str:
    """[32, 16, 8, 8]; a recurrent layer's (output, state) as '[32, 5, 16] + state'."""
    if isinstance(shape, tuple) and shape and isinstance(shape[0], tuple):
        return f"{list(shape[0])} + state"
    return str(list(shape))


def _shape_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return tuple(_shape_of(v) for v in value if isinstance(v, (torch.Tensor, tuple, list)))
    return ()


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


def _type_key_hint(spec: dict) -> str | None:
    """For `- Linear: {out_features: 10}` (the layer's name as the key): the form nncli reads."""
    if len(spec) != 1:
        return None
    name, arguments = next(iter(spec.items()))
    if not isinstance(name, str) or name not in LAYERS:
        return None
    if isinstance(arguments, dict):
        shown = ", ".join(f"{k}: {to_plain(v)}" for k, v in arguments.items())
        return f"Write {{type: {name}{', ' + shown if shown else ''}}}."
    if isinstance(arguments, list):
        return f"Write {{type: {name}, args: {to_plain(arguments)}}}."
    return f"Write {{type: {name}, ...}} with the layer's arguments as keys."


MAX_LAYERS = 10_000  # layers in one model, blocks' layers and repeated copies counted


class _Planner:
    """Walks the layer specs once, building meta modules and LayerPlans side by side."""

    def __init__(self, config: Config, count_macs: bool, device: torch.device) -> None:
        self.count_macs, self.device = count_macs, device
        self.file = config.source
        self.note = config.set_note("model")  # the file's line is blamed for a layer --set changed
        self.layers_left = MAX_LAYERS  # layers (repeated copies, nested ones included) still allowed

    def fail(self, message: str, line: int | None, where: str, hint: str | None = None) -> ConfigError:
        return ConfigError(message, file=self.file, line=line, key=where,
                           hint=" ".join(filter(None, (hint, self.note))) or None)

    # -- reading specs ------------------------------------------------------------------------

    def items(self, layers: Any, line: int | None, parent: str, noun: str = "layers",
              where: str | None = None) -> list[tuple[str, Any, int | None]]:
        """The forms of `layers:` (a list, or a mapping from name to layer) as (name, spec, line),
        with `repeat:` expanded and each copy's `copies:` changes applied. `noun` is what the items
        are and `where` what holds them, for messages."""
        where = where or parent or "model.layers"
        if isinstance(layers, dict):
            raw = [(str(name), spec, line_of(layers, name), True) for name, spec in layers.items()]
        elif isinstance(layers, list):
            raw = []
            for i, spec in enumerate(layers):
                named = isinstance(spec, dict) and "name" in spec
                if named and not isinstance(spec["name"], (str, int)):
                    raise self.fail(f"name must be a text, got {spec['name']!r}", line_of(spec, "name"),
                                    where)
                raw.append((str(spec["name"]) if named else None, spec, line_of(layers, i), named))
        else:
            raise self.fail(f"expected a list of {noun} or a mapping from name to {noun[:-1]}",
                            line, where)
        if not raw:
            raise self.fail(f"has no {noun}; add at least one", line, where)
        out, seen = [], {}
        for name, spec, spec_line, named in raw:
            repeat = spec.get("repeat", 1) if isinstance(spec, dict) else 1
            if not isinstance(repeat, int) or isinstance(repeat, bool) or repeat < 1:
                raise self.fail(f"repeat must be a positive integer, got {repeat!r}",
                                line_of(spec, "repeat"), where)
            self.layers_left -= repeat
            if self.layers_left < 0:  # before any copy is made: repeat: 100000000 would take hours
                raise self.fail(f"the model has more than {MAX_LAYERS:,} layers (repeat: {repeat:,} here); "
                                "nncli builds models of up to that many",
                                line_of(spec, "repeat") or spec_line, where)

            def where_of(full: str) -> str:  # a copy, for messages about its copies: changes
                return f"{f'{parent}.' if parent else ''}{full} ({spec.get('type')})"

            copies = {}
            if isinstance(spec, dict) and "copies" in spec:
                copies = self.copies_of(spec, repeat, where_of(name if named else str(len(out))))
            for copy in range(repeat):
                if named:
                    full = name if repeat == 1 else f"{name}_{copy}"
                else:
                    full = str(len(out))
                self.check_name(full, spec_line, where)
                if full in seen:
                    raise self.fail(f"layer name '{full}' is used twice (first on line "
                                    f"{seen[full]}); names must be unique", spec_line, where)
                seen[full] = spec_line
                if copy in copies:
                    out.append((full, self.changed_copy(spec, copy, copies[copy], where_of(full)), spec_line))
                else:
                    out.append((full, spec, spec_line))
        return out

    def check_name(self, name: str, line: int | None, where: str) -> None:
        if not name or "." in name:
            raise self.fail(f"layer name '{name}' must be non-empty and contain no '.'", line, where)

    def copies_of(self, spec: dict, repeat: int, where: str) -> dict[int, dict]:
        """A repeated layer's `copies:`, checked: the changes of each copy, by its number."""
        copies, line = spec["copies"], line_of(spec, "copies")
        example = "e.g. copies: {0: {layers.conv1.stride: 2}}"
        if not isinstance(copies, dict) or not copies:
            raise self.fail(f"copies must be a mapping from a copy's number to its changes ({example}), "
                            f"got {to_plain(copies)!r}", line, where)
        out = {}
        for number, changes in copies.items():
            at = line_of(copies, number) or line
            index = int(number) if isinstance(number, str) and number.isdigit() else number
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < repeat:
                made = ("copy 0 only" if repeat == 1
                        else f"copies 0 {'and' if repeat == 2 else 'to'} {repeat - 1}")
                raise self.fail(f"copies: {number!r} is not a copy: repeat: {repeat} makes {made}", at, where)
            if not isinstance(changes, dict) or not changes:
                raise self.fail(f"copies: {index}: expected a mapping from dotted keys (as --set's, "
                                f"relative to this layer) to values ({example}), got {to_plain(changes)!r}",
                                at, where)
            out[index] = changes
        return out

    def changed_copy(self, spec: dict, copy: int, changes: dict, where: str) -> dict:
        """The spec of copy `copy`: the layer's spec with each dotted key of `changes` set (a key
        says where, as `--set` does: `layers.conv1.stride`, `shortcut`, `type`). A value set here
        is blamed on its own line."""
        spec = _fresh_copy(spec)  # YAML aliases share objects: this copy's changes stay its own
        for key, value in changes.items():
            line = line_of(changes, key)
            parts = str(key).split(".")
            if any(not part for part in parts):
                raise self.fail(f"copies: {copy}: '{key}' must be a dotted key like layers.conv1.stride",
                                line, where)
            if parts[0] in ("name", "repeat", "copies"):
                raise self.fail(f"copies: {copy}: '{parts[0]}' is the same for every copy; it cannot "
                                "change per copy", line, where)
            node: Any = spec
            for depth, part in enumerate(parts):
                at = ".".join(parts[:depth]) or "the layer"
                if isinstance(node, list):
                    if not part.isdigit() or int(part) >= len(node):
                        raise self.fail(f"copies: {copy}: '{key}': {at} is a list of {len(node)}; use an "
                                        f"index from 0 to {len(node) - 1}", line, where)
                    index: Any = int(part)
                elif isinstance(node, dict):
                    index = _key_in(node, part)
                    if index is None and depth < len(parts) - 1:
                        names = [str(k) for k in node]
                        raise self.fail(f"copies: {copy}: '{key}': {at} has no key '{part}' (it has: "
                                        f"{', '.join(names)})", line, where, did_you_mean(part, names))
                    index = part if index is None else index
                else:
                    raise self.fail(f"copies: {copy}: '{key}': {at} is {to_plain(node)!r}, which has no "
                                    f"'{part}'", line, where)
                if depth == len(parts) - 1:
                    node[index] = _fresh_copy(value)
                    _set_line(node, index, line)
                    break
                child = node[index]
                if isinstance(child, str) and child in LAYERS:  # a bare layer name is {type: NAME}
                    child = node[index] = _yaml_map({"type": child}, line_of(node, index))
                node = child
        return spec

    def entry_of(self, spec: Any, line: int | None, where: str) -> tuple[str, LayerEntry]:
        if isinstance(spec, str):
            type_name = spec
        elif isinstance(spec, dict):
            if "type" not in spec:
                raise self.fail("a layer mapping needs 'type:' (e.g. {type: Linear, out_features: 10})",
                                line, where, hint=_type_key_hint(spec))
            type_name = spec["type"]
            line = line_of(spec, "type") or line
        else:
            raise self.fail(f"expected a layer type name or a mapping with 'type:', got {spec!r}",
                            line, where)
        if not isinstance(type_name, str):
            raise self.fail(f"type must be a layer name, got {type_name!r}", line, where)
        if type_name in ("ModuleList", "ModuleDict"):
            raise self.fail(f"{type_name} holds modules but has no forward(), so it cannot be a "
                            "layer of a Sequential", line, where,
                            hint="Use {type: Sequential, layers: [...]} for a nested block.")
        try:
            return type_name, LAYERS.get(type_name)
        except ConfigError as err:
            raise self.fail(err.message, line, where, err.hint) from None

    # -- the walk -----------------------------------------------------------------------------

    def plan_sequence(self, layers: Any, line: int | None, parent: str, depth: int, x: Any,
                      prev: tuple[LayerPlan | None, nn.Module | None] = (None, None),
                      ) -> tuple[list[LayerPlan], list[nn.Module], Any]:
        """Layers one after the other; `prev` is the layer before the first (None: the model's input)."""
        plans, modules = [], []
        for name, spec, spec_line in self.items(layers, line, parent):
            plan, module, x = self.plan_layer(name, spec, spec_line, parent, depth, x, prev)
            plans.append(plan)
            modules.append(module)
            prev = (plan, module)
        return plans, modules, x

    def plan_layer(self, name: str, spec: Any, line: int | None, parent: str, depth: int, x: Any,
                   prev: tuple[LayerPlan | None, nn.Module | None]) -> tuple[LayerPlan, nn.Module, Any]:
        """One layer or block named `name` inside `parent`, given `x`: its plan, module and output."""
        path = f"{parent}.{name}" if parent else name
        type_name, entry = self.entry_of(spec, line, path)
        where = f"{path} ({type_name})"
        options = spec if isinstance(spec, dict) else {}
        plan = LayerPlan(name, path, type_name, line, entry, depth=depth,
                         trainable=options.get("trainable", True), input_shape=_shape_of(x))
        if not isinstance(plan.trainable, bool):
            raise self.fail(f"trainable must be true or false, got {plan.trainable!r}",
                            line_of(options, "trainable"), where)
        if entry.is_block:
            module, x = self.plan_block(plan, options, x, where, prev)
        else:
            module, x = self.plan_leaf(plan, options, x, where, *prev)
        plan.output_shape = _shape_of(x)
        plan.params = sum(p.numel() for p in module.parameters())
        if not plan.trainable:
            module.requires_grad_(False)
            for inner in plan.walk():  # a frozen block freezes all it holds
                inner.trainable_params = 0
        plan.trainable_params = sum(p.numel() for p in module.parameters() if p.requires_grad)
        return plan, module, x

    def plan_block(self, plan: LayerPlan, options: dict, x: Any, where: str,
                   prev: tuple[LayerPlan | None, nn.Module | None]) -> tuple[nn.Module, Any]:
        keys = plan.entry.block_keys
        extra = sorted(set(options) - SPEC_KEYS - set(keys), key=str)
        if extra:
            key = extra[0]
            raise self.fail(f"a {plan.type} block takes {', '.join(repr(k) for k in keys)} (and name, "
                            f"repeat, copies, trainable), not '{key}'", line_of(options, key), where,
                            did_you_mean(key, keys) or f"Run `nncli layers {plan.type}` for what each holds.")
        if plan.entry.merges_branches:
            module, x = self.plan_branches(plan, options, x, where, prev)
        else:
            module, x = self.plan_body(plan, options, x, where, prev)
        plan.macs = sum(c.macs for c in plan.children)
        return module, x

    def plan_body(self, plan: LayerPlan, options: dict, x: Any, where: str,
                  prev: tuple[LayerPlan | None, nn.Module | None]) -> tuple[nn.Module, Any]:
        """A Sequential's layers; a Residual's too (its body), then the shortcut, the sum and `post`."""
        if "layers" not in options:
            raise self.fail(f"a {plan.type} block needs 'layers:'", plan.line, where)
        block_in = x
        plan.children, modules, x = self.plan_sequence(options["layers"], line_of(options, "layers"),
                                                       plan.path, plan.depth + 1, x, prev)
        body = OrderedDict((c.name, m) for c, m in zip(plan.children, modules))
        if not plan.entry.adds_input:
            return plan.entry.factory(body), x
        extras: dict[str, Any] = {}
        shortcut, skip = None, block_in
        if "shortcut" in options:
            shortcut, extras["shortcut"], skip = self.plan_path(plan, options, "shortcut", block_in, prev)
            extras["shortcut_name"] = shortcut.name
        self.check_sum(plan, block_in, x, shortcut, skip, where)
        x = x + skip
        if "post" in options:
            post, extras["post"], x = self.plan_path(plan, options, "post", x, (plan, None))
            extras["post_name"] = post.name
        plan.kwargs = {k: v for k, v in extras.items() if k.endswith("_name")}  # which children are which
        return plan.entry.factory(body, **extras), x

    def plan_path(self, block: LayerPlan, options: dict, key: str, x: Any,
                  prev: tuple[LayerPlan | None, nn.Module | None]) -> tuple[LayerPlan, nn.Module, Any]:
        """The path a block's `key` gives (a layer, a list of layers, or {name: ..., layers: [...]}),
        planned as the block's next child, named `key` unless it says `name:`."""
        value, line, where = options[key], line_of(options, key), f"{block.path} ({block.type})"
        name = value.get("name", key) if isinstance(value, dict) else key
        if not isinstance(name, (str, int)) or isinstance(name, bool):
            raise self.fail(f"{key}: name must be a text, got {name!r}", line_of(value, "name"), where)
        name = str(name)
        self.check_name(name, line, where)
        if isinstance(value, dict) and ("repeat" in value or "copies" in value):
            raise self.fail(f"{key}: repeat and copies belong to an item of a list of layers; give {key} "
                            "a list of layers instead", line, where)
        taken = next((c for c in block.children if c.name == name), None)
        if taken is not None:
            raise self.fail(f"layer name '{name}' is used twice (first on line {taken.line}); names must be "
                            f"unique", line, where, hint=f"Rename it: {key}: {{name: ..., ...}}.")
        plan, module, out = self.plan_layer(name, _as_layer_spec(value, line), line, block.path,
                                            block.depth + 1, x, prev)
        block.children.append(plan)
        return plan, module, out

    def check_sum(self, plan: LayerPlan, block_in: Any, out: Any, shortcut: LayerPlan | None, skip: Any,
                  where: str) -> None:
        """A Residual adds its body's output to its shortcut's (or its input): the shapes must match."""
        if isinstance(out, torch.Tensor) and isinstance(skip, torch.Tensor) and out.shape == skip.shape:
            return
        got_in, got_out = _shape_of(block_in), _shape_of(out)
        projection = _projection(got_in, got_out)
        if shortcut is None:
            raise self.fail(f"the block changes the shape from {describe_shape(got_in)} to "
                            f"{describe_shape(got_out)}, but a Residual adds its input to its output, so "
                            "they must match", plan.line, where,
                            hint=f"Give it a shortcut that makes the input that shape: shortcut: {projection}"
                                 if projection else "Make the body keep the shape, or give it a shortcut.")
        raise self.fail(f"its body gives {describe_shape(got_out)} but its shortcut {shortcut.path} gives "
                        f"{describe_shape(_shape_of(skip))} (from the input {describe_shape(got_in)}); a "
                        "Residual adds them, so they must match", shortcut.line, where,
                        hint=f"A shortcut from the input to the body's shape: {projection}" if projection
                        else None)

    def plan_branches(self, plan: LayerPlan, options: dict, x: Any, where: str,
                      prev: tuple[LayerPlan | None, nn.Module | None]) -> tuple[nn.Module, Any]:
        """Each branch on the same input, then the merge of their outputs."""
        if "branches" not in options:
            raise self.fail(f"a {plan.type} block needs 'branches:', e.g. branches: {{conv: [...], skip: "
                            "Identity}", plan.line, where)
        merge, dim = options.get("merge", "concat"), options.get("dim", 0)
        if merge not in MERGES:
            raise self.fail(f"merge must be one of {', '.join(MERGES)}, got {to_plain(merge)!r}",
                            line_of(options, "merge"), where,
                            did_you_mean(merge, MERGES) if isinstance(merge, str) else None)
        if "dim" in options and merge != "concat":
            raise self.fail(f"dim is for merge: concat; a merge by {merge} takes none",
                            line_of(options, "dim"), where)
        if not isinstance(dim, int) or isinstance(dim, bool):
            raise self.fail(f"dim must be an integer (0: the channels, -1: the last dimension), got "
                            f"{to_plain(dim)!r}", line_of(options, "dim"), where)
        plan.children, modules, outputs = [], [], []
        for name, spec, line in self.items(options["branches"], line_of(options, "branches"), plan.path,
                                           noun="branches", where=where):
            child, module, out = self.plan_layer(name, _as_layer_spec(spec, line), line, plan.path,
                                                 plan.depth + 1, x, prev)
            if not isinstance(out, torch.Tensor):
                raise self.fail(f"branch {child.path} gives a tuple (output, hidden state), not a tensor",
                                line, where, hint="End the branch with SequenceOutput or LastStep.")
            plan.children.append(child)
            modules.append(module)
            outputs.append(out)
        self.check_merge(plan, merge, dim, outputs, options, where)
        plan.kwargs = {"merge": merge, "dim": dim}
        module = plan.entry.factory(OrderedDict((c.name, m) for c, m in zip(plan.children, modules)),
                                    **plan.kwargs)
        return module, module.combine(outputs)

    def check_merge(self, plan: LayerPlan, merge: str, dim: int, outputs: list[torch.Tensor], options: dict,
                    where: str) -> None:
        """The branches' outputs against the merge: concat needs every dimension but `dim` equal, add
        equal shapes, mul shapes that broadcast."""
        first = tuple(outputs[0].shape)
        for child, out in zip(plan.children[1:], outputs[1:]):
            shape = tuple(out.shape)
            if merge == "concat":
                at = dim + 1 if dim >= 0 else len(first) + dim
                fits = len(shape) == len(first) and all(a == b for i, (a, b) in enumerate(zip(first, shape))
                                                       if i != at)
                how = (f"concatenated along dim {dim}{' (the channels)' if dim == 0 else ''}: every other "
                       "dimension must match")
            elif merge == "add":
                fits, how = shape == first, "added: add takes equal shapes"
            else:
                fits, how = _broadcasts(first, shape), ("multiplied: mul takes shapes that broadcast (each "
                                                        "dimension equal, or 1 in one of them)")
            if not fits:
                raise self.fail(f"branch {plan.children[0].path} gives {describe_shape(first)} and branch "
                                f"{child.path} gives {describe_shape(shape)}, which cannot be {how}",
                                child.line, where)
        rank = len(first) - 1  # of one sample
        if merge == "concat" and not 0 <= (dim if dim >= 0 else rank + dim) < rank:
            raise self.fail(f"dim {dim} is not a dimension of the samples {list(first[1:])} that the "
                            f"branches give; use 0 to {rank - 1}, or -1 to {-rank}",
                            line_of(options, "dim") or plan.line, where)

    def plan_leaf(self, plan: LayerPlan, options: dict, x: Any, where: str,
                  prev_plan: LayerPlan | None, prev_module: nn.Module | None) -> tuple[nn.Module, Any]:
        entry = plan.entry
        source = f"{prev_plan.path} ({prev_plan.type})" if prev_plan else "the input"
        if isinstance(x, tuple) and not entry.takes_state:
            raise self.fail(f"gets a tuple (output, hidden state) from {source}, not a tensor",
                            plan.line, where,
                            hint="Put SequenceOutput (keep the sequence) or LastStep (keep the last "
                                 "time step) after a recurrent layer.")
        if "layers" in options:
            blocks = [name for name, other in LAYERS.items() if "layers" in other.block_keys]
            raise self.fail(f"only {' and '.join(blocks)} take 'layers:', not {plan.type}",
                            line_of(options, "layers"), where)
        sample_shape = tuple(x[0].shape[1:] if isinstance(x, tuple) else x.shape[1:])
        bound = self.bind_arguments(plan, options, sample_shape, prev_module, source, where)
        plan.args, plan.kwargs = tuple(bound.args), dict(bound.kwargs)
        try:
            with self.device:
                module = entry.factory(*plan.args, **plan.kwargs)
        except Exception as err:  # the layer's own argument checks: report them at its line
            if is_out_of_memory(err):  # not the config's fault: the caller says what to do (exit 1)
                raise
            raise self.fail(f"cannot be built with {self.describe_arguments(plan)}: "
                            f"{first_line(err)}", plan.line, where) from None
        self.check_input_dtype(plan, module, x, source, where)
        module.eval()  # shape pass only: BatchNorm in training mode refuses a batch of one
        counter = _mac_counter() if self.count_macs else None
        try:
            with torch.no_grad(), counter or contextlib.nullcontext():
                out = module(x)
        except Exception as err:
            raise self.fail(f"does not fit its input {describe_shape(_shape_of(x))} from {source}: "
                            f"{first_line(err)}", plan.line, where) from None
        module.train()
        if counter and entry.fused_on_cpu and x.device.type == "cpu":
            plan.macs = _macs_on_meta(module, x)
        else:
            plan.macs = counter.get_total_flops() // 2 if counter else 0
        plan.activation_bytes = _nbytes(out)
        return module, out

    def check_input_dtype(self, plan: LayerPlan, module: nn.Module, x: Any, source: str, where: str) -> None:
        """Token ids (integers) go into an Embedding, numbers into torch's other layers with weights:
        the meta device does not check it, so a mismatch would pass the plan and fail in training.
        (A plugin layer may take either: it is left to say so itself.)"""
        if (not isinstance(x, torch.Tensor) or plan.entry.source == "plugin"
                or not any(p.is_floating_point() for p in module.parameters())):
            return
        takes_indices = plan.entry.takes_token_ids
        if takes_indices and x.is_floating_point():
            raise self.fail(f"takes integer indices (token ids), but gets {str(x.dtype)[6:]} values from "
                            f"{source}", plan.line, where, hint="Set model.input_dtype: int64.")
        if not takes_indices and not x.is_floating_point():
            raise self.fail(f"takes numbers, but gets {str(x.dtype)[6:]} token ids from {source}", plan.line,
                            where,
                            hint="Integer inputs (model.input_dtype: int64) go into an Embedding first.")

    def bind_arguments(self, plan: LayerPlan, options: dict, sample_shape: tuple,
                       prev_module: nn.Module | None, source: str, where: str) -> inspect.BoundArguments:
        """Check the layer's arguments against its signature and fill in the inferred ones."""
        entry = plan.entry
        signature = signature_of(entry.factory)
        args = options.get("args", [])
        if not isinstance(args, list):
            raise self.fail(f"args must be a list of positional arguments, got {args!r}",
                            line_of(options, "args"), where)

        def resolved(given: Any) -> Any:  # `groups: in_channels`: what this layer infers for in_channels
            if isinstance(given, str) and given in entry.infer:
                return entry.infer[given].compute(sample_shape, prev_module, None)
            return as_argument(given)

        kwargs = {k: resolved(v) for k, v in options.items() if k not in SPEC_KEYS}
        args = [resolved(a) for a in args]
        if signature is None:
            return _FreeArguments(args, kwargs)
        params = signature.parameters
        named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        accepted = accepted_arguments(entry.factory)
        for key in kwargs:
            if accepted is not None and key not in accepted:
                raise self.fail(f"{plan.type} has no argument '{key}'; it takes: {', '.join(named)}",
                                line_of(options, key), where, did_you_mean(key, named))
        try:
            bound = signature.bind_partial(*args, **kwargs)
        except TypeError as err:
            raise self.fail(f"{err}; {plan.type} takes: {', '.join(named)}",
                            line_of(options, "args") or plan.line, where) from None
        for arg, rule in entry.infer.items():
            given = bound.arguments.get(arg)
            expected = rule.compute(sample_shape, prev_module, given)
            if arg not in bound.arguments:
                bound.arguments[arg] = expected
            elif as_argument(given) != as_argument(expected) and not (
                    isinstance(given, tuple) and len(given) == 1 and given[0] == expected):
                raise self.fail(f"expects {_plain(given)} {rule.noun}, gets {_plain(expected)} from "
                                f"{source} (input {list(sample_shape)})",
                                line_of(options, arg) or plan.line, where,
                                hint=f"Leave out '{arg}' and nncli fills it in.")
        for arg, value in entry.defaults.items():
            bound.arguments.setdefault(arg, value)
        missing = [n for n, p in params.items() if p.default is p.empty
                   and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in bound.arguments]
        if missing:
            raise self.fail(f"missing required argument{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(repr(m) for m in missing)}", plan.line, where,
                            hint=f"Run `nncli layers {plan.type}` for its arguments.")
        hints = type_hints(entry.factory)
        for arg, value in bound.arguments.items():
            line = line_of(options, arg) or line_of(options, "args") or plan.line
            hint = hints.get(arg)
            kind = params[arg].kind if arg in params else None
            # `*dims: int` annotates each positional item, `**options: int` each keyword value
            items = (list(value) if kind == inspect.Parameter.VAR_POSITIONAL
                     else list(value.values()) if kind == inspect.Parameter.VAR_KEYWORD else [value])
            if has_nan(value):
                raise self.fail(f"argument '{arg}' cannot be NaN, got {_plain(value)!r}", line, where)
            if hint is not None and not all(fits_annotation(item, hint) for item in items):
                named = None  # `groups: in_channel`: a misspelt name of what the layer infers
                if isinstance(value, str) and entry.infer:
                    named = did_you_mean(value, entry.infer) or (f"A size may also name what {plan.type} "
                                                                 f"infers: {', '.join(entry.infer)}.")
                raise self.fail(f"argument '{arg}' expects {describe_annotation(hint)}, "
                                f"got {_plain(value)!r}", line, where, named)
            if arg in SIZE_ARGUMENTS and not _all_positive(value):
                raise self.fail(f"argument '{arg}' is a size and must be positive, got {_plain(value)!r}",
                                line, where)
        return bound

    @staticmethod
    def describe_arguments(plan: LayerPlan) -> str:
        parts = [repr(_plain(a)) for a in plan.args] + [f"{k}={_plain(v)!r}" for k, v in plan.kwargs.items()]
        return f"{plan.type}({', '.join(parts)})"


class _FreeArguments:
    """Stands in for BoundArguments when a factory has no inspectable signature."""

    def __init__(self, args: list, kwargs: dict) -> None:
        self.args, self.kwargs, self.arguments = tuple(args), kwargs, kwargs


def _fresh_copy(value: Any) -> Any:
    """A deep copy of a spec that keeps its lines, and shares nothing (not even what YAML aliases share)."""
    if isinstance(value, dict):
        copy = YamlMap((k, _fresh_copy(v)) for k, v in value.items())
        copy.line, copy.key_lines = getattr(value, "line", 0), dict(getattr(value, "key_lines", {}))
        return copy
    if isinstance(value, list):
        copy = YamlList(_fresh_copy(v) for v in value)
        copy.line, copy.item_lines = getattr(value, "line", 0), list(getattr(value, "item_lines", []))
        return copy
    return value


def _yaml_map(values: dict, line: int | None) -> YamlMap:
    """A mapping made here (not read from the file) whose keys are blamed on `line`."""
    made = YamlMap(values)
    made.line, made.key_lines = line or 0, {k: line or 0 for k in values}
    return made


def _key_in(mapping: dict, part: str) -> Any:
    """The key of `mapping` that a dotted key's `part` names: itself, or the number it spells
    (YAML reads the key `0:` as an integer); None when there is none."""
    if part in mapping:
        return part
    if part.lstrip("-").isdigit() and int(part) in mapping:
        return int(part)
    return None


def _set_line(container: Any, key: Any, line: int | None) -> None:
    if line and isinstance(container, YamlMap):
        container.key_lines = {**getattr(container, "key_lines", {}), key: line}
    elif line and isinstance(container, YamlList) and len(getattr(container, "item_lines", [])) > key:
        container.item_lines[key] = line


def _as_layer_spec(value: Any, line: int | None) -> Any:
    """A block's path as one layer: a list of layers, or a mapping with `layers:` and no type, is a
    Sequential of them."""
    if isinstance(value, list):
        spec = _yaml_map({"type": "Sequential", "layers": value}, line)
        spec.key_lines["layers"] = getattr(value, "line", 0) or line or 0
        return spec
    if isinstance(value, dict) and "type" not in value and "layers" in value:
        spec = _fresh_copy(value)
        spec["type"] = "Sequential"
        _set_line(spec, "type", line)
        return spec
    return value


def _projection(shape_in: Any, shape_out: Any) -> str | None:
    """A shortcut, as YAML, that turns a batch of `shape_in` into `shape_out` when one layer can: a
    Linear when only the features differ, else a 1x1 convolution (with the stride that shrinks the
    input as the body does) and a BatchNorm."""
    if not (isinstance(shape_in, tuple) and isinstance(shape_out, tuple)) or len(shape_in) != len(shape_out) \
            or not all(isinstance(d, int) for d in (*shape_in, *shape_out)):
        return None
    rank = len(shape_in)
    if rank in (2, 3) and shape_in[:-1] == shape_out[:-1]:
        return f"{{type: Linear, out_features: {shape_out[-1]}}}"
    if rank not in (3, 4, 5):
        return None
    sizes = list(zip(shape_in[2:], shape_out[2:]))
    stride = next((s for s in range(1, max(i for i, _ in sizes) + 1)
                   if all((i - 1) // s + 1 == o for i, o in sizes)), None)
    if stride is None:
        return None
    n = rank - 2
    return (f"[{{type: Conv{n}d, out_channels: {shape_out[1]}, kernel_size: 1"
            f"{f', stride: {stride}' if stride > 1 else ''}, bias: false}}, BatchNorm{n}d]")


def _broadcasts(a: tuple, b: tuple) -> bool:
    try:
        torch.broadcast_shapes(a, b)
    except RuntimeError:
        return False
    return True


def _plain(value: Any) -> Any:
    return to_plain(value) if isinstance(value, (list, tuple, dict)) else value


def _all_positive(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, (int, float)):
        return value > 0
    if isinstance(value, (tuple, list)):
        return all(_all_positive(v) for v in value)
    return True


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Layers built inside have weights of `dtype` (float64 inputs: a float64 model)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def input_dtype(config: Config) -> torch.dtype:
    """What the model takes: `model.input_dtype` (float32, float64, or int64 token ids)."""
    return getattr(torch, config["model"]["input_dtype"])


def float_dtype(config: Config) -> torch.dtype:
    """The model's floating-point dtype: its input's, float32 for token ids."""
    dtype = input_dtype(config)
    return dtype if dtype.is_floating_point else torch.float32


def _mac_counter() -> Any:
    """torch's FlopCounterMode (imported when MACs are asked for: it takes a while to import), its
    dispatch run without torch._dynamo (see nncli.dynamo_free): counting compiles nothing."""
    import torch.utils.flop_counter as flop_counter

    skip_disable_wrappers([flop_counter])
    return flop_counter.FlopCounterMode(display=False)


def _macs_on_meta(module: nn.Module, x: torch.Tensor) -> int:
    """A layer's MACs counted on a meta copy of it, where torch decomposes what one CPU kernel does."""
    counter = _mac_counter()
    with torch.no_grad(), counter:
        deepcopy(module).to("meta").eval()(x.to("meta"))
    return counter.get_total_flops() // 2


# The shape pass of a check runs on the CPU for a small model: one whose sample has at most
# CPU_PLAN_SAMPLE numbers (tabular data, the digits, MNIST, CIFAR) and whose pass creates fewer
# than CPU_PLAN_ELEMENTS (its parameters and buffers, and the layers' outputs: 16 MB of float32);
# any other (ResNet-18 at 224x224 already) on the meta device, so that checking never takes real
# memory or time. A larger sample would let one layer's output (a convolution's) be gigabytes
# before the budget could see it.
CPU_PLAN_SAMPLE = 4096
CPU_PLAN_ELEMENTS = 1 << 22


class _OverBudget(BaseException):
    """The shape pass on the CPU would create more than CPU_PLAN_ELEMENTS (a BaseException, so
    that the planner's own `except Exception` does not take it for the layer's error)."""


class _ElementBudget(TorchFunctionMode):
    """Counts the elements of every tensor that torch functions create (the inputs, parameters,
    buffers and outputs of the shape pass), and stops the pass past `budget`."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.left = budget

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs, name = kwargs or {}, getattr(func, "__name__", None)
        if name in _FACTORIES and _requested(args, kwargs) > self.left:
            raise _OverBudget  # before torch allocates it: a 2-trillion-parameter layer is refused here
        if name in _CONVOLUTIONS and _convolution_outputs(args, kwargs) > self.left:
            raise _OverBudget  # before it computes a typo's out_channels: 40960
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and not (args and out is args[0]):  # in-place: nothing new
            self.left -= out.numel()
            if self.left < 0:
                raise _OverBudget
        return out


# torch's functions that allocate a tensor of a size they are given
_FACTORIES = {"empty", "zeros", "ones", "full", "rand", "randn", "randint", "empty_strided"}


# the functions whose output can dwarf their input and weights: out_channels times the input's area
_CONVOLUTIONS = {"conv1d", "conv2d", "conv3d"}


def _convolution_outputs(args: tuple, kwargs: dict) -> int:
    """At most the elements a convolution's output has (stride 1): batch x out_channels x the
    padded input's area."""
    x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
    padding = args[4] if len(args) > 4 else kwargs.get("padding", 0)
    batched = x.dim() == weight.dim()
    spatial = x.shape[2:] if batched else x.shape[1:]
    pads = [0] * len(spatial) if isinstance(padding, str) else (
        [padding] * len(spatial) if isinstance(padding, int) else list(padding))
    return (x.shape[0] if batched else 1) * weight.shape[0] * math.prod(
        size + 2 * pad for size, pad in zip(spatial, pads))


def _requested(args: tuple, kwargs: dict) -> int:
    """The elements a factory call asks for: its `size`, the first list of integers among its
    arguments, or its leading integers (torch.empty(3, 4))."""
    size = kwargs.get("size")
    if size is None:
        size = next((a for a in args if isinstance(a, (tuple, list, torch.Size))), None)
    if size is None:
        size = [a for a in args[:next((i for i, a in enumerate(args) if not isinstance(a, int)), len(args))]]
    try:
        return math.prod(int(d) for d in size)
    except (TypeError, ValueError):
        return 0


def plan_to_check(config: Config, input_shape: tuple | list | None = None, batch_size: int = 1,
                  count_macs: bool = False) -> ModelPlan:
    """The shape pass of `validate`, `summary` and every check before training: on the CPU when the
    model is small (see CPU_PLAN_SAMPLE; about a second faster than the meta device, whose kernels
    torch loads on first use), else on the meta device, which allocates nothing. The plan's
    model has weights only on the CPU, and none of them are trained."""
    shape = input_shape if input_shape is not None else config["model"]["input_shape"]
    small = isinstance(shape, (list, tuple)) and all(isinstance(d, int) for d in shape)
    if not small or math.prod(shape) > CPU_PLAN_SAMPLE:
        return plan_model(config, input_shape, batch_size, count_macs, device="meta")
    try:
        with _ElementBudget(CPU_PLAN_ELEMENTS):
            return plan_model(config, input_shape, batch_size, count_macs, device="cpu")
    except _OverBudget:
        pass
    except (RuntimeError, MemoryError) as err:  # a plugin's layer that allocates beyond the budget's sight
        if not is_out_of_memory(err):
            raise
    return plan_model(config, input_shape, batch_size, count_macs, device="meta")


def plan_model(config: Config, input_shape: tuple | list | None = None, batch_size: int = 1,
               count_macs: bool = False, device: str | torch.device = "meta") -> ModelPlan:
    """Check the model section and run the shape pass, by default on the meta device (no weights
    allocated). On a real device the planned layers are the model, initialised as torch does.

    `count_macs` also counts each layer's multiply-accumulates with torch's FlopCounterMode,
    whose first use costs about a second of imports: `summary` asks for it, training does not."""
    shape = input_shape if input_shape is not None else config["model"]["input_shape"]
    if shape is None:
        raise config.error("missing; give one sample's shape, e.g. input_shape: [1, 8, 8], or a "
                           "data section that tells it", "model", "input_shape")
    shape = tuple(int(d) for d in shape)
    device = torch.device(device)
    planner = _Planner(config, count_macs, device)
    x = torch.zeros(batch_size, *shape, device=device, dtype=input_dtype(config))
    with _default_dtype(float_dtype(config)):
        layers, modules, _ = planner.plan_sequence(config["model"]["layers"], config.line("model", "layers"),
                                                   "", 0, x)
    model = nn.Sequential(OrderedDict((p.name, m) for p, m in zip(layers, modules)))
    return ModelPlan(shape, batch_size, layers, model)

