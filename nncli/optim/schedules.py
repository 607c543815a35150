"""The learning-rate schedule: every scheduler of `torch.optim.lr_scheduler` by class name, stepped
after each epoch or each optimizer step (`interval`), with an optional linear warmup first. Each
registry entry says which argument is the run's length (T_max, total_steps, ...), which nncli
fills in, and re-plans when a resumed run changes its length.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from nncli.arguments import create
from nncli.config import Config
from nncli.config.config import check_section
from nncli.config.schema import SCHEDULE_KEYS, WARMUP
from nncli.errors import ConfigError, did_you_mean
from nncli.optim.metrics import recorded_metrics
from nncli.registry import Registry


@dataclass(frozen=True)
class ScheduleEntry:
    factory: Callable[..., Any]
    length_argument: str | None = None  # the argument that is the run's length, filled in by nncli


# Schedules whose shape depends on the run's length
LENGTH_ARGUMENT = {"CosineAnnealingLR": "T_max", "OneCycleLR": "total_steps",
                   "PolynomialLR": "total_iters", "LinearLR": "total_iters"}


def _load_schedulers(registry: Registry) -> None:
    sched = torch.optim.lr_scheduler
    for name in dir(sched):
        obj = getattr(sched, name)
        if (isinstance(obj, type) and name not in ("LRScheduler", "_LRScheduler", "SequentialLR",
                                                   "ChainedScheduler", "LambdaLR", "MultiplicativeLR")
                and (issubclass(obj, sched.LRScheduler) or obj is sched.ReduceLROnPlateau)):
            registry.add(name, ScheduleEntry(obj, LENGTH_ARGUMENT.get(name)))


SCHEDULERS = Registry("schedule", _load_schedulers)



@dataclass
class Schedule:
    """The LR scheduler and when it steps (`interval`: after each epoch or each optimizer step)."""

    scheduler: Any
    interval: str
    monitor: str | None  # the metric ReduceLROnPlateau follows
    note: str = ""  # what nncli filled in, to tell the user
    filled_in: dict = field(default_factory=dict)  # the arguments nncli gave the scheduler (T_max, max_lr)
    warmup: int = 0  # the linear warmup's length in intervals (0: none)
    start_factor: float = 0.01  # the warmup's first factor

    def step_epoch(self, metrics: dict[str, float]) -> None:
        if self.monitor is not None:
            self.scheduler.step(metrics[self.monitor])
        elif self.interval == "epoch":
            self.scheduler.step()

    def step_batch(self) -> None:
        if self.interval == "step" and self.monitor is None:
            self.scheduler.step()


def create_schedule(optimizer: torch.optim.Optimizer, config: Config, steps_per_epoch: int | None,
                    epochs: int | None = None) -> Schedule | None:
    """The schedule section as a scheduler, with optional linear warmup first.

    `epochs` (default `train.epochs`) is the run's length, for schedules that depend on it.
    `steps_per_epoch` None: not known (`validate` without data); the schedule is then built and
    rehearsed as if an epoch were one step, the fewest a run takes, and a warmup given in steps
    is not compared with the run's length."""
    spec = config["schedule"]
    if spec is None:
        return None
    spec = {"type": spec} if isinstance(spec, str) else spec
    epochs = epochs or config["train"]["epochs"]
    interval = spec.get("interval", "epoch")
    if (problem := SCHEDULE_KEYS["interval"].check(interval)):
        raise config.error(f"interval {problem}", "schedule", "interval")
    warmup = check_section(spec.get("warmup") or {}, WARMUP, config.error, "schedule", "warmup")
    per_interval = (steps_per_epoch or 1) if interval == "step" else 1
    if warmup["steps"] and warmup["epochs"]:
        raise config.error("give the warmup's length once: epochs or steps", "schedule", "warmup", "steps")
    if warmup["steps"] and interval == "epoch":
        raise config.error("warmup in steps needs interval: step", "schedule", "warmup", "steps")
    warmup_len = warmup["steps"] or (warmup["epochs"] or 0) * per_interval
    name = spec.get("type")
    try:
        if "type" in spec:  # a known name before it is looked up below (a missing one: see create)
            SCHEDULERS.get(name)
    except ConfigError as err:
        raise config.error(err.message, "schedule", "type", hint=err.hint) from None
    defaults, note = {}, ""
    length_argument = SCHEDULERS.get(name).length_argument if "type" in spec else None
    if length_argument and length_argument not in spec:
        length = max(1, epochs * per_interval - warmup_len)
        defaults[length_argument] = length
        note = f"{name}: {length_argument}={length} ({interval}s after warmup)"
    if name == "OneCycleLR" and "max_lr" not in spec:
        defaults["max_lr"] = [g["lr"] for g in optimizer.param_groups]
    monitor = None
    if name == "ReduceLROnPlateau":
        monitor = spec.get("monitor", "val_loss")
        recorded = recorded_metrics(config)
        if monitor not in recorded:
            raise config.error(f"monitor '{monitor}' is not recorded; expected one of: "
                               f"{', '.join(recorded)}", "schedule",
                               *(["monitor"] if "monitor" in spec else []),
                               hint=did_you_mean(str(monitor), recorded) if "monitor" in spec else
                               "The run has no validation data: set monitor: train_loss.")
        if warmup_len:
            raise config.error("warmup does not combine with ReduceLROnPlateau", "schedule", "warmup")
    total = epochs * per_interval
    if warmup_len > total and not (steps_per_epoch is None and warmup["steps"]):
        raise config.error(f"the warmup ({warmup_len} {interval}s) is longer than the run ({total} "
                           f"{interval}s), so the schedule would never start", "schedule", "warmup")
    note = note.replace(" after warmup", "") if not warmup_len else note

    def build(opt: torch.optim.Optimizer) -> Any:
        main = create(SCHEDULERS, spec, config.error, "schedule", positional=(opt,),
                      reserved=tuple(SCHEDULE_KEYS), defaults=defaults)
        if warmup_len:
            ramp = torch.optim.lr_scheduler.LinearLR(opt, start_factor=warmup["start_factor"],
                                                     total_iters=warmup_len)
            main = torch.optim.lr_scheduler.SequentialLR(opt, [ramp, main], milestones=[warmup_len])
        return main

    if monitor is None:
        _rehearse(build, optimizer, min(total, 20_000), config)
    return Schedule(build(optimizer), interval, monitor, note, defaults, warmup_len, warmup["start_factor"])


def _rehearse(build: Any, optimizer: torch.optim.Optimizer, steps: int, config: Config) -> None:
    """Step the schedule over the run on a stand-in optimizer (one scalar per group), so that
    values that only fail when stepped (gamma: abc, step_size: 0, a too-short total_steps)
    are config errors now rather than crashes mid-run."""
    groups = [{**{k: v for k, v in g.items() if k != "params"},
               "params": [torch.zeros((), requires_grad=True)]} for g in optimizer.param_groups]
    stand_in = torch.optim.SGD(groups, lr=optimizer.defaults.get("lr", 1e-3))
    scheduler = build(stand_in)
    try:
        fast_forward(scheduler, steps)
    except Exception as err:
        raise config.error(f"the schedule fails when stepped: {err or type(err).__name__}",
                           "schedule") from None




def fast_forward(scheduler: Any, steps: int) -> None:
    """Step a scheduler `steps` times without an optimizer step between: the rates it reaches are
    those of a run that has taken that many."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
        for _ in range(steps):
            scheduler.step()
