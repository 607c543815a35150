"""The optimizer: every optimizer of `torch.optim` by class name, with parameter groups matched by
glob on `named_parameters()`, as timm's `create_optimizer` builds one (`type:` names it; the other
keys are its keyword arguments). Each registry entry says whether nncli's loop can drive it.
"""
from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from nncli.arguments import accepted_arguments, create, type_hints, wrong_type
from nncli.config import Config
from nncli.errors import did_you_mean
from nncli.registry import Registry


@dataclass(frozen=True)
class OptimizerEntry:
    factory: Callable[..., torch.optim.Optimizer]
    unsupported: str | None = None  # why nncli's loop cannot drive it


# torch.optim optimizers that nncli's training step cannot drive, and why
UNSUPPORTED_OPTIMIZERS = {
    "LBFGS": "its step needs a closure that evaluates the model again, and nncli's loop steps once per batch",
    "SparseAdam": "it takes sparse gradients only (Embedding(sparse=True)), and other layers' are dense",
}


def _load_optimizers(registry: Registry) -> None:
    for name in dir(torch.optim):
        obj = getattr(torch.optim, name)
        if (isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer)
                and obj is not torch.optim.Optimizer):
            registry.add(name, OptimizerEntry(obj, UNSUPPORTED_OPTIMIZERS.get(name)))


OPTIMIZERS = Registry("optimizer", _load_optimizers)


@dataclass
class ParamGroup:
    """One optimizer group as configured: its patterns, its parameter names and its settings."""

    name: str
    patterns: list[str]
    param_names: list[str]
    settings: dict
    # its learning rate's column in metrics.csv: lr_<name> when the config names it, else lr_<i>
    lr_column: str


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
        if not members:  # each parameter goes to the first group that matches it; a warning: the
            # config trains, only this group's settings apply to nothing
            warnings.warn(str(config.error(f"every parameter that {', '.join(patterns)} matches is taken by "
                                           "an earlier group, so this group's settings apply to nothing",
                                           *where, "params", hint="Put the more specific group first.")))
        taken.update(members)
        name = group.get("name")
        if name is not None and (isinstance(name, bool) or not isinstance(name, (str, int))):
            raise config.error(f"a group's name must be a text, got {name!r}", *where, "name")
        name = str(i if name is None else name)
        groups.append(ParamGroup(name, patterns, members,
                                 {k: v for k, v in group.items() if k not in ("params", "name")},
                                 f"lr_{name}"))
    rest = [n for n, _ in named if n not in taken]
    if rest or not groups:
        groups.append(ParamGroup("default", ["(rest)"] if groups else ["*"], rest, {}, f"lr_{len(groups)}"))
    columns = [g.lr_column for g in groups]
    for i, column in enumerate(columns):
        if column in columns[:i]:  # a name took another group's column: blame the named one
            named_one = (i if i < len(groups_spec) and groups_spec[i].get("name") is not None
                         else columns.index(column))
            raise config.error(f"two groups' learning rates would share the column {column} of metrics.csv; "
                               "give each group a name of its own", "optimizer", "groups", named_one, "name")
    return groups


def create_optimizer(model: nn.Module, config: Config) -> tuple[torch.optim.Optimizer, list[ParamGroup]]:
    spec = config["optimizer"]
    name = spec if isinstance(spec, str) else spec.get("type")
    if isinstance(name, str) and name in OPTIMIZERS and (why := OPTIMIZERS.get(name).unsupported):
        raise config.error(f"{name} is not supported: {why}", "optimizer",
                           *([] if isinstance(spec, str) else ["type"]), hint="Use Adam, AdamW or SGD.")
    groups = split_param_groups(model, config)
    params = dict(model.named_parameters())
    torch_groups = [{"params": [params[n] for n in g.param_names], **g.settings} for g in groups]
    optimizer = create(OPTIMIZERS, config["optimizer"], config.error, "optimizer",
                       positional=(torch_groups,), reserved=("groups",))
    # torch keeps any key of a group without a word: a misspelt `lrr:` would silently train
    # that group at the top-level lr, so check the groups' settings against the optimizer's
    # (and against its annotations: torch checks a group's lr only when it steps)
    accepted, hints, name = (accepted_arguments(type(optimizer)), type_hints(type(optimizer)),
                             type(optimizer).__name__)
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


def optimizer_state_problem(optimizer: torch.optim.Optimizer, saved: dict,
                            names: dict[int, str]) -> str | None:
    """What in `saved` (a checkpoint's `optimizer.state_dict()`) does not fit `optimizer`: a state
    tensor missing, or of another shape than one step of this optimizer makes, which
    `load_state_dict` takes without a word and the next step fails on. The step runs on
    meta-device stand-ins of the parameters (no memory, no arithmetic), with the saved groups'
    settings, as loading them restores. `names`: id(parameter) -> its name, for the message.
    None when the state fits, or when this optimizer cannot step on the meta device (Adafactor,
    ASGD) or the groups do not match (load_state_dict says so itself)."""
    groups, state = saved.get("param_groups"), saved.get("state")
    if (not isinstance(groups, list) or not isinstance(state, dict)
            or len(groups) != len(optimizer.param_groups)):
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
            if isinstance(made, torch.Tensor) and (not isinstance(own[key], torch.Tensor)
                                                   or own[key].shape != made.shape):
                got = list(own[key].shape) if isinstance(own[key], torch.Tensor) else type(own[key]).__name__
                return (f"the optimizer's '{key}' of {name} is {got}, but {name} {list(param.shape)} "
                        f"needs {list(made.shape)}")
    return None


def group_of_each_parameter(groups: list[ParamGroup]) -> dict[str, str]:
    return {name: group.name for group in groups for name in group.param_names}


# --- schedule --------------------------------------------------------------------------------


def optimizer_settings(group: ParamGroup) -> str:
    """`lr=0.1, momentum=0.9` for the group table, leaving out torch's bookkeeping."""
    skip = {"params", "initial_lr", "foreach", "maximize", "capturable", "differentiable", "fused",
            "decoupled_weight_decay"}
    return ", ".join(f"{k}={v}" for k, v in group.settings.items() if k not in skip and v is not None)
