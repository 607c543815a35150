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
from nncli.config.yamlio import line_of, to_plain
from nncli.dynamo_free import skip_disable_wrappers
from nncli.errors import ConfigError, did_you_mean, first_line, is_out_of_memory
from nncli.model.layers import LAYERS, SIZE_ARGUMENTS, LayerEntry

SPEC_KEYS = {"type", "name", "args", "repeat", "layers", "trainable"}


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

    def items(self, layers: Any, line: int | None, where: str) -> list[tuple[str, Any, int | None]]:
        """The three forms of `layers:` as (name, spec, line), with `repeat:` expanded."""
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
            raise self.fail("expected a list of layers or a mapping from name to layer",
                            line, where)
        if not raw:
            raise self.fail("has no layers; add at least one", line, where)
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
            for copy in range(repeat):
                if named:
                    full = name if repeat == 1 else f"{name}_{copy}"
                else:
                    full = str(len(out))
                if not full or "." in full:
                    raise self.fail(f"layer name '{full}' must be non-empty and contain no '.'",
                                    spec_line, where)
                if full in seen:
                    raise self.fail(f"layer name '{full}' is used twice (first on line "
                                    f"{seen[full]}); names must be unique", spec_line, where)
                seen[full] = spec_line
                out.append((full, spec, spec_line))
        return out

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

    def plan_sequence(self, layers: Any, line: int | None, parent: str, depth: int,
                      x: Any) -> tuple[list[LayerPlan], list[nn.Module], Any]:
        plans, modules, prev_plan, prev_module = [], [], None, None
        for name, spec, spec_line in self.items(layers, line, parent or "model.layers"):
            path = f"{parent}.{name}" if parent else name
            type_name, entry = self.entry_of(spec, spec_line, path)
            where = f"{path} ({type_name})"
            options = spec if isinstance(spec, dict) else {}
            plan = LayerPlan(name, path, type_name, spec_line, entry, depth=depth,
                             trainable=options.get("trainable", True), input_shape=_shape_of(x))
            if not isinstance(plan.trainable, bool):
                raise self.fail(f"trainable must be true or false, got {plan.trainable!r}",
                                line_of(options, "trainable"), where)
            if entry.is_block:
                module, x = self.plan_block(plan, options, x, where)
            else:
                module, x = self.plan_leaf(plan, options, x, where, prev_plan, prev_module)
            plan.output_shape = _shape_of(x)
            plan.params = sum(p.numel() for p in module.parameters())
            if not plan.trainable:
                module.requires_grad_(False)
                for inner in plan.walk():  # a frozen block freezes all it holds
                    inner.trainable_params = 0
            plan.trainable_params = sum(p.numel() for p in module.parameters() if p.requires_grad)
            plans.append(plan)
            modules.append(module)
            prev_plan, prev_module = plan, module
        return plans, modules, x

    def plan_block(self, plan: LayerPlan, options: dict, x: Any, where: str) -> tuple[nn.Module, Any]:
        extra = set(options) - SPEC_KEYS
        if extra:
            key = sorted(extra)[0]
            raise self.fail(f"a {plan.type} block takes only 'layers' (and name, repeat, "
                            f"trainable), not '{key}'", line_of(options, key), where)
        if "layers" not in options:
            raise self.fail(f"a {plan.type} block needs 'layers:'", plan.line, where)
        block_in = x
        plan.children, modules, x = self.plan_sequence(options["layers"], line_of(options, "layers"),
                                                       plan.path, plan.depth + 1, x)
        module = plan.entry.factory(OrderedDict((c.name, m) for c, m in zip(plan.children, modules)))
        if plan.entry.adds_input:
            if not isinstance(x, torch.Tensor) or x.shape != block_in.shape:
                raise self.fail(f"the block changes the shape from {describe_shape(_shape_of(block_in))} "
                                f"to {describe_shape(_shape_of(x))}, but a Residual adds its input to "
                                "its output, so they must match", plan.line, where)
        plan.macs = sum(c.macs for c in plan.children)
        return module, x

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
            raise self.fail(f"only Sequential and Residual take 'layers:', not {plan.type}",
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
        kwargs = {k: as_argument(v) for k, v in options.items() if k not in SPEC_KEYS}
        args = options.get("args", [])
        if not isinstance(args, list):
            raise self.fail(f"args must be a list of positional arguments, got {args!r}",
                            line_of(options, "args"), where)
        args = [as_argument(a) for a in args]
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
                raise self.fail(f"argument '{arg}' expects {describe_annotation(hint)}, "
                                f"got {_plain(value)!r}", line, where)
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


# A model whose shape pass creates fewer elements than this (its parameters and buffers, and the
# outputs of one batch's forward pass: 256 MB of float32) is planned on the CPU to be checked.
CPU_PLAN_ELEMENTS = 1 << 26


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
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in _FACTORIES and _requested(args, kwargs) > self.left:
            raise _OverBudget  # before torch allocates it: a 2-trillion-parameter layer is refused here
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and not (args and out is args[0]):  # in-place: nothing new
            self.left -= out.numel()
            if self.left < 0:
                raise _OverBudget
        return out


# torch's functions that allocate a tensor of a size they are given
_FACTORIES = {"empty", "zeros", "ones", "full", "rand", "randn", "randint", "empty_strided"}


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
    model is small (under CPU_PLAN_ELEMENTS; about a second faster than the meta device, whose
    kernels torch loads on first use), else on the meta device, which allocates nothing. The
    plan's model has weights only on the CPU, and none of them are trained."""
    try:
        with _ElementBudget(CPU_PLAN_ELEMENTS):
            return plan_model(config, input_shape, batch_size, count_macs, device="cpu")
    except _OverBudget:
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

