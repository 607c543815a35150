"""`nncli resume`: continue a run exactly where its checkpoint left it, or warm-start a new run
from weights: a plain state_dict, or (`--warm-start`) the model of an nncli checkpoint.

What may change on resume: the length (`--epochs`), and settings that do not change what the
checkpoint holds (learning rates, clipping, logging, checkpoint frequency, the device, ...).
What may not: the model, its plugins, the data (how it is read may: `loader`, `workers`,
`mmap`), the seed, the loss, the optimizer's type and which parameters its groups hold (their
learning rates may change), the schedule's type, the weight average (`train.ema`). Asking for
those lists the differences and stops (exit 2).
"""
from __future__ import annotations

import copy
import math
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from nncli.config import Config
from nncli.config.overrides import with_epochs
from nncli.config.schema import LOADER_KEYS, has_validation
from nncli.config.yamlio import to_plain
from nncli.errors import ConfigError, RunError
from nncli.files import remove_stale_temporaries
from nncli.optim.metrics import monitored_metric
from nncli.optim.schedules import SCHEDULERS, fast_forward
from nncli.report.console import ConsoleReporter, format_value
from nncli.report.loggers import open_loggers
from nncli.run.checkpoint import (
    file_stamp,
    find_checkpoint,
    holds_checkpoint,
    load_checkpoint,
    load_state_dict_file,
)
from nncli.run.devices import check_parallel, end_process, is_main_process, launched_processes
from nncli.run.inference import Named, config_of, planned_with_its_weights
from nncli.run.loop import resume_command
from nncli.run.rundir import check_not_in_use, lock_run_dir
from nncli.run.save import restore
from nncli.run.setup import (
    check_config,
    check_device,
    load_config,
    located_errors,
    optimizer_steps,
    prepare_run,
)
from nncli.run.state import Run
from nncli.run.train import announce, run_fit, start_run_dir

FIXED = ("model", "plugins", "data", "seed", "loss", "optimizer.type", "optimizer.groups",
         "schedule.type", "train.batch_size", "train.accumulate", "train.drop_last", "train.shuffle",
         "train.ema")
# Parts of a FIXED section that may change all the same. How the data is read, not which batches
# training sees: the loader keys, and a source's `mmap` in either layout. A parameter group's
# settings and name (`optimizer.groups.1.lr`, the tutorial's decay by hand); not its `params`.
HOW_DATA_IS_READ = ({f"data.{key}" for key in LOADER_KEYS}
                    | {f"data.{part}mmap" for part in ("", "train.", "val.")})
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
    stamp: tuple  # the checkpoint file's file_stamp when it was read


def check_resume(path: Path, *, overrides: list[str] = (), epochs: int | None = None,
                 config_path: Path | None = None, processes: int = 1, named: Named = Named()) -> ResumePlan:
    """Every check of a resume that needs no training set-up; `resume --nproc N` runs it once,
    before starting its N processes, so that bad input is said once. `named`: what the user allows
    the checkpoint's config to import and read (see inference.Named)."""
    file = find_checkpoint(path, prefer=("last.pt", "best.pt"))
    stamp = file_stamp(file)  # before reading: a file replaced since is noticed (see resume)
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
        stored = config_of(ckpt, file, named=named)
    else:
        stored = config_of(ckpt, file, named=named)
        config = config_of(ckpt, file, with_epochs(overrides, epochs), named=named)
    planned_with_its_weights(ckpt, stored, file)  # before a model is built to hold them
    if processes == 1 and config["parallel"] == "ddp":
        config.values["parallel"] = "none"  # a DDP run continued by one process
    _keep_recorded_classes(stored, config)
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
    monitor = monitored_metric(config, has_validation(config["data"]))
    if monitor != stored_monitor:
        raise ConfigError(f"the run's best epoch (best.pt, early stopping) is chosen by {stored_monitor}; "
                          f"it cannot change to {monitor} on resume", file=str(config_path or file),
                          hint=f"Keep train.early_stop.metric: {stored_monitor}, or start a new run from "
                               f"this checkpoint's weights: nncli resume {file} --config CONFIG "
                               "--warm-start.")
    if config["train"]["epochs"] < ckpt["epoch"]:
        raise ConfigError(f"the run has already trained {ckpt['epoch']} epochs; --epochs "
                          f"{config['train']['epochs']} cannot take them back", file=str(file),
                          hint="To go on from an earlier epoch, resume its epoch_<N>.pt or "
                               f"{file.parent / 'best.pt'}: that run continues in a new run directory, and "
                               "this one is left as it is.")
    return ResumePlan(file, ckpt, stored, config, differences, trained_by, processes, stamp)


def _keep_recorded_classes(stored: Config, config: Config) -> None:
    """The class names the run recorded (data.class_names) go on indexing its labels when `--config`
    gives a config that does not list them: its labels keep their indices even if the data
    now holds other names."""
    old, new = stored["data"] or {}, config["data"] or {}
    if old.get("class_names") is not None and new.get("class_names") is None and "class_names" in new:
        new["class_names"] = list(old["class_names"])


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


def resume(path: Path, reporter: ConsoleReporter, *, overrides: list[str] = (), epochs: int | None = None,
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
                      notice=reporter.print, normalization=ckpt.get("normalization"),
                      target_normalization=ckpt.get("target_normalization"))
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
        steps_done = run.state.epoch * optimizer_steps(config, run.batches)
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
        if file_stamp(file) != plan.stamp:  # another resume trained the run while this one prepared
            raise RunError(f"the run went on in another process since this resume read {file.name} (at epoch "
                           f"{ckpt['epoch']}); going on from there would overwrite what it trained",
                           file=str(file.parent), hint="Resume it again to go on from where it stands now.")
        remove_stale_temporaries(file.parent)  # what a writer killed mid-write left behind
        # rows of epochs after last.pt (a kill between the two writes) are trained again
        run.loggers = open_loggers(file.parent, run.state.history, config["loggers"])
    if in_place:
        # config.yaml is rewritten with the next last.pt (save_checkpoints), so the two always agree
        run.config_changed = bool(differences) or plan.processes != plan.trained_by
    else:  # beside the run it came from (or beside the file on its own), unless --out says where;
        # never in the checkpoint.dir that the checkpoint stores: nncli writes no path a checkpoint names
        beside = file.parent.parent if (file.parent / "config.yaml").is_file() else file.parent
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
    return (isinstance(name, str) and name in SCHEDULERS and SCHEDULERS.get(name).length_argument is not None
            and stored["train"]["epochs"] != config["train"]["epochs"])


def _replan_schedule(run: Run, fresh_groups: list[dict], fresh_schedule: dict | None,
                     reporter: ConsoleReporter, steps_done: int) -> None:
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
    fast_forward(scheduler, done)
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


@dataclass
class WeightsFit:
    """How a state_dict fits a model: the tensors that load, and what does not fit."""

    fitting: dict[str, Any]
    problems: list[str]  # "missing: ...", "unexpected: ...", "wrong shape: ..."
    layer: str | None  # one module's own state_dict, loaded into this layer


def fit_weights(state: dict, own: dict, weights: Path, strict: bool) -> WeightsFit:
    """What of `state` loads into a model whose state_dict is `own` (its tensors may be on the meta
    device: only names and shapes count); a ConfigError when nothing fits, or not all and `strict`."""
    state, layer = _as_layer_of(state, own)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshaped = [f"{k} {list(state[k].shape)} (model: {list(own[k].shape)})" for k in state
                 if k in own and state[k].shape != own[k].shape]
    problems = [f"{label}: {', '.join(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)) if keys]
    fitting = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    if not fitting:
        raise ConfigError(f"none of the weights fit the config's model: {'; '.join(problems)}",
                          file=str(weights),
                          hint="Are these the weights of another model? `nncli summary --params` lists "
                               "this one's.")
    if problems and strict:
        raise ConfigError(f"the weights do not fit the config's model: {'; '.join(problems)}",
                          file=str(weights), hint="Pass --no-strict to load the tensors that fit.")
    return WeightsFit(fitting, problems, layer)


def check_warm_start_launch(weights: Path, config: Config, *, strict: bool, device: str | None,
                            processes: int) -> None:
    """What a warm start checks before `--nproc N` starts its processes: the config as `validate`
    does, the device, and the weights against the model planned on the meta device."""
    plan, _ = check_config(config, processes)
    check_device(config, device, processes)
    weights = find_checkpoint(weights, prefer=("best.pt", "last.pt"))
    fit_weights(load_state_dict_file(weights), plan.model.state_dict(), weights, strict)


def warm_start(weights: Path, config_path: Path, reporter: ConsoleReporter, *, overrides: list[str] = (),
               epochs: int | None = None, strict: bool = True, device: str | None = None,
               out_dir: Path | None = None) -> Run:
    """A new run of `config_path` whose model starts from `weights`: a plain state_dict, or the
    model of an nncli checkpoint (from a run directory: its best.pt)."""
    weights = find_checkpoint(weights, prefer=("best.pt", "last.pt"))
    state = load_state_dict_file(weights)
    config = load_config(config_path, with_epochs(overrides, epochs))
    run = prepare_run(config, device=device, notice=reporter.print)
    own = run.model.state_dict()
    fit = fit_weights(state, own, weights, strict)
    if fit.layer is not None:
        reporter.print(f"the weights are one module's ({len(state)} tensors): loaded into layer {fit.layer}")
    run.model.load_state_dict(fit.fitting, strict=False)
    start_run_dir(run, out_dir)
    reporter.print(f"warm start from {weights}: loaded {len(fit.fitting)} of {len(own)} tensors")
    if fit.problems:  # a warning: shown with --quiet too
        warnings.warn(f"warm start from {weights}: not loaded: {'; '.join(fit.problems)}")
    announce(run, reporter)
    run_fit(run, reporter)
    return run


# --- one dispatch for `nncli resume` ------------------------------------------------------------

@dataclass(frozen=True)
class ResumeRequest:
    """What `nncli resume` was asked: continue a run, or warm-start a new one from weights."""

    path: Path
    config_path: Path | None = None
    warm: bool = False  # --warm-start: the weights of an nncli checkpoint, a new run
    overrides: tuple[str, ...] = ()
    epochs: int | None = None
    strict: bool = True
    device: str | None = None
    out_dir: Path | None = None
    named: Named = Named()

    def continues(self) -> bool:
        """Whether this continues a run (else it warm-starts a new one, from --config); what is
        neither is refused."""
        check_warm_start(self.warm, self.config_path)
        if not self.warm and is_nncli_checkpoint(self.path):
            return True
        if self.config_path is None:
            raise ConfigError("is not an nncli checkpoint; if it is a plain state_dict, give the "
                              "model's config to warm-start from it: nncli resume WEIGHTS --config CONFIG",
                              file=str(self.path))
        return False


def check_resume_launch(request: ResumeRequest, processes: int) -> None:
    """What `resume --nproc N` checks once before it starts N processes (which would each say
    it): everything one process checks before it trains, the device for N processes, and that no
    other process trains in the run."""
    if request.continues():
        plan = check_resume(request.path, overrides=list(request.overrides), epochs=request.epochs,
                            config_path=request.config_path, processes=processes, named=request.named)
        check_device(plan.config, request.device, processes)
        if continues_in_place(plan.file, request.out_dir):
            check_not_in_use(plan.file.parent)
    else:
        config = load_config(request.config_path, with_epochs(list(request.overrides), request.epochs))
        check_warm_start_launch(request.path, config, strict=request.strict, device=request.device,
                                processes=processes)


def resume_or_warm_start(request: ResumeRequest, reporter: ConsoleReporter) -> Run | None:
    """`nncli resume`: continue the run (None when it has nothing left to do), or warm-start one."""
    if request.continues():
        return resume(request.path, reporter, overrides=list(request.overrides), epochs=request.epochs,
                      config_path=request.config_path, device=request.device, named=request.named,
                      out_dir=request.out_dir)
    return warm_start(request.path, request.config_path, reporter, overrides=list(request.overrides),
                      epochs=request.epochs, strict=request.strict, device=request.device,
                      out_dir=request.out_dir)
