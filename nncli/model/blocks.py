"""nncli's own layers: small blocks that a plain `nn.Sequential` lacks.

Each one is an ordinary `nn.Module`, so a model that uses them still saves and loads with plain
PyTorch (import `nncli.blocks` first).
"""
from __future__ import annotations

import torch
from torch import nn


class Residual(nn.Sequential):
    """`x + body(x)`: a Sequential whose input is added to its output (shapes must match)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


class Reshape(nn.Module):
    """Reshape each sample to `shape` (the batch dimension is kept; -1 allowed once)."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return ", ".join(map(str, self.shape))


class Permute(nn.Module):
    """Reorder each sample's dimensions, e.g. `Permute(1, 0)` turns (C, L) into (L, C)."""

    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = tuple(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, *(d + 1 for d in self.dims))

    def extra_repr(self) -> str:
        return ", ".join(map(str, self.dims))


class SequenceOutput(nn.Module):
    """After a recurrent layer: keep the output sequence and drop the hidden state."""

    def forward(self, x: torch.Tensor | tuple) -> torch.Tensor:
        return x[0] if isinstance(x, tuple) else x


class LastStep(nn.Module):
    """After a recurrent layer: keep the output of the last time step, (N, hidden)."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor | tuple) -> torch.Tensor:
        x = x[0] if isinstance(x, tuple) else x
        return x[:, -1] if self.batch_first else x[-1]

    def extra_repr(self) -> str:
        return f"batch_first={self.batch_first}"
