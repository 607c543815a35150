"""A run: everything `fit` needs (`Run`), and where it stands (`TrainState`, saved in checkpoints)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nncli.config import Config
from nncli.data.augment import Pipeline
from nncli.data.load import Data
from nncli.data.samples import Batches, Samples
from nncli.model.plan import ModelPlan
from nncli.optim.ema import WeightAverage
from nncli.optim.metrics import monitored_metric
from nncli.optim.optimizers import ParamGroup
from nncli.optim.schedules import Schedule
from nncli.report.reporters import Reporter
from nncli.run.devices import Process
from nncli.run.rundir import RunLock


@dataclass
class TrainState:
    """Where a run stands; all of it goes into every checkpoint."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    position: int = 0  # batches done in the unfinished epoch (a mid-epoch checkpoint)
    epoch_losses: list[float] = field(default_factory=list)  # and their losses
    epoch_lrs: list[float] = field(default_factory=list)  # the unfinished epoch's learning rates
    best: dict = field(default_factory=lambda: {"metric": "val_loss", "value": None, "epoch": None})
    bad_epochs: int = 0  # epochs without improvement, for early stopping
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False


@dataclass
class Run:
    """Everything `fit` needs, built from a config by `prepare_run`."""

    config: Config
    plan: ModelPlan
    model: nn.Module
    data: Data
    batches: Batches
    val: Samples | None
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    groups: list[ParamGroup]
    schedule: Schedule | None
    device: torch.device
    run_dir: Path
    epochs: int
    step_model: nn.Module  # what the step calls: the model, or DataParallel / DDP / compiled around it
    scaler: torch.amp.GradScaler | None  # fp16 loss scaling
    process: Process
    state: TrainState = field(default_factory=TrainState)
    plain_config: dict = field(default_factory=dict)  # the resolved config as plain containers
    epoch_shuffle: torch.Tensor | None = None  # the shuffle generator's state when this epoch began
    pending_best: dict | None = None  # a best checkpoint not yet written (see save_checkpoints)
    config_changed: bool = False  # resumed with other settings: config.yaml goes with the next last.pt
    lock: RunLock | None = None  # held on run_dir while this (main) process trains in it
    loggers: list[Reporter] = field(default_factory=list)  # the main process's, into run_dir (metrics.csv)
    augment: Pipeline | None = None  # data.augment, for training batches (see loop.augmentation_generator)
    ema: WeightAverage | None = None  # train.ema: the average of the weights, validated and saved as `model`

    @property
    def validated_model(self) -> nn.Module:
        """What validation scores and best.pt's `model` holds: the weight average, else the model."""
        return self.ema.model if self.ema is not None else self.model

    @property
    def monitor(self) -> str:
        return monitored_metric(self.config, self.val is not None)
