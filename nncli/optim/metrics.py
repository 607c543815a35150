"""Validation metrics, accumulated on the device and read once at the end of an evaluation.

Each metric is a small class with `update(output, target)` (no host synchronisation) and
`compute() -> float`. Names in the config: accuracy, top<k> (e.g. top5), mae, rmse, r2. The
facts about each are class attributes: whether higher is better (for best.pt and early stopping)
and whether it scores class labels or regression targets.
"""
from __future__ import annotations

import re

import torch

from nncli.config import Config
from nncli.config.schema import has_validation
from nncli.errors import ConfigError, did_you_mean, value_kind
from nncli.optim.losses import loss_name


class Metric:
    """Sums kept as device tensors; `compute` turns them into one float."""

    higher_is_better = True
    for_classification = True  # scores class labels (else regression targets)

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
    for_classification = False

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        self.total += (output - target.reshape(output.shape)).abs().sum()
        self.count += output.numel()


class RMSE(Metric):
    higher_is_better = False
    for_classification = False

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        self.total += ((output - target.reshape(output.shape)) ** 2).sum()
        self.count += output.numel()

    def compute(self) -> float:
        return super().compute() ** 0.5


class R2(Metric):
    """scikit-learn's `r2_score`: for each output, 1 - SSE / SST (its targets' spread about their
    mean over the whole evaluation), then the plain mean over the outputs (multioutput=
    "uniform_average"); an output whose targets are all equal scores 1 when predicted exactly,
    else 0 (force_finite). Pooling the outputs instead would let the widest one decide."""

    for_classification = False

    def __init__(self, device: torch.device, outputs: int = 1) -> None:
        super().__init__(device)
        self.sse, self.sum, self.sum_sq = (torch.zeros(outputs, device=device, dtype=torch.float64)
                                           for _ in range(3))

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        output = output.double().reshape(len(output), -1)  # one column per output
        target = target.double().reshape(output.shape)
        self.sse += ((output - target) ** 2).sum(0)
        self.sum += target.sum(0)
        self.sum_sq += (target ** 2).sum(0)
        self.count += len(target)

    def sums(self) -> list[torch.Tensor]:
        return [self.sse, self.sum, self.sum_sq, self.count]

    def compute(self) -> float:
        if not self.count:
            return float("nan")
        sst = self.sum_sq - self.sum ** 2 / self.count
        constant = sst <= 1e-12 * self.sum_sq  # all equal, up to rounding
        per_output = torch.where(constant, (self.sse == 0).double(),
                                 1 - self.sse / torch.where(constant, 1, sst))
        return float(per_output.mean())


class ClassAccuracy(Metric):
    """Each class's accuracy: the share of its samples predicted as it (`nncli eval`'s per-class
    results). Not a name for `metrics:`: it gives a number per class, read by `accuracies`."""

    def __init__(self, device: torch.device, classes: int) -> None:
        super().__init__(device)
        self.correct, self.count = (torch.zeros(classes, device=device, dtype=torch.float64)
                                    for _ in range(2))

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        target = target.reshape(-1)  # the class dimension is the output's first after the batch's
        hit = (output.argmax(1).reshape(-1) == target).double()
        self.count.index_add_(0, target, torch.ones_like(hit))  # no host synchronisation, unlike bincount
        self.correct.index_add_(0, target, hit)

    def sums(self) -> list[torch.Tensor]:
        return [self.correct, self.count]

    def accuracies(self) -> list[tuple[int, float | None]]:
        """(samples, accuracy) per class; None for a class without samples."""
        return [(int(n), c / n if n else None) for c, n in zip(self.correct.tolist(), self.count.tolist())]


METRICS = {"accuracy": Accuracy, "mae": MAE, "rmse": RMSE, "r2": R2}
TOPK = re.compile(r"^top([1-9]\d*)$")


def check_metric_name(name: str) -> None:
    if not isinstance(name, str):
        raise ConfigError(f"expected a metric name ({', '.join(METRICS)}, top<k>), got {value_kind(name)}")
    if name not in METRICS and not TOPK.match(name):
        raise ConfigError(f"unknown metric '{name}'; expected one of: {', '.join(METRICS)}, top<k> "
                          "(e.g. top5)", hint=did_you_mean(name, METRICS))


def metric_class(name: str) -> type[Metric]:
    return TopK if TOPK.match(name) else METRICS[name]


def check_metrics(config: Config, classifier: bool) -> None:
    """The metric names exist and fit the loss's targets (class labels or not), and early stopping
    follows a recorded one."""
    for i, name in enumerate(config["metrics"]):
        try:
            check_metric_name(name)
        except ConfigError as err:
            raise config.error(err.message, "metrics", i, hint=err.hint) from None
        if metric_class(name).for_classification != classifier:
            kind = "class labels" if classifier else "regression targets"
            raise config.error(f"metric '{name}' does not apply to {kind} ({loss_name(config)})",
                               "metrics", i,
                               hint="Classification: accuracy, top<k>. Regression: mae, rmse, r2.")
    early = config["train"]["early_stop"]
    if early:
        known = recorded_metrics(config)
        if early["metric"] not in known:
            raise config.error(f"metric '{early['metric']}' is not recorded; expected one of: "
                               f"{', '.join(known)}", "train", "early_stop", "metric")


def create_metric(name: str, device: torch.device, outputs: int = 1) -> Metric:
    """The metric `name`, for a model with `outputs` numbers per sample (r2 scores each one)."""
    check_metric_name(name)
    if (match := TOPK.match(name)):
        return TopK(device, int(match.group(1)))
    if name == "r2":
        return R2(device, outputs)
    return METRICS[name](device)


def higher_is_better(name: str) -> bool:
    """For early stopping and best.pt: losses go down, accuracies go up."""
    metric = name.removeprefix("val_").removeprefix("train_")
    if metric == "loss":
        return False
    return METRICS.get(metric, Accuracy).higher_is_better


def recorded_metrics(config: Config) -> list[str]:
    """The per-epoch values a run records (metrics.csv's columns a schedule can follow)."""
    val = (["val_loss", *(f"val_{m}" for m in config["metrics"] or [])] if has_validation(config["data"])
           else [])
    return ["train_loss", *val]


def monitored_metric(config: Config, has_val: bool) -> str:
    """What picks the best epoch (best.pt) and early stopping: early_stop's metric, else the
    validation loss, else the training loss."""
    early = config["train"]["early_stop"]
    if early:
        return early["metric"]
    return "val_loss" if has_val else "train_loss"
