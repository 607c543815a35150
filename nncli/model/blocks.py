"""nncli's own layers: small blocks that a plain `nn.Sequential` lacks.

Each one is an ordinary `nn.Module`, so a model that uses them still saves and loads with plain
PyTorch (import `nncli.model.blocks` first), and each one compiles with `torch.jit.script` and
`torch.export.export`.

(No `from __future__ import annotations` here: TorchScript reads the `Final` attributes and the
forward signatures' annotations as real types.)
"""
from typing import Any, Final, List, Optional, Tuple, Union

import torch
from torch import nn

# What a recurrent layer returns: (output, hidden state), the state a tensor or a tuple (LSTM).
RecurrentOutput = Union[torch.Tensor, Tuple[torch.Tensor, Any]]

MERGES = ("concat", "add", "mul")


class Residual(nn.Sequential):
    """`post(body(x) + shortcut(x))`: the body's layers in order, their output added to the
    shortcut's (the input itself when there is none), then the optional `post` layer.

    The body's layers are the block's own children (`block.0.weight`), then the shortcut, then
    `post`, each under its name: `Residual(conv1, bn1, shortcut=nn.Sequential(...))`, or
    `Residual(OrderedDict(...), shortcut=..., shortcut_name="downsample", post=nn.ReLU())`.
    """

    # which children are which, for a forward that TorchScript compiles (no super() call)
    body_layers: Final[int]
    has_shortcut: Final[bool]
    has_post: Final[bool]

    def __init__(self, *body: nn.Module,
                 shortcut: Optional[nn.Module] = None, post: Optional[nn.Module] = None,
                 shortcut_name: str = "shortcut", post_name: str = "post") -> None:
        super().__init__(*body)
        self.body_layers = len(self)
        self.has_shortcut = shortcut is not None
        self.has_post = post is not None
        if shortcut is not None:
            self.add_module(shortcut_name, shortcut)
        if post is not None:
            self.add_module(post_name, post)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, skip = x, x
        for i, layer in enumerate(self):
            if i < self.body_layers:
                out = layer(out)
            elif i == self.body_layers and self.has_shortcut:
                skip = layer(x)
        out = out + skip
        if self.has_post:
            out = self[-1](out)
        return out


class Branches(nn.Sequential):
    """The same input through every branch (its children, in order), their outputs merged:
    `concat` along `dim` of each sample (0: the channels), `add`, or `mul` (broadcasting, so a
    gate of shape (C, 1, 1) scales every position of a (C, H, W) branch, as in squeeze-and-excitation)."""

    merge: Final[str]
    dim: Final[int]  # one sample's dimension (0: channels; negative counts from the end)

    def __init__(self, *branches: nn.Module, merge: str = "concat",
                 dim: int = 0) -> None:
        if merge not in MERGES:
            raise ValueError(f"merge must be one of {', '.join(MERGES)}, got {merge!r}")
        super().__init__(*branches)
        self.merge = merge
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs: List[torch.Tensor] = []
        for branch in self:
            outputs.append(branch(x))
        return self.combine(outputs)

    def combine(self, outputs: List[torch.Tensor]) -> torch.Tensor:
        """The branches' outputs merged (the shape plan calls it too)."""
        if self.merge == "concat":
            return torch.cat(outputs, dim=self.dim + 1 if self.dim >= 0 else self.dim)
        out = outputs[0]
        for other in outputs[1:]:
            out = out + other if self.merge == "add" else out * other
        return out

    def extra_repr(self) -> str:
        return f"merge={self.merge}" + (f", dim={self.dim}" if self.merge == "concat" else "")


def _batch_dims(dims: Tuple[int, ...]) -> List[int]:
    """Per-sample dimensions as the batch's: 0 -> 1, and negative ones stay as they are."""
    return [d + 1 if d >= 0 else d for d in dims]


class Reshape(nn.Module):
    """Reshape each sample to `shape` (the batch dimension is kept; -1 allowed once)."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.shape = list(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape([x.shape[0]] + self.shape)

    def extra_repr(self) -> str:
        return ", ".join(map(str, self.shape))


class Permute(nn.Module):
    """Reorder each sample's dimensions, e.g. `Permute(1, 0)` turns (C, L) into (L, C)."""

    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = list(dims)
        self.order = [0] + _batch_dims(tuple(dims))  # the batch's dimensions, the batch first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(self.order)

    def extra_repr(self) -> str:
        return ", ".join(map(str, self.dims))


class SequenceOutput(nn.Module):
    """After a recurrent layer: keep the output sequence and drop the hidden state."""

    def forward(self, x: RecurrentOutput) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return x
        return x[0]


class LastStep(nn.Module):
    """After a recurrent layer: keep the output of the last time step, (N, hidden)."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first

    def forward(self, x: RecurrentOutput) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            x = x[0]
        return x[:, -1] if self.batch_first else x[-1]

    def extra_repr(self) -> str:
        return f"batch_first={self.batch_first}"
