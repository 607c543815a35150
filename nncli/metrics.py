"""Validation metrics, accumulated on the device and read once at the end of an evaluation.

Each metric is a small class with `update(output, target)` (no host synchronisation) and
`compute() -> float`. Names in the config: accuracy, top<k> (e.g. top5), mae, rmse, r2.
"""
from __future__ import annotations

import re

import torch

from nncli.annotations import value_kind
from nncli.errors import ConfigError, did_you_mean


class Metric:
    """Sums kept as device tensors; `compute` turns them into one float."""

    higher_is_better = True

    def __init__(self, device: torch.device) -> None:
        self.total = torch.zeros((), device=device, dtype=torch.float64)
        self.count = torch.zeros((), device=device, dtype=torch.float64)

    def compute(self) -> float:
        return float(self.total / self.count.clamp(min=1))

    def sums(self) -> list[torch.Tensor]:
        """The running sums, to be added across processes under DDP."""
        return [self.total, self.count]


class Accuracy(Metric):
    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        self.total += (output.argmax(-1) == target).sum()
        self.count += target.numel()


class TopK(Metric):
    def __init__(self, device: torch.device, k: int) -> None:
        super().__init__(device)
        self.k = k

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        top = output.topk(min(self.k, output.shape[-1]), dim=-1).indices
        self.total += (top == target.unsqueeze(-1)).any(-1).sum()
        self.count += target.numel()


class MAE(Metric):
    higher_is_better = False

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        self.total += (output - target.reshape(output.shape)).abs().sum()
        self.count += output.numel()


class RMSE(Metric):
    higher_is_better = False

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        self.total += ((output - target.reshape(output.shape)) ** 2).sum()
        self.count += output.numel()

    def compute(self) -> float:
        return super().compute() ** 0.5


class R2(Metric):
    """1 - SSE / SST over all outputs (targets' variance taken over the whole evaluation)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.sse, self.sum, self.sum_sq = (torch.zeros((), device=device, dtype=torch.float64) for _ in range(3))

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        target = target.reshape(output.shape).double()
        self.sse += ((output.double() - target) ** 2).sum()
        self.sum += target.sum()
        self.sum_sq += (target ** 2).sum()
        self.count += target.numel()

    def sums(self) -> list[torch.Tensor]:
        return [self.sse, self.sum, self.sum_sq, self.count]

    def compute(self) -> float:
        n = self.count.clamp(min=1)
        sst = self.sum_sq - self.sum ** 2 / n
        return float(1 - self.sse / sst) if float(sst) > 0 else float("nan")


METRICS = {"accuracy": Accuracy, "mae": MAE, "rmse": RMSE, "r2": R2}
TOPK = re.compile(r"^top([1-9]\d*)$")


def check_metric_name(name: str) -> None:
    if not isinstance(name, str):
        raise ConfigError(f"expected a metric name ({', '.join(METRICS)}, top<k>), got {value_kind(name)}")
    if name not in METRICS and not TOPK.match(name):
        raise ConfigError(f"unknown metric '{name}'; expected one of: {', '.join(METRICS)}, top<k> "
                          "(e.g. top5)", hint=did_you_mean(name, METRICS))


def create_metric(name: str, device: torch.device) -> Metric:
    check_metric_name(name)
    if (match := TOPK.match(name)):
        return TopK(device, int(match.group(1)))
    return METRICS[name](device)


def higher_is_better(name: str) -> bool:
    """For early stopping and best.pt: losses go down, accuracies go up."""
    metric = name.removeprefix("val_").removeprefix("train_")
    if metric == "loss":
        return False
    return METRICS.get(metric, Accuracy).higher_is_better
