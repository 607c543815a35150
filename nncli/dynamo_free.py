"""Optimizers without torch._dynamo, in a process that compiles nothing.

torch.optim reaches for torch._dynamo even when nothing is compiled: its `step` wrapper
(`_use_grad_for_differentiable`) imports it on every call to mark a graph break, and
`zero_grad`, `add_param_group`, `state_dict`, `load_state_dict` and the functional `adam`,
`adamw`, ... are wrapped in `torch._disable_dynamo`, which imports it on first use and then runs
every call through `torch._dynamo.disable`. The import costs about a second, a quarter of a small
run's whole process; the disable wrapper, tens of microseconds a step. With nothing compiled,
both are no-ops: a graph break outside a graph, dynamo disabled where it never runs.

`skip_dynamo` removes them, for runs whose `compile` is off (prepare_run) and for checks that
train nothing (check_config); `skip_disable_wrappers` the first kind anywhere (summary's
flop counter, a TorchDispatchMode whose `__torch_dispatch__` torch wraps the same way):
- each `_disable_dynamo` wrapper is given what it caches on its function on first use,
  `fn.__dynamo_disable`, as `fn` itself: it then calls `fn` directly;
- each optimizer class's `step` wrapper is replaced by the same wrapper without its two
  `graph_break()` calls: grad mode set to the optimizer's `differentiable` around the step, and
  restored after it, exactly as torch's does.

Both happen only where torch's wrappers are the ones this was written against: the wrapper's
code object must be torch's own (compared with a wrapper made now), and its names and constants
those read here; with another torch, nothing changes. A model compiled later in the same process
(compile: true) is compiled as before: it is the model that torch.compile wraps, not the
optimizer. Results are bit-identical either way (tests/test_run_train.py).
"""
from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import torch
import torch._compile
import torch.optim
import torch.optim.optimizer as optimizer_module

# What torch's step wrapper reads, and nothing else: then it is only grad mode and graph breaks.
_STEP_WRAPPER_NAMES = {"torch._dynamo", "cast", "Optimizer", "is_grad_enabled", "set_grad_enabled",
                       "defaults", "_dynamo", "graph_break"}


def skip_dynamo() -> int:
    """Let torch.optim run without torch._dynamo (see the module's docstring); returns how many of
    torch's wrappers now run without it (0 with a torch whose wrappers differ)."""
    modules = [m for m in vars(torch.optim).values()
               if isinstance(m, types.ModuleType) and m.__name__.startswith("torch.optim.")]
    return skip_disable_wrappers([torch.optim.Optimizer, *modules]) + _skip_step_graph_breaks()


def skip_disable_wrappers(places: list) -> int:
    """Give every `_disable_dynamo` wrapper found in `places` (modules and classes: their
    functions, the classes they hold, and the wrappers those functions close over) its function
    as what it caches, so that it calls the function directly; how many it was given to."""
    probe = torch._compile._disable_dynamo(lambda: None)
    code = getattr(probe, "__code__", None)
    if code is None or "__dynamo_disable" not in code.co_consts:
        return 0  # not the wrapper this knows

    def wrappers_in(obj: object) -> list:
        found = [obj] if getattr(obj, "__code__", None) is code else []
        for cell in getattr(obj, "__closure__", None) or ():  # the functional optimizers' fallback
            try:
                contents = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if getattr(contents, "__code__", None) is code:
                found.append(contents)
        return found

    candidates = []
    for place in places:
        for value in vars(place).values():
            candidates.append(value)
            if isinstance(value, type) and isinstance(place, types.ModuleType):
                candidates += list(vars(value).values())  # e.g. a dispatch mode's __torch_dispatch__
    skipped = 0
    for wrapper in (w for candidate in candidates for w in wrappers_in(candidate)):
        target = getattr(wrapper, "__wrapped__", None)
        if target is not None and getattr(target, "__dynamo_disable", None) is None:
            setattr(target, "__dynamo_disable", target)
            skipped += 1
    return skipped


def _step_without_graph_breaks(step: Callable[..., Any]) -> Callable[..., Any]:
    """torch's `_use_grad_for_differentiable` wrapper of `step`, without its graph breaks."""
    @functools.wraps(step)
    def _use_grad(*args: Any, **kwargs: Any) -> Any:
        previous = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(args[0].defaults["differentiable"])
            return step(*args, **kwargs)
        finally:
            torch.set_grad_enabled(previous)

    _use_grad.without_graph_breaks = True
    return _use_grad


def _skip_step_graph_breaks() -> int:
    code = optimizer_module._use_grad_for_differentiable(lambda self: None).__code__
    if set(code.co_names) != _STEP_WRAPPER_NAMES or "differentiable" not in code.co_consts:
        return 0  # a wrapper that does more than this knows
    skipped = 0
    for cls in vars(torch.optim).values():
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            continue
        step = cls.__dict__.get("step")
        hooked = getattr(step, "hooked", False)  # profiled by Optimizer._patch_step_function
        inner = step.__wrapped__ if hooked else step
        if getattr(inner, "__code__", None) is not code:
            continue
        replaced = _step_without_graph_breaks(inner.__wrapped__)
        if hooked:
            replaced = torch.optim.Optimizer.profile_hook_step(replaced)
            replaced.hooked = True
        cls.step = replaced
        skipped += 1
    return skipped
