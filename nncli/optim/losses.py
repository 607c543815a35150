"""The loss: every loss of `torch.nn` by class name, and the user's own (`register_loss`).

Each registry entry says whether its targets are class labels (CrossEntropyLoss's): the labels
are then checked, made integers, and `accuracy` is the default metric.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nncli.arguments import create
from nncli.config import Config
from nncli.errors import first_line
from nncli.model.plan import float_dtype
from nncli.registry import Registry


@dataclass(frozen=True)
class LossEntry:
    factory: Callable[..., nn.Module]
    class_labels: bool = False  # its targets are class indices


CLASS_LABEL_LOSSES = {"CrossEntropyLoss", "NLLLoss", "MultiMarginLoss"}


def _load_losses(registry: Registry) -> None:
    for name in dir(nn):
        obj = getattr(nn, name)
        if isinstance(obj, type) and issubclass(obj, nn.modules.loss._Loss) and not name.startswith("_"):
            registry.add(name, LossEntry(obj, name in CLASS_LABEL_LOSSES))


LOSSES = Registry("loss", _load_losses)


def register_loss(factory: Callable[..., nn.Module] | None = None, *, name: str | None = None,
                  class_indices: bool = False) -> Any:
    """Register a user loss so configs can name it (`loss: MyLoss`). Usable as `@register_loss` or
    `@register_loss(class_indices=True)` for a loss whose targets are class labels, as
    CrossEntropyLoss's (the labels are then checked, and accuracy is the default metric)."""
    def add(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        LOSSES.add(name or factory.__name__, LossEntry(factory, class_indices))
        return factory

    return add(factory) if factory is not None else add


def loss_name(config: Config) -> str:
    """The loss's type, "" when not given as a name (create_loss says what is wrong)."""
    loss = config["loss"]
    name = loss if isinstance(loss, str) else loss.get("type", "")
    return name if isinstance(name, str) else ""


def takes_class_labels(config: Config) -> bool:
    """Whether the config's loss takes class labels as its targets (an unknown loss does not)."""
    name = loss_name(config)
    return name in LOSSES and LOSSES.get(name).class_labels


# Loss arguments that torch takes as tensors (class weights); YAML gives them as lists.
TENSOR_ARGUMENTS = {"weight", "pos_weight"}


def create_loss(config: Config) -> nn.Module:
    spec = config["loss"]
    if isinstance(spec, dict):
        spec = {key: _as_tensor(value, config, key)
                if key in TENSOR_ARGUMENTS and value is not None else value
                for key, value in spec.items()}
    loss = create(LOSSES, spec, config.error, "loss")
    if getattr(loss, "reduction", None) == "none":
        raise config.error("reduction 'none' gives a loss per sample, but training steps on one number "
                           "per batch", "loss", "reduction", hint="Use reduction: mean or sum.")
    return loss


def _as_tensor(value: Any, config: Config, key: str) -> torch.Tensor:
    """A number or a list of numbers as a tensor of the model's float dtype (float64 models too)."""
    try:
        if isinstance(value, (bool, str, dict)):
            raise TypeError
        return torch.tensor(value, dtype=float_dtype(config))
    except (TypeError, ValueError):
        raise config.error(f"expected a number or a list of numbers, got {value!r}", "loss", key) from None


def check_loss_computes(loss_fn: nn.Module, config: Config, output_shape: tuple,
                        targets: torch.Tensor) -> None:
    """Compute the loss once, on zeros shaped as the model's output and two of the targets, on the
    CPU: settings that fail only then (reduction: avg, label_smoothing: 2) are config errors
    before training, not a crash in its first step."""
    output = torch.zeros(min(len(targets), 2), *output_shape, dtype=float_dtype(config))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # said once in training, not here too
            loss_fn.cpu()(output, targets[:2].cpu())
    except Exception as err:
        raise config.error(f"{loss_name(config)} fails when computed (on zeros shaped as the model's output, "
                           f"{list(output_shape)}, and two targets): {first_line(err)}", "loss") from None
