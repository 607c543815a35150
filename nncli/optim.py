"""Loss, optimizer (with parameter groups) and LR schedule (with warmup), from their config sections.

Like timm's `create_optimizer` / `create_scheduler`: the `type:` name is looked up in a registry
(every loss of `torch.nn`, every optimizer of `torch.optim`, every scheduler of
`torch.optim.lr_scheduler`, and losses added with `register_loss`) and the other keys are its
keyword arguments.
"""
from __future__ import annotations

import fnmatch
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from nncli.annotations import type_hints, wrong_type
from nncli.config import Config, Key, check_section, non_negative, one_of
from nncli.errors import ConfigError, did_you_mean
from nncli.registry import Registry, accepted_arguments, create


def _load_losses(registry: Registry) -> None:
    for name in dir(nn):
        obj = getattr(nn, name)
        if isinstance(obj, type) and issubclass(obj, nn.modules.loss._Loss) and not name.startswith("_"):
            registry.add(name, obj)


def _load_optimizers(registry: Registry) -> None:
    for name in dir(torch.optim):
        obj = getattr(torch.optim, name)
        if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer:
            registry.add(name, obj)


def _load_schedulers(registry: Registry) -> None:
    sched = torch.optim.lr_scheduler
    for name in dir(sched):
        obj = getattr(sched, name)
        if (isinstance(obj, type) and name not in ("LRScheduler", "_LRScheduler", "SequentialLR",
                                                   "ChainedScheduler", "LambdaLR", "MultiplicativeLR")
                and (issubclass(obj, sched.LRScheduler) or obj is sched.ReduceLROnPlateau)):
            registry.add(name, obj)


LOSSES = Registry("loss", _load_losses)
CLASS_INDEX_LOSSES = {"CrossEntropyLoss", "NLLLoss", "MultiMarginLoss"}  # their targets are class labels
OPTIMIZERS = Registry("optimizer", _load_optimizers)
SCHEDULERS = Registry("schedule", _load_schedulers)

# Schedules whose shape depends on the run's length: nncli fills this argument in (and re-plans
# it when a resumed run changes its length).
LENGTH_ARGUMENT = {"CosineAnnealingLR": "T_max", "OneCycleLR": "total_steps",
                   "PolynomialLR": "total_iters", "LinearLR": "total_iters"}
SCHEDULE_KEYS = {"warmup", "interval", "monitor"}


def register_loss(factory: Callable[..., nn.Module] | None = None, *, name: str | None = None,
                  class_indices: bool = False) -> Any:
    """Register a user loss so configs can name it (`loss: MyLoss`). Usable as `@register_loss` or
    `@register_loss(class_indices=True)` for a loss whose targets are class labels, as
    CrossEntropyLoss's (the labels are then checked, and accuracy is the default metric)."""
    def add(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        LOSSES.add(name or factory.__name__, factory)
        if class_indices:
            CLASS_INDEX_LOSSES.add(name or factory.__name__)
        return factory

    return add(factory) if factory is not None else add


def loss_name(config: Config) -> str:
    """The loss's type, "" when not given as a name (create_loss says what is wrong)."""
    loss = config["loss"]
    name = loss if isinstance(loss, str) else loss.get("type", "")
    return name if isinstance(name, str) else ""


# Loss arguments that torch takes as tensors (class weights); YAML gives them as lists.
TENSOR_ARGUMENTS = {"weight", "pos_weight"}


def create_loss(config: Config) -> nn.Module:
    spec = config["loss"]
    if isinstance(spec, dict):
        spec = {key: _as_tensor(value, config, key) if key in TENSOR_ARGUMENTS and value is not None else value
                for key, value in spec.items()}
    loss = create(LOSSES, spec, config.error, "loss")
    if getattr(loss, "reduction", None) == "none":
        raise config.error("reduction 'none' gives a loss per sample, but training steps on one number "
                           "per batch", "loss", "reduction", hint="Use reduction: mean or sum.")
    return loss


def _as_tensor(value: Any, config: Config, key: str) -> torch.Tensor:
    """A number or a list of numbers as a tensor of the model's float dtype (float64 models too)."""
    dtype = getattr(torch, config["model"]["input_dtype"])
    try:
        if isinstance(value, (bool, str, dict)):
            raise TypeError
        return torch.tensor(value, dtype=dtype if dtype.is_floating_point else torch.float32)
    except (TypeError, ValueError):
        raise config.error(f"expected a number or a list of numbers, got {value!r}", "loss", key) from None


# --- optimizer and parameter groups ----------------------------------------------------------

@dataclass
class ParamGroup:
    """One optimizer group as configured: its patterns, its parameter names and its settings."""

    name: str
    patterns: list[str]
    param_names: list[str]
    settings: dict
    lr_column: str  # its learning rate's column in metrics.csv: lr_<name> when the config names it, else lr_<i>


def split_param_groups(model: nn.Module, config: Config) -> list[ParamGroup]:
    """Assign each trainable parameter to the first group whose glob matches its name;
    the rest form a default group (last) with the optimizer's top-level settings."""
    spec = config["optimizer"]
    groups_spec = spec.get("groups", []) if isinstance(spec, dict) else []
    if not isinstance(groups_spec, list):
        raise config.error("groups must be a list of {params: pattern, lr: ...} mappings",
                           "optimizer", "groups")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    taken: set[str] = set()
    groups = []
    for i, group in enumerate(groups_spec):
        where = ("optimizer", "groups", i)
        if not isinstance(group, dict) or "params" not in group:
            raise config.error("each group needs 'params:' (a glob like '*.bias' or a list of them)", *where)
        patterns = group["params"] if isinstance(group["params"], list) else [group["params"]]
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise config.error("params must be a glob string or a list of them", *where, "params")
        members = [n for n, _ in named if n not in taken and any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in named):
                names = ", ".join(n for n, _ in named[:12]) + (", ..." if len(named) > 12 else "")
                raise config.error(f"pattern '{pattern}' matches no trainable parameter (they are "
                                   f"named like: {names})", *where, "params",
                                   hint="Run `nncli summary --params` to list them.")
        if not members:  # each parameter goes to the first group that matches it; a warning, as
            # a run saved before this check must still resume (its groups may not change)
            warnings.warn(str(config.error(f"every parameter that {', '.join(patterns)} matches is taken by "
                                           "an earlier group, so this group's settings apply to nothing",
                                           *where, "params", hint="Put the more specific group first.")))
        taken.update(members)
        name = group.get("name")
        if name is not None and (isinstance(name, bool) or not isinstance(name, (str, int))):
            raise config.error(f"a group's name must be a text, got {name!r}", *where, "name")
        name = str(i if name is None else name)
        groups.append(ParamGroup(name, patterns, members,
                                 {k: v for k, v in group.items() if k not in ("params", "name")}, f"lr_{name}"))
    rest = [n for n, _ in named if n not in taken]
    if rest or not groups:
        groups.append(ParamGroup("default", ["(rest)"] if groups else ["*"], rest, {}, f"lr_{len(groups)}"))
    columns = [g.lr_column for g in groups]
    for i, column in enumerate(columns):
        if column in columns[:i]:  # a name took another group's column: blame the named one
            named_one = i if i < len(groups_spec) and groups_spec[i].get("name") is not None else columns.index(column)
            raise config.error(f"two groups' learning rates would share the column {column} of metrics.csv; "
                               "give each group a name of its own", "optimizer", "groups", named_one, "name")
    return groups


# torch.optim optimizers that nncli's training step cannot drive, and why
UNSUPPORTED_OPTIMIZERS = {
    "LBFGS": "its step needs a closure that evaluates the model again, and nncli's loop steps once per batch",
    "SparseAdam": "it takes sparse gradients only (Embedding(sparse=True)), and other layers' are dense",
}


def create_optimizer(model: nn.Module, config: Config) -> tuple[torch.optim.Optimizer, list[ParamGroup]]:
    spec = config["optimizer"]
    name = spec if isinstance(spec, str) else spec.get("type")
    if isinstance(name, str) and name in UNSUPPORTED_OPTIMIZERS:
        raise config.error(f"{name} is not supported: {UNSUPPORTED_OPTIMIZERS[name]}", "optimizer",
                           *([] if isinstance(spec, str) else ["type"]), hint="Use Adam, AdamW or SGD.")
    groups = split_param_groups(model, config)
    params = dict(model.named_parameters())
    torch_groups = [{"params": [params[n] for n in g.param_names], **g.settings} for g in groups]
    optimizer = create(OPTIMIZERS, config["optimizer"], config.error, "optimizer",
                       positional=(torch_groups,), reserved=("groups",))
    # torch keeps any key of a group without a word: a misspelt `lrr:` would silently train
    # that group at the top-level lr, so check the groups' settings against the optimizer's
    # (and against its annotations: torch checks a group's lr only when it steps)
    accepted, hints, name = accepted_arguments(type(optimizer)), type_hints(type(optimizer)), type(optimizer).__name__
    allowed = [a for a in accepted or () if a not in ("self", "params")]
    for i, group in enumerate(groups):
        for key, value in group.settings.items():
            if accepted is not None and key not in allowed:
                raise config.error(f"{name} has no setting '{key}'; a group may set: {', '.join(allowed)}",
                                   "optimizer", "groups", i, key, hint=did_you_mean(str(key), allowed))
            if (problem := wrong_type(name, key, value, hints)) is not None:
                raise config.error(problem, "optimizer", "groups", i, key)
    for i, (group, settings) in enumerate(zip(groups, optimizer.param_groups)):
        # torch refuses a negative lr only for some optimizers, an infinite one for none
        if isinstance(lr := settings.get("lr"), (int, float)) and not 0 <= lr < math.inf:
            where = ("groups", i, "lr") if "lr" in group.settings else ("lr",)
            raise config.error(f"the learning rate must be a finite number, 0 or more, got {lr}",
                               "optimizer", *where)
        group.settings = {k: v for k, v in settings.items() if k != "params"}
    return optimizer, groups


def optimizer_state_problem(optimizer: torch.optim.Optimizer, saved: dict, names: dict[int, str]) -> str | None:
    """What in `saved` (a checkpoint's `optimizer.state_dict()`) does not fit `optimizer`: a state
    tensor missing, or of another shape than one step of this optimizer makes, which
    `load_state_dict` takes without a word and the next step fails on. The step runs on
    meta-device stand-ins of the parameters (no memory, no arithmetic), with the saved groups'
    settings, as loading them restores. `names`: id(parameter) -> its name, for the message.
    None when the state fits, or when this optimizer cannot step on the meta device (Adafactor,
    ASGD) or the groups do not match (load_state_dict says so itself)."""
    groups, state = saved.get("param_groups"), saved.get("state")
    if not isinstance(groups, list) or not isinstance(state, dict) or len(groups) != len(optimizer.param_groups):
        return None
    if not all(isinstance(g, dict) and len(g.get("params", ())) == len(live["params"])
               for g, live in zip(groups, optimizer.param_groups)):
        return None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    stand_ins = [torch.empty_like(p, device="meta").requires_grad_() for p in params]
    probe_groups, start = [], 0
    for group in groups:
        count = len(group["params"])
        probe_groups.append({**{k: v for k, v in group.items() if k != "params"},
                             "params": stand_ins[start:start + count]})
        start += count
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe = type(optimizer)(probe_groups)
            for stand_in in stand_ins:
                stand_in.grad = torch.zeros_like(stand_in)
            probe.step()
    except Exception:  # e.g. a step that reads a value (.item()), which meta tensors do not have
        return None
    expected = probe.state_dict()["state"]
    saved_ids = [index for group in groups for index in group["params"]]
    for position, (param, index) in enumerate(zip(params, saved_ids)):
        own = state.get(index)
        if not own:
            continue  # no step taken yet: the optimizer makes its state at the first
        name = names.get(id(param), f"parameter {position}")
        if not isinstance(own, dict):
            return f"the optimizer state of {name} is {type(own).__name__}, not a mapping"
        for key, made in expected.get(position, {}).items():
            if key not in own:
                return f"the optimizer state of {name} lacks '{key}'"
            if isinstance(made, torch.Tensor) and (not isinstance(own[key], torch.Tensor) or own[key].shape != made.shape):
                got = list(own[key].shape) if isinstance(own[key], torch.Tensor) else type(own[key]).__name__
                return (f"the optimizer's '{key}' of {name} is {got}, but {name} {list(param.shape)} "
                        f"needs {list(made.shape)}")
    return None


def group_of_each_parameter(groups: list[ParamGroup]) -> dict[str, str]:
    return {name: group.name for group in groups for name in group.param_names}


# --- schedule --------------------------------------------------------------------------------

WARMUP_KEYS = {"epochs": Key((int,), None, non_negative), "steps": Key((int,), None, non_negative),  # 0: none
               "start_factor": Key((int, float), 0.01, lambda v: None if 0 < v <= 1 else "must lie in (0, 1]")}


@dataclass
class Schedule:
    """The LR scheduler and when it steps (`interval`: after each epoch or each optimizer step)."""

    scheduler: Any
    interval: str
    monitor: str | None  # the metric ReduceLROnPlateau follows
    note: str = ""  # what nncli filled in, to tell the user

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
    if (problem := one_of("epoch", "step")(interval)):
        raise config.error(f"interval {problem}", "schedule", "interval")
    warmup = check_section(spec.get("warmup") or {}, WARMUP_KEYS, config.error, "schedule", "warmup")
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
    if name in LENGTH_ARGUMENT and LENGTH_ARGUMENT[name] not in spec:
        length = max(1, epochs * per_interval - warmup_len)
        defaults[LENGTH_ARGUMENT[name]] = length
        note = f"{name}: {LENGTH_ARGUMENT[name]}={length} ({interval}s after warmup)"
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
    return Schedule(build(optimizer), interval, monitor, note)


def _rehearse(build: Any, optimizer: torch.optim.Optimizer, steps: int, config: Config) -> None:
    """Step the schedule over the run on a stand-in optimizer (one scalar per group), so that
    values that only fail when stepped (gamma: abc, step_size: 0, a too-short total_steps)
    are config errors now rather than crashes mid-run."""
    groups = [{**{k: v for k, v in g.items() if k != "params"},
               "params": [torch.zeros((), requires_grad=True)]} for g in optimizer.param_groups]
    stand_in = torch.optim.SGD(groups, lr=optimizer.defaults.get("lr", 1e-3))
    scheduler = build(stand_in)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
            for _ in range(steps):
                scheduler.step()
    except Exception as err:
        raise config.error(f"the schedule fails when stepped: {err or type(err).__name__}",
                           "schedule") from None


def has_validation(config: Config) -> bool:
    """Whether the data section gives validation data: a val: source, or a val_split above 0."""
    section = config["data"] or {}
    return bool(section.get("val")) if "train" in section else section.get("val_split", 0.2) != 0


def recorded_metrics(config: Config) -> list[str]:
    """The per-epoch values a run records (metrics.csv's columns a schedule can follow)."""
    val = ["val_loss", *(f"val_{m}" for m in config["metrics"] or [])] if has_validation(config) else []
    return ["train_loss", *val]


def monitored_metric(config: Config, has_val: bool) -> str:
    """What picks the best epoch (best.pt) and early stopping: early_stop's metric, else the
    validation loss, else the training loss."""
    early = config["train"]["early_stop"]
    if early:
        return early["metric"]
    return "val_loss" if has_val else "train_loss"


def optimizer_settings(group: ParamGroup) -> str:
    """`lr=0.1, momentum=0.9` for the group table, leaving out torch's bookkeeping."""
    skip = {"params", "initial_lr", "foreach", "maximize", "capturable", "differentiable", "fused",
            "decoupled_weight_decay"}
    return ", ".join(f"{k}={v}" for k, v in group.settings.items() if k not in skip and v is not None)

