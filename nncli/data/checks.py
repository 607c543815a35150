"""The data against the model it trains: labels within the output's classes, regression targets
shaped as the output, token ids within the model's Embedding. Run before training (and by
eval and predict on their inputs), so that a mismatch is a config error, not a crash."""
from __future__ import annotations

import torch
from torch import nn

from nncli.config import Config
from nncli.data.load import Data
from nncli.model.layers import LAYERS


def token_id_problem(x: torch.Tensor, model: nn.Module) -> str | None:
    """For token ids (integer inputs): an id outside the model's first Embedding, which would
    stop training (or predict) with torch's IndexError; None when all fit."""
    token_layers = tuple(entry.factory for _, entry in LAYERS.items() if entry.takes_token_ids)
    embedding = next((m for m in model.modules() if isinstance(m, token_layers)), None)
    if x.is_floating_point() or embedding is None or not len(x):
        return None
    low, high, size = int(x.min()), int(x.max()), embedding.num_embeddings
    if low >= 0 and high < size:
        return None
    return (f"token id {low if low < 0 else high} is outside the Embedding's num_embeddings: {size} "
            f"(ids 0 to {size - 1})")


def check_token_ids(data: Data, model: nn.Module, config: Config) -> None:
    """Every token id within the model's Embedding (a memory-mapped file is not read here)."""
    for name, pair in (("training", data.train), ("validation", data.val)):
        if pair is not None and getattr(pair, "mapped_file", None) is None:
            if (problem := token_id_problem(pair.x, model)) is not None:
                raise config.error(f"{name} inputs: {problem}", "data",
                                   hint="Make num_embeddings the size of the vocabulary.")


def check_targets(data: Data, output_shape: tuple, config: Config) -> None:
    """Labels within the output layer's classes; regression targets shaped like the output."""
    for name, pair in (("training", data.train), ("validation", data.val)):
        if pair is None:
            continue
        if pair.y.dtype == torch.long:
            expected = pair.y.dim()  # the output per sample: classes, then the labels' own dims (for maps)
            if len(output_shape) != expected:
                raise config.error(f"the model's output has shape {list(output_shape)} per sample, but "
                                   "class labels need "
                                   f"{'[classes]' if expected == 1 else f'{expected} dimensions'}",
                                   "model", "layers", hint="Flatten before the last Linear layer?")
            classes = output_shape[0] if output_shape else 1
            low, high = int(pair.y.min()), int(pair.y.max())
            if low < 0 or high >= classes:
                raise config.error(f"{name} labels run from {low} to {high}, but the model's output "
                                   f"has {classes} classes (labels 0 to {classes - 1})", "data",
                                   hint="Make the last layer's out_features the number of classes.")
        else:
            if pair.y.dim() == 1 and tuple(output_shape) == (1,):
                pair.y = pair.y[:, None]  # (N,) targets for an (N, 1) output: avoid silent broadcasting
            if tuple(pair.y.shape[1:]) != tuple(output_shape):  # the loss would broadcast, or fail
                labels = pair.y.dim() == 1 and len(output_shape) == 1 and torch.equal(pair.y, pair.y.round())
                raise config.error(f"{name} targets have shape {list(pair.y.shape[1:])} per sample, but "
                                   f"the model's output has shape {list(output_shape)}", "data",
                                   hint="For class labels, use a classification loss "
                                        "(loss: CrossEntropyLoss)."
                                   if labels else "Make the last layer's out_features match the targets.")
