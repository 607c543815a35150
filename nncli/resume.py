"""`nncli resume`: continue a run exactly where its checkpoint left it, or warm-start a new run
from weights: a plain state_dict, or (`--warm-start`) the model of an nncli checkpoint.

What may change on resume: the length (`--epochs`), and settings that do not change what the
checkpoint holds (learning rates, clipping, logging, checkpoint frequency, the device, ...).
What may not: the model, its plugins, the data (how it is read may: `loader`, `workers`,
`mmap`), the seed, the loss, the optimizer's type and which parameters its groups hold (their
learning rates may change), the schedule's type. Asking for those lists the differences and
stops (exit 2).
"""
from __future__ import annotations

import copy
import math
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from nncli.checkpoint import (find_checkpoint, holds_checkpoint, load_checkpoint, load_state_dict_file,
                              remove_stale_temporaries)
from nncli.config import Config, load_config, with_epochs
from nncli.data import LOADER_KEYS, load_data
from nncli.devices import check_parallel, end_process, is_main_process, launched_processes
from nncli.errors import ConfigError
from nncli.inference import Named, config_of
from nncli.optim import LENGTH_ARGUMENT, has_validation, monitored_metric
from nncli.reporting import Reporter, format_value
from nncli.rundir import MetricsLog, check_not_in_use, lock_run_dir
from nncli.train import (Run, announce, check_device, check_launch, located_errors, prepare_run, restore,
                         resume_command, run_fit, start_run_dir)
from nncli.yamlio import to_plain

FIXED = ("model", "plugins", "data", "seed", "loss", "optimizer.type", "optimizer.groups",
         "schedule.type", "train.batch_size", "train.accumulate", "train.drop_last", "train.shuffle")
# Parts of a FIXED section that may change all the same. How the data is read, not which batches
# training sees: the loader keys, and a source's `mmap` in either layout. A parameter group's
# settings and name (`optimizer.groups.1.lr`, the tutorial's decay by hand); not its `params`.
HOW_DATA_IS_READ = {f"data.{key}" for key in LOADER_KEYS} | {f"data.{part}mmap" for part in ("", "train.", "val.")}
GROUP_SETTING = re.compile(r"optimizer\.groups\.\d+\.(?!params(?:\.|$))[^.]+(?:\.\d+)*")


class _Absent:
    """An item that one of two lists lacks."""

    def __repr__(self) -> str:
        return "(none)"


ABSENT = _Absent()


def config_differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf that differs; lists are compared item by
    item (`model.layers.0.out_features: 32 -> 7`), and an item whose `type` changed as a whole."""
    if isinstance(old, dict) and isinstance(new, dict) and old.get("type") == new.get("type"):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            out += config_differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    if isinstance(old, list) and isinstance(new, list):
        out = []
        for i in range(max(len(old), len(new))):
            out += config_differences(old[i] if i < len(old) else ABSENT,
                                      new[i] if i < len(new) else ABSENT, f"{prefix}{i}.")
        return out
    old, new = to_plain(old), to_plain(new)
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def _is_fixed(difference: tuple[str, Any, Any]) -> bool:
    """Whether a difference touches a FIXED key: the key itself, a part of it, or a section that
    holds it (`optimizer: {type: Adam} -> {type: SGD}` is reported for the whole section)."""
    key, old, new = difference
    if key in HOW_DATA_IS_READ or GROUP_SETTING.fullmatch(key):
        return False
    for fixed in FIXED:
        if key == fixed or key.startswith(fixed + "."):
            return True
        if fixed.startswith(key + "."):
            part = fixed[len(key) + 1:]
            if _item(old, part) != _item(new, part):
                return True
    return False


def _item(section: Any, key: str) -> Any:
    return section.get(key) if isinstance(section, dict) else None


def _describe(differences: list[tuple[str, Any, Any]]) -> str:
    def shown(value: Any) -> str:
        return "(not set)" if value is None else repr(value)

    return "; ".join(f"{key}: {shown(old)} -> {shown(new)}" for key, old, new in differences)


def check_warm_start(warm: bool, config_path: Path | None) -> None:
    if warm and config_path is None:
        raise ConfigError("starts a new run: give its config with --config CONFIG", key="--warm-start")


def is_nncli_checkpoint(path: Path) -> bool:
    """A run directory or an nncli checkpoint file: what `resume` goes on with (else a warm start)."""
    return path.is_dir() or holds_checkpoint(path)


@dataclass
class ResumePlan:
    """What `check_resume` found: the checkpoint, its stored config, the config to go on with."""

    file: Path
    ckpt: dict
    stored: Config
    config: Config
    differences: list  # (key, stored value, new value)
    trained_by: int  # processes
    processes: int


def check_resume(path: Path, *, overrides: list[str] = (), epochs: int | None = None,
                 config_path: Path | None = None, processes: int = 1, named: Named = Named()) -> ResumePlan:
    """Every check of a resume that needs no training set-up; `resume --nproc N` runs it once,
    before starting its N processes, so that bad input is said once. `named`: what the user allows
    the checkpoint's config to import and read (see inference.Named)."""
    file = find_checkpoint(path, prefer=("last.pt", "best.pt"))
    ckpt = load_checkpoint(file)
    trained_by = ckpt.get("world_size", 1)
    if processes != trained_by and ckpt["position"]:
        how = f"with --nproc {trained_by}" if trained_by > 1 else "without --nproc"
        raise ConfigError(f"the run stopped inside epoch {ckpt['epoch'] + 1} with {trained_by} "
                          f"process{'es' if trained_by > 1 else ''}; it can finish that epoch only with "
                          f"as many, not {processes}", file=str(file),
                          hint=f"Resume it {how}; from the end of an epoch it can go on with any number.")
    if config_path is not None:  # the user's config: its own plugins are theirs to import
        config = load_config(config_path, with_epochs(overrides, epochs))
        named = replace(named, plugins=(*named.plugins, *config.imported_plugins))
        if config["data"] is not None:
            load_data(config, scan=False)  # fills in the data section's defaults, as the stored config has them
        stored = config_of(ckpt, file, named=named)
    else:
        stored = config_of(ckpt, file, named=named)
        config = config_of(ckpt, file, with_epochs(overrides, epochs), named=named)
    if processes == 1 and config["parallel"] == "ddp":
        config.values["parallel"] = "none"  # a DDP run continued by one process
    with located_errors(config):
        check_parallel(config["parallel"], processes)
    differences = [d for d in config_differences(stored.values, config.values) if d[0] != "name"
                   and not (d[0] == "parallel" and processes != trained_by)  # said with the processes
                   and not _features_recorded(d)]
    refused = [d for d in differences if _is_fixed(d)]
    if refused:
        # name the section (model, data, optimizer, ...), or train's own key (train.batch_size)
        names = sorted({d[0] if d[0].startswith("train.") else d[0].split(".")[0] for d in refused})
        raise ConfigError(f"cannot resume with a different {', '.join(names)}: "
                          f"{_describe(refused)}", file=str(config_path or file),
                          hint=f"Start a new run from this checkpoint's weights: nncli resume {file} "
                               f"--config {config_path or 'CONFIG'} --warm-start.")
    stored_monitor = ckpt["best"]["metric"]
    monitor = monitored_metric(config, has_validation(config))
    if monitor != stored_monitor:
        raise ConfigError(f"the run's best epoch (best.pt, early stopping) is chosen by {stored_monitor}; "
                          f"it cannot change to {monitor} on resume", file=str(config_path or file),
                          hint=f"Keep train.early_stop.metric: {stored_monitor}, or start a new run from this "
                               f"checkpoint's weights: nncli resume {file} --config CONFIG --warm-start.")
    if config["train"]["epochs"] < ckpt["epoch"]:
        raise ConfigError(f"the run has already trained {ckpt['epoch']} epochs; --epochs "
                          f"{config['train']['epochs']} cannot take them back", file=str(file),
                          hint=f"To go on from an earlier epoch, resume its epoch_<N>.pt or {file.parent / 'best.pt'}: "
                               "that run continues in a new run directory, and this one is left as it is.")
    return ResumePlan(file, ckpt, stored, config, differences, trained_by, processes)


def _features_recorded(difference: tuple[str, Any, Any]) -> bool:
    """A CSV's `features` that a checkpoint left null (every column but the targets) and a config
    now records by name: the same columns, not a change of the data."""
    key, old, new = difference
    return key.endswith("features") and key.startswith("data.") and old is None and isinstance(new, list)


def continues_in_place(file: Path, out_dir: Path | None) -> bool:
    """Whether a resume of `file` goes on in the file's own run directory: only from the run's newest
    state, its last.pt (beside its config.yaml), and without --out. From any other checkpoint
    (best.pt, an epoch_<N>.pt, a file on its own) the run's files are left as they are, and training
    goes on in a new run directory beside the run (`<name>-2`, ...)."""
    return out_dir is None and file.name == "last.pt" and (file.parent / "config.yaml").is_file()


def check_resume_launch(path: Path, *, config_path: Path | None, overrides: list[str], epochs: int | None,
                        device: str | None, processes: int, warm: bool = False, named: Named = Named(),
                        out_dir: Path | None = None) -> None:
    """What `resume --nproc N` checks once before it starts N processes (which would each say
    it): the resume, or the warm start's config, the device for N processes, and that no other
    process trains in the run."""
    check_warm_start(warm, config_path)
    if not warm and is_nncli_checkpoint(path):
        plan = check_resume(path, overrides=overrides, epochs=epochs, config_path=config_path,
                            processes=processes, named=named)
        check_device(plan.config, device, processes)
        if continues_in_place(plan.file, out_dir):
            check_not_in_use(plan.file.parent)
    elif config_path is not None:
        check_launch(load_config(config_path, with_epochs(overrides, epochs)), device, processes)


def resume(path: Path, reporter: Reporter, *, overrides: list[str] = (), epochs: int | None = None,
           config_path: Path | None = None, device: str | None = None, named: Named = Named(),
           out_dir: Path | None = None) -> Run | None:
    """Continue the run saved at `path` (a run directory or a checkpoint file): in place from its
    last.pt, else in a new run directory (see continues_in_place); None when it has nothing left
    to do (finished, or stopped early)."""
    plan = check_resume(path, overrides=overrides, epochs=epochs, config_path=config_path,
                        processes=launched_processes(), named=named)
    file, ckpt, config, differences = plan.file, plan.ckpt, plan.config, plan.differences
    in_place, main = continues_in_place(file, out_dir), is_main_process()
    if in_place and main:
        check_not_in_use(file.parent)  # at once; the lock itself is taken before the first write
    run = prepare_run(config, device=device, run_dir=file.parent, epochs=config["train"]["epochs"],
                      notice=reporter.print, normalization=ckpt.get("normalization"))
    fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in run.optimizer.param_groups]
    fresh_schedule = copy.deepcopy(run.schedule.scheduler.state_dict()) if run.schedule else None
    restore(run, ckpt, file)
    if ckpt.get("data_fingerprint") not in (None, run.data.fingerprint) and main:
        warnings.warn("the run's data has changed since it was saved (a data file was edited or "
                      "replaced?); training continues on the new data, so it will not reproduce "
                      "an uninterrupted run")
    if differences:
        reporter.print(f"changed on resume: {_describe(differences)}")
    steps_done = run.state.step
    if plan.processes != plan.trained_by:
        steps_done = run.state.epoch * -(-len(run.batches) // config["train"]["accumulate"])
        reporter.print(f"continuing with {plan.processes} process{'es' if plan.processes > 1 else ''} "
                       f"instead of {plan.trained_by}: {len(run.batches)} batches per process each epoch; "
                       f"the run will not reproduce one that kept {plan.trained_by}")
    step_schedule = run.schedule is not None and run.schedule.interval == "step"
    if config_differences(plan.stored["optimizer"], config["optimizer"]) or \
            config_differences(plan.stored["schedule"], config["schedule"]) or \
            _length_changed(plan.stored, config) or (plan.processes != plan.trained_by and step_schedule):
        _replan_schedule(run, fresh_groups, fresh_schedule, reporter, steps_done)
    state = run.state
    if state.stopped_early or state.epoch >= run.epochs:
        why = "stopped early" if state.stopped_early else "finished"
        reporter.print(f"the run {why} at epoch {state.epoch} of {plan.stored['train']['epochs']}; nothing "
                       f"to do. Extend it with: {resume_command(config, path, plan.processes)} --epochs N")
        end_process(run.process)
        return None
    if in_place and main:  # the first write in the run directory
        run.lock = lock_run_dir(file.parent)
        remove_stale_temporaries(file.parent)  # what a writer killed mid-write left behind
        # rows of epochs after last.pt (a kill between the two writes) are trained again
        run.metrics_log = MetricsLog.restart(file.parent / "metrics.csv", run.state.history)
    if in_place:
        # config.yaml is rewritten with the next last.pt (save_checkpoints), so the two always agree
        run.config_changed = bool(differences) or plan.processes != plan.trained_by
    else:  # beside the run it came from, unless --out says where (or the file is in no run directory)
        beside = file.parent.parent if (file.parent / "config.yaml").is_file() else None
        start_run_dir(run, out_dir or beside, run.state.history)
        why = "with --out" if out_dir is not None else f"from {file.name}, not the run's last.pt"
        reporter.print(f"continuing {why}, in a new run directory: {run.run_dir} ({file.parent} is left "
                       "as it is)")
    where = f"epoch {state.epoch + 1} of {run.epochs}"
    if state.position:
        where += f", batch {state.position + 1} of {len(run.batches)}"
    reporter.print(f"resuming {file} at {where}; next learning rates: {next_rates(run)}")
    run_fit(run, reporter)
    return run


def next_rates(run: Run) -> str:
    """The rate each group's next step takes, as `lr_0=1e-05 (0.001 x 0.01, the schedule's factor)`:
    a learning rate set on resume is the base rate, and a schedule goes on scaling it."""
    parts = []
    for group, settings in zip(run.groups, run.optimizer.param_groups):
        lr, base = settings["lr"], group.settings.get("lr")
        part = f"{group.lr_column}={format_value(group.lr_column, lr)}"
        if run.schedule and isinstance(base, (int, float)) and base > 0 and not math.isclose(lr, base):
            part += f" ({base:.3g} x {lr / base:.3g}, the schedule's factor)"
        parts.append(part)
    return ", ".join(parts)


def _length_changed(stored: Config, config: Config) -> bool:
    spec = config["schedule"]
    name = spec if isinstance(spec, str) else (spec or {}).get("type")
    return name in LENGTH_ARGUMENT and stored["train"]["epochs"] != config["train"]["epochs"]


def _replan_schedule(run: Run, fresh_groups: list[dict], fresh_schedule: dict | None,
                     reporter: Reporter, steps_done: int) -> None:
    """The new settings (lr, schedule length) replace the checkpoint's: the fresh scheduler that
    `prepare_run` made is fast-forwarded over the optimizer steps (or epochs) already taken,
    from the new base rates."""
    for group, settings in zip(run.optimizer.param_groups, fresh_groups):
        group.update(settings)
    if run.schedule is None or run.schedule.monitor is not None:
        return  # ReduceLROnPlateau's state is its history of the metric: keep it
    scheduler = run.schedule.scheduler
    done = steps_done if run.schedule.interval == "step" else run.state.epoch
    scheduler.load_state_dict(fresh_schedule)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
        for _ in range(done):
            scheduler.step()
    reporter.print(f"schedule re-planned over {run.epochs} epochs"
                   + (f" ({run.schedule.note})" if run.schedule.note else "")
                   + f"; fast-forwarded {done} {run.schedule.interval}s")


def _as_layer_of(state: dict, own: dict) -> tuple[dict, str | None]:
    """A module's own state_dict (the tutorial's Linear: W, b) for a model that has it as a layer
    (lin.W, lin.b, or 0.W, 0.b in a Sequential): its keys with that layer's name in front, and the
    name; unchanged, and None, when the keys match the model's as they are or fit no one layer."""
    if set(state) & set(own):
        return state, None
    for layer in dict.fromkeys(key.split(".", 1)[0] for key in own):
        renamed = {f"{layer}.{key}": value for key, value in state.items()}
        if set(renamed) <= set(own):
            return renamed, layer
    return state, None


def warm_start(weights: Path, config_path: Path, reporter: Reporter, *, overrides: list[str] = (),
               epochs: int | None = None, strict: bool = True, device: str | None = None,
               out_dir: Path | None = None) -> Run:
    """A new run of `config_path` whose model starts from `weights`: a plain state_dict, or the
    model of an nncli checkpoint (from a run directory: its best.pt)."""
    weights = find_checkpoint(weights, prefer=("best.pt", "last.pt"))
    state = load_state_dict_file(weights)
    config = load_config(config_path, with_epochs(overrides, epochs))
    run = prepare_run(config, device=device, notice=reporter.print)
    own = run.model.state_dict()
    state, layer = _as_layer_of(state, own)
    if layer is not None:
        reporter.print(f"the weights are one module's ({len(state)} tensors): loaded into layer {layer}")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshaped = [f"{k} {list(state[k].shape)} (model: {list(own[k].shape)})" for k in state
                 if k in own and state[k].shape != own[k].shape]
    problems = [f"{label}: {', '.join(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)) if keys]
    if not any(k in own and v.shape == own[k].shape for k, v in state.items()):
        raise ConfigError(f"none of the weights fit the config's model: {'; '.join(problems)}", file=str(weights),
                          hint="Are these the weights of another model? `nncli summary --params` lists this one's.")
    if problems and strict:
        raise ConfigError(f"the weights do not fit the config's model: {'; '.join(problems)}",
                          file=str(weights), hint="Pass --no-strict to load the tensors that fit.")
    fitting = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    run.model.load_state_dict(fitting, strict=False)
    start_run_dir(run, out_dir)
    reporter.print(f"warm start from {weights}: loaded {len(fitting)} of {len(own)} tensors")
    if problems:  # a warning: shown with --quiet too
        warnings.warn(f"warm start from {weights}: not loaded: {'; '.join(problems)}")
    announce(run, reporter)
    run_fit(run, reporter)
    return run

