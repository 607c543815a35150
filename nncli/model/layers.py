"""The layer registry: every layer class of `torch.nn` by its class name, nncli's own blocks,
and the user's layers added with `register_layer`.

Each entry carries the facts about its layer that nncli needs: which constructor arguments it
can infer from the shape flowing in (`in_channels`, `in_features`, ...), nncli's defaults that
differ from torch's (`batch_first: true`), whether it is a block (the spec keys it takes, such as
`layers:`, and how its paths merge), takes token ids, or takes a recurrent layer's (output, state)
tuple. A new layer is one entry.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nncli.arguments import parameters_of
from nncli.registry import Registry

Shape = tuple  # one sample's shape, without the batch dimension


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
    """A registered layer type, and the facts about it that the shape plan and the data checks use."""

    name: str
    factory: Callable[..., Any]
    category: str
    source: str  # "torch.nn", "nncli" or "plugin"
    infer: dict[str, Inference] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)  # nncli's defaults that differ from torch's
    # a block's own spec keys (beyond name, repeat, copies, trainable), each with what it holds, for
    # the shape plan and `nncli layers`; empty for a layer
    block_keys: dict[str, str] = field(default_factory=dict)
    adds_input: bool = False  # a block whose body is added to its input (or shortcut): shapes must match
    merges_branches: bool = False  # a block whose input goes through each branch, the outputs merged
    takes_token_ids: bool = False  # its input is integer indices (Embedding), numbers otherwise
    takes_state: bool = False  # takes a recurrent layer's (output, state) tuple
    fused_on_cpu: bool = False  # one CPU kernel that torch's flop counter does not see: MACs counted on meta

    @property
    def is_block(self) -> bool:
        return bool(self.block_keys)


# Arguments that are sizes, in every layer that has them: every number in them must be positive.
SIZE_ARGUMENTS = {"in_channels", "out_channels", "kernel_size", "in_features", "out_features",
                  "num_features", "num_channels", "num_groups", "hidden_size", "input_size",
                  "num_layers", "embedding_dim", "num_embeddings", "d_model", "nhead",
                  "dim_feedforward", "embed_dim", "num_heads", "output_size", "stride",
                  "dilation", "normalized_shape", "upscale_factor", "downscale_factor", "groups"}


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
TOKEN_ID_LAYERS = {"Embedding", "EmbeddingBag"}  # they take integer indices (model.input_dtype: int64)
FUSED_ON_CPU = {"RNN", "LSTM", "GRU"}


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

    from nncli.model import blocks

    for name in sorted(dir(nn)):
        obj = getattr(nn, name)
        if (not isinstance(obj, type) or not issubclass(obj, nn.Module) or name in NOT_LAYERS
                or name.startswith(("Lazy", "_")) or issubclass(obj, nn.modules.loss._Loss)):
            continue
        submodule = obj.__module__.rsplit(".", 1)[-1]
        if obj in (nn.RNN, nn.LSTM, nn.GRU):
            obj = _recurrent_factory(obj)
        arguments = set(parameters_of(obj))
        infer = {arg: rule for arg, rule in INFER_BY_ARGUMENT.items() if arg in arguments}
        # nncli's data is batch-first: torch's default (batch_first=False) would read the batch as
        # the sequence, so that recurrent layers and attention mix the samples of a batch
        defaults = {"batch_first": True} if "batch_first" in arguments else {}
        category = CATEGORY_BY_NAME.get(name) or CATEGORY_BY_TORCH_MODULE.get(submodule, "other")
        registry.add(name, LayerEntry(name, obj, category, "torch.nn", infer, defaults,
                                      takes_token_ids=name in TOKEN_ID_LAYERS,
                                      fused_on_cpu=name in FUSED_ON_CPU))
    # a block's keys, with what each holds (`nncli layers Residual` shows them)
    layers = "its layers, a list or a mapping from name to layer, like model.layers"
    residual = {
        "layers": f"the body: {layers}",
        "shortcut": "what the input goes through before it is added (default: nothing): a layer, a list "
                    "of layers, or {name: downsample, layers: [...]} to name it (default name: shortcut)",
        "post": "a layer applied after the sum, e.g. ReLU (named post, or {name: ..., type: ...})",
    }
    branches = {
        "branches": "the paths the input goes through: a mapping from name to a layer or a list of "
                    "layers (Identity: the input itself)",
        "merge": "concat (the default), add, or mul (broadcasting: a gate of shape [C, 1, 1] scales "
                 "each channel)",
        "dim": "concat's dimension of one sample: 0 (the default) is the channels, -1 the last",
    }
    registry.add("Sequential", LayerEntry("Sequential", nn.Sequential, "blocks", "torch.nn",
                                          block_keys={"layers": layers}))
    registry.add("Residual", LayerEntry("Residual", blocks.Residual, "blocks", "nncli", block_keys=residual,
                                        adds_input=True))
    registry.add("Branches", LayerEntry("Branches", blocks.Branches, "blocks", "nncli", block_keys=branches,
                                        merges_branches=True))
    for cls in (blocks.Reshape, blocks.Permute):
        registry.add(cls.__name__, LayerEntry(cls.__name__, cls, "reshape", "nncli"))
    registry.add("SequenceOutput", LayerEntry("SequenceOutput", blocks.SequenceOutput, "reshape", "nncli",
                                              takes_state=True))
    registry.add("LastStep", LayerEntry("LastStep", blocks.LastStep, "reshape", "nncli",
                                        {"batch_first": Inference("batch_first", _batch_first)},
                                        takes_state=True))


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
