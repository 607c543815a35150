"""Registries: a name in a config becomes an object through one of these.

`LAYERS` holds every layer class of `torch.nn` by its class name, nncli's own blocks, and user
layers added with `register_layer`. Each layer entry also says which of its constructor
arguments nncli can infer from the shape flowing into it (`in_channels`, `in_features`, ...).
The small `Registry` class is shared by losses, optimizers, schedules, metrics and data sources.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nncli.annotations import type_hints, value_kind, wrong_type
from nncli.errors import ConfigError, did_you_mean, first_line
from nncli.yamlio import to_plain

Shape = tuple  # one sample's shape, without the batch dimension


class Registry:
    """Names to objects, with a 'did you mean' error for unknown names."""

    def __init__(self, kind: str, loader: Callable[[Registry], None] | None = None,
                 list_hint: str | None = None) -> None:
        self.kind, self._loader, self._items, self._loaded = kind, loader, {}, loader is None
        self.list_hint = list_hint

    @property
    def a_kind(self) -> str:
        """"an optimizer", "a layer": the kind with its article, for messages."""
        return f"{'an' if self.kind[:1] in 'aeiou' else 'a'} {self.kind}"

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            self._loader(self)

    def add(self, name: str, item: Any) -> Any:
        self._load()  # the built-ins first, so that a user's entry of the same name replaces one
        self._items[name] = item
        return item

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(self._items)

    def items(self) -> list[tuple[str, Any]]:
        self._load()
        return list(self._items.items())

    def get(self, name: str) -> Any:
        """The object for `name`; a ConfigError (to be given a file and line) when unknown."""
        self._load()
        if not isinstance(name, str):
            raise ConfigError(f"expected {self.a_kind} name, got {value_kind(name)}", hint=self.list_hint)
        if name not in self._items:
            hint = did_you_mean(name, self._items) or self.list_hint
            raise ConfigError(f"unknown {self.kind} '{name}'", hint=hint)
        return self._items[name]


# --- shape inference -------------------------------------------------------------------------

@dataclass(frozen=True)
class Inference:
    """How to fill one constructor argument from the input shape (and the layer before)."""

    noun: str  # for messages: "expects 64 <noun>, gets 32"
    compute: Callable[[Shape, Any, Any], Any]  # (input shape, previous module, given value) -> value


def _channels(shape: Shape, prev: Any, given: Any) -> int:
    return shape[0]


def _features(shape: Shape, prev: Any, given: Any) -> int:
    return shape[-1]


def _trailing(shape: Shape, prev: Any, given: Any) -> Any:
    if isinstance(given, (list, tuple)) and 0 < len(given) <= len(shape):
        return tuple(shape[-len(given):])
    return shape[-1]


def _batch_first(shape: Shape, prev: Any, given: Any) -> bool:
    return getattr(prev, "batch_first", True)


# Argument names whose meaning is the same in every torch.nn layer that has them.
INFER_BY_ARGUMENT = {
    "in_channels": Inference("input channels", _channels),
    "num_features": Inference("features (channels)", _channels),
    "num_channels": Inference("channels", _channels),
    "in_features": Inference("input features", _features),
    "input_size": Inference("input features", _features),
    "normalized_shape": Inference("as the normalized shape", _trailing),
    "d_model": Inference("features (d_model)", _features),
    "embed_dim": Inference("features (embed_dim)", _features),
}


# --- layers ----------------------------------------------------------------------------------

@dataclass
class LayerEntry:
    """A registered layer type."""

    name: str
    factory: Callable[..., Any]
    category: str
    source: str  # "torch.nn", "nncli" or "plugin"
    infer: dict[str, Inference] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)  # nncli's defaults that differ from torch's
    is_block: bool = False  # takes `layers:` (Sequential, Residual)


CATEGORY_BY_TORCH_MODULE = {
    "conv": "convolution", "pooling": "pooling", "batchnorm": "normalization",
    "instancenorm": "normalization", "normalization": "normalization", "activation": "activation",
    "linear": "linear", "dropout": "dropout", "rnn": "recurrent", "sparse": "embedding",
    "transformer": "transformer", "padding": "padding", "flatten": "reshape",
    "pixelshuffle": "reshape", "upsampling": "reshape", "channelshuffle": "reshape",
    "fold": "reshape", "distance": "distance",
}
CATEGORY_ORDER = ["convolution", "pooling", "normalization", "activation", "linear", "dropout",
                  "recurrent", "embedding", "transformer", "padding", "reshape", "distance",
                  "blocks", "other", "plugins"]
NOT_LAYERS = {"Module", "Container", "ModuleList", "ModuleDict", "ParameterList",
              "ParameterDict", "Sequential",
              # wrappers and abstract bases, not layers: DataParallel wraps a whole model
              # (`parallel: dp` does that), RNNBase / RNNCellBase need a `mode` and have no forward
              "DataParallel", "RNNBase", "RNNCellBase"}
# Layers whose torch.nn source file does not say what they are.
CATEGORY_BY_NAME = {"MultiheadAttention": "transformer"}


def _argument_names(factory: Callable[..., Any]) -> set[str]:
    try:
        return set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return set()


def _recurrent_factory(cls: type) -> Callable[..., Any]:
    """`nn.RNN`, `nn.LSTM` and `nn.GRU` declare only (*args, **kwargs): a factory that builds the
    real class but shows the signature they document, so that arguments can be checked, `input_size`
    inferred and `batch_first` defaulted like any other layer's."""
    import torch.nn as nn

    base = inspect.signature(nn.RNNBase).parameters
    params = [p for n, p in base.items() if n != "mode" and not (n == "proj_size" and cls is not nn.LSTM)]
    if cls is nn.RNN:  # RNN(input_size, hidden_size, num_layers=1, nonlinearity='tanh', bias=True, ...)
        params.insert(3, inspect.Parameter("nonlinearity", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                           default="tanh", annotation=str))

    def factory(*args: Any, **kwargs: Any) -> Any:
        return cls(*args, **kwargs)

    factory.__signature__ = inspect.Signature(params)
    factory.__annotations__ = {p.name: p.annotation for p in params if p.annotation is not p.empty}
    factory.__name__ = factory.__qualname__ = cls.__name__
    factory.__doc__, factory.__module__ = cls.__doc__, cls.__module__
    return factory


def _load_builtin_layers(registry: Registry) -> None:
    import torch.nn as nn

    from nncli import blocks

    for name in sorted(dir(nn)):
        obj = getattr(nn, name)
        if (not isinstance(obj, type) or not issubclass(obj, nn.Module) or name in NOT_LAYERS
                or name.startswith(("Lazy", "_")) or issubclass(obj, nn.modules.loss._Loss)):
            continue
        submodule = obj.__module__.rsplit(".", 1)[-1]
        if obj in (nn.RNN, nn.LSTM, nn.GRU):
            obj = _recurrent_factory(obj)
        arguments = _argument_names(obj)
        infer = {arg: rule for arg, rule in INFER_BY_ARGUMENT.items() if arg in arguments}
        # nncli's data is batch-first: torch's default (batch_first=False) would read the batch as
        # the sequence, so that recurrent layers and attention mix the samples of a batch
        defaults = {"batch_first": True} if "batch_first" in arguments else {}
        category = CATEGORY_BY_NAME.get(name) or CATEGORY_BY_TORCH_MODULE.get(submodule, "other")
        registry.add(name, LayerEntry(name, obj, category,
                                      "torch.nn", infer, defaults))
    registry.add("Sequential", LayerEntry("Sequential", nn.Sequential, "blocks", "torch.nn", is_block=True))
    registry.add("Residual", LayerEntry("Residual", blocks.Residual, "blocks", "nncli", is_block=True))
    for cls in (blocks.Reshape, blocks.Permute, blocks.SequenceOutput):
        registry.add(cls.__name__, LayerEntry(cls.__name__, cls, "reshape", "nncli"))
    registry.add("LastStep", LayerEntry("LastStep", blocks.LastStep, "reshape", "nncli",
                                        {"batch_first": Inference("batch_first", _batch_first)}))


LAYERS = Registry("layer", _load_builtin_layers, "Run `nncli layers` to list them.")


def register_layer(factory: Callable[..., Any] | None = None, *, name: str | None = None,
                   category: str = "plugins",
                   infer: dict[str, int | Callable[[Shape], Any]] | None = None) -> Any:
    """Register a user layer so configs can name it. Usable as `@register_layer` or
    `@register_layer(infer={"in_feature": -1})`.

    `infer` maps a constructor argument to the input dimension it equals (an index into one
    sample's shape: 0 for channels, -1 for features) or to a function of that shape.
    """
    def add(factory: Callable[..., Any]) -> Callable[..., Any]:
        rules = {}
        for arg, how in (infer or {}).items():
            if isinstance(how, int):
                rules[arg] = Inference(f"(dimension {how} of the input)",
                                       lambda shape, prev, given, i=how: shape[i])
            else:
                rules[arg] = Inference("(inferred from the input)",
                                       lambda shape, prev, given, f=how: f(shape))
        LAYERS.add(name or factory.__name__,
                   LayerEntry(name or factory.__name__, factory, category, "plugin", rules))
        return factory

    return add(factory) if factory is not None else add


def load_plugins(plugins: list[str], base_dir: Path, error: Callable[..., ConfigError]) -> list[str]:
    """Import each plugin (a .py file relative to `base_dir`, or a module name) once; return what
    was imported: each file's resolved path, or the module's name."""
    imported = []
    for i, plugin in enumerate(plugins):
        try:
            if plugin.endswith(".py"):
                path = (base_dir / plugin).resolve()
                if not path.is_file():
                    raise error(f"plugin file {plugin} not found in {base_dir}", "plugins", i)
                imported.append(str(path))
                module_name = f"nncli_plugin_{path.stem}_{abs(hash(str(path)))}"
                if module_name in sys.modules:
                    continue
                spec = importlib.util.spec_from_file_location(module_name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[module_name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[module_name]
                    raise
            else:
                importlib.import_module(plugin)
                imported.append(plugin)
        except ConfigError:
            raise
        except SystemExit as err:  # else the command would end there, with the plugin's status
            raise error(f"plugin '{plugin}' called sys.exit({err.code!r}) while being imported; a plugin "
                        "defines and registers layers and losses", "plugins", i,
                        hint="Remove the call, or put the script part of the file under "
                             "if __name__ == '__main__':.") from None
        except ModuleNotFoundError as err:
            if plugin.endswith(".py") or err.name != plugin.split(".")[0]:  # the plugin's own import failed
                raise error(f"plugin '{plugin}' raised ModuleNotFoundError: {err}", "plugins", i,
                            hint=f"Install {err.name}, or remove its import from the plugin.") from None
            raise error(f"cannot import plugin '{plugin}': {err}", "plugins", i,
                        hint="Give a .py file or the name of an installed module.") from None
        except Exception as err:  # a plugin's own bug: say which plugin and what it raised
            raise error(f"plugin '{plugin}' raised {type(err).__name__}: {err}", "plugins", i) from None
    return imported


def accepted_arguments(factory: Callable[..., Any]) -> list[str] | None:
    """The keyword arguments `factory` takes, or None when it takes any (**kwargs) or is opaque."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return None
    return [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def required_arguments(factory: Callable[..., Any]) -> list[str]:
    """The arguments `factory` must be given (no default), in order; [] when it is opaque."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return []
    return [n for n, p in params.items() if p.default is p.empty and n != "self"
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def create(registry: Registry, spec: str | dict, error: Callable[..., ConfigError], *where: Any,
           positional: tuple = (), reserved: tuple[str, ...] = (), defaults: dict | None = None) -> Any:
    """Build `registry[spec.type](*positional, **spec-keywords)`, checking the keywords first.

    `spec` is a name or a mapping with `type:` and keyword arguments; keys in `reserved` are
    nncli's own (e.g. an optimizer's `groups`) and are not passed on. Errors point at `where`.
    """
    name = spec if isinstance(spec, str) else spec.get("type")
    if name is None:
        raise error(f"needs 'type:' naming {registry.a_kind}", *where)
    try:
        factory = registry.get(name)
    except ConfigError as err:
        raise error(err.message, *where, *(() if isinstance(spec, str) else ("type",)),
                    hint=err.hint) from None
    kwargs = {k: as_argument(v) for k, v in spec.items() if k != "type" and k not in reserved} \
        if isinstance(spec, dict) else {}
    kwargs = {**(defaults or {}), **kwargs}
    accepted = accepted_arguments(factory)
    settable = [a for a in accepted or () if a != "self"][len(positional):]  # not the optimizer, say
    for key in kwargs:
        if accepted is not None and key not in accepted:
            raise error(f"{name} has no argument '{key}'; it takes: {', '.join(settable)}", *where, key,
                        hint=did_you_mean(key, settable))
    hints = type_hints(factory)
    for key, value in kwargs.items():
        if (problem := wrong_type(name, key, to_plain(value), hints)) is not None:
            raise error(problem, *where, key)
    missing = required_arguments(factory)[len(positional):]
    missing = [m for m in missing if m not in kwargs]
    if missing:
        raise error(f"{name} needs {', '.join(missing)}", *where,
                    hint=f"e.g. {{type: {name}, {missing[0]}: ...}}")
    try:
        return factory(*positional, **kwargs)
    except Exception as err:  # the class's own argument checks, whatever they raise
        given = f" with {', '.join(f'{k}={v!r}' for k, v in kwargs.items())}" if kwargs else ""
        raise error(f"{name} cannot be built{given}: {first_line(err)}", *where) from None


def as_argument(value: Any) -> Any:
    """A YAML value as a constructor argument: lists become tuples, what torch stores
    (kernel_size=(3, 3), betas=(0.9, 0.999)); mappings become plain dicts."""
    if isinstance(value, (list, tuple)):
        return tuple(as_argument(v) for v in value)
    if isinstance(value, dict):
        return {k: as_argument(v) for k, v in value.items()}
    return value
