"""Training: set a run up from its config, then `fit` it, epoch by epoch.

The loop in `fit` is the whole story: forward, loss, backward, optional clipping and gradient
accumulation, optimizer step, schedule step; validation under `eval()` and `no_grad()`; the best
model, early stopping and checkpoints. Losses stay on the device and are read once per epoch
(and every few batches for a progress bar), never once per step.
"""
from __future__ import annotations

import contextlib
import copy
import math
import random
import re
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Callable

import numpy as np
import torch
import yaml
from torch import nn

from nncli import __version__
from nncli.checkpoint import (FORMAT, capture_rng, checkpoint_bytes, fitting_its_config, on_cpu, restore_rng,
                              write_atomic, write_text_atomic)
from nncli.config import Config, shown_path
from nncli.data import Data, check_targets, check_token_ids, data_paths, load_data
from nncli.devices import (Process, all_reduce_sum, autocast, check_parallel, configure_determinism,
                           end_process, failed_process, generator_devices, grad_scaler, is_peer_failure,
                           local_processes, out_of_memory_as_error, resolve_device, share_buffers, start_process,
                           weights_in_sync, wrap_model)
from nncli.errors import ConfigError, Interrupted, RunError, first_line, stop_signals_handled_by
from nncli.metrics import TOPK, check_metric_name, create_metric, higher_is_better
from nncli.model import ModelPlan, plan_model
from nncli.optim import (CLASS_INDEX_LOSSES, ParamGroup, Schedule, create_loss, create_optimizer, create_schedule,
                         loss_name, monitored_metric, optimizer_state_problem, recorded_metrics)
from nncli.reporting import Reporter
from nncli.rundir import MetricsLog, RunLock, claim_run_dir, read_history
from nncli.samples import Batches, Samples
from nncli.yamlio import to_plain


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
    metrics_log: MetricsLog | None = None  # the main process's metrics.csv

    @property
    def monitor(self) -> str:
        return monitored_metric(self.config, self.val is not None)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators. rich draws from Python's when first imported
    (rich.style), which a run that prints would do after this: imported first, so that the states
    saved in checkpoints do not depend on --quiet."""
    import rich.style  # noqa: F401

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


CLASSIFICATION_METRICS = ("accuracy", "top")


def check_training_config(config: Config) -> None:
    """Checks of the metric names: they fit the loss, and early stopping follows a recorded one."""
    classifier = loss_name(config) in CLASS_INDEX_LOSSES
    for i, name in enumerate(config["metrics"]):
        try:
            check_metric_name(name)
        except ConfigError as err:
            raise config.error(err.message, "metrics", i, hint=err.hint) from None
        if str(name).startswith(CLASSIFICATION_METRICS) != classifier:
            kind = "class labels" if classifier else "regression targets"
            raise config.error(f"metric '{name}' does not apply to {kind} ({loss_name(config)})",
                               "metrics", i, hint="Classification: accuracy, top<k>. Regression: "
                                                  "mae, rmse, r2.")
    early = config["train"]["early_stop"]
    if early:
        known = recorded_metrics(config)
        if early["metric"] not in known:
            raise config.error(f"metric '{early['metric']}' is not recorded; expected one of: "
                               f"{', '.join(known)}", "train", "early_stop", "metric")


def check_config(config: Config, processes: int = 1) -> tuple[ModelPlan, list[ParamGroup]]:
    """Every check possible without training (`nncli validate`, and `--nproc` before it starts
    its `processes`): the loss, the metrics, the model's shape pass on the meta device, the
    optimizer and its groups against the model's parameters, the schedule; and when the config
    has data, the data, and the targets and the loss against the model's output. Without data
    the schedule is checked as if an epoch were one step (a run takes at least that many).
    Returns the plan and the optimizer groups."""
    with located_errors(config):
        check_parallel(config["parallel"], processes)
    create_loss(config)  # an unknown loss name first: the targets' checks depend on the loss
    if config["data"] is None:
        check_training_config(config)
        plan, steps_per_epoch = plan_model(config), None
    else:
        data = load_data(config, scan=False)
        check_training_config(config)
        plan = plan_model(config, input_shape=_input_shape(config, data))
        check_data_fits_model(config, data, plan)
        batches = make_batches(config, data.train, Process(0, processes))
        steps_per_epoch = -(-len(batches) // config["train"]["accumulate"])
    warn_of_softmax_before_cross_entropy(config, plan)
    optimizer, groups = create_optimizer(plan.model, config)
    create_schedule(optimizer, config, steps_per_epoch)
    return plan, groups


def check_data_fits_model(config: Config, data: Data, plan: ModelPlan) -> None:
    """The data, the loss and the metrics against the planned model: targets shaped as its output,
    token ids within its Embedding, a loss that computes, top<k> below its classes."""
    output_shape = plan.output_shape[1:]
    check_targets(data, output_shape, config)
    check_token_ids(data, plan.model, config)
    check_loss(config, output_shape, data.train.y)
    classes = output_shape[0] if len(output_shape) == 1 else None
    for i, name in enumerate(config["metrics"]):
        if classes and (top := TOPK.match(name)) and int(top.group(1)) >= classes:
            raise config.error(f"{name} is always 1 for a model with {classes} classes; k must be below "
                               f"{classes}", "metrics", i)


def check_loss(config: Config, output_shape: tuple, targets: torch.Tensor) -> None:
    """Compute the loss once, on zeros shaped as the model's output and two of the targets, on the
    CPU: settings that fail only then (reduction: avg, label_smoothing: 2) are config errors
    before training, not a crash in its first step."""
    dtype = getattr(torch, config["model"]["input_dtype"])
    output = torch.zeros(min(len(targets), 2), *output_shape,
                         dtype=dtype if dtype.is_floating_point else torch.float32)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # said once in training, not here too
            create_loss(config)(output, targets[:2])
    except Exception as err:
        raise config.error(f"{loss_name(config)} fails when computed (on zeros shaped as the model's output, "
                           f"{list(output_shape)}, and two targets): {first_line(err)}", "loss") from None


def warn_of_softmax_before_cross_entropy(config: Config, plan: ModelPlan) -> None:
    """A Softmax or LogSoftmax as the last layer before CrossEntropyLoss (a Keras habit): the
    loss takes scores (logits) and applies log-softmax itself, so nothing fails, but after a
    Softmax the model trains worse, without a word."""
    if loss_name(config) != "CrossEntropyLoss" or not plan.layers:
        return
    last = plan.layers[-1]
    while last.type == "Sequential" and last.children:  # a block's last layer is the model's (not a Residual's)
        last = last.children[-1]
    if last.type == "Softmax":
        why = ("CrossEntropyLoss applies log-softmax to the model's output itself, so it takes these "
               "probabilities for scores: the gradients shrink and the model trains worse")
        hint = ("Drop the Softmax: the model then outputs scores (logits), with the same predicted class; "
                "or end with LogSoftmax and use loss: NLLLoss.")
    elif last.type == "LogSoftmax":
        why = "CrossEntropyLoss applies log-softmax to the model's output itself, so it is done twice"
        hint = ("Use loss: NLLLoss, the loss that takes log-probabilities (the same loss, done once); "
                "or drop the LogSoftmax.")
    else:
        return
    warnings.warn(str(ConfigError(f"the model ends with {last.type}, and {why}", file=config.source,
                                  line=last.line, key=f"{last.path} ({last.type})", hint=hint)))


@contextlib.contextmanager
def located_errors(config: Config, device_option: str | None = None) -> Iterator[None]:
    """The device module's errors name a key; say where its value came from: the config's line,
    or `--device` when that option gave the device."""
    try:
        yield
    except ConfigError as err:
        if device_option is not None and err.key == "device":
            raise ConfigError(err.message, key="--device", hint=err.hint) from None
        raise config.error(err.message, err.key, hint=err.hint) from None


def check_launch(config: Config, device: str | None, processes: int) -> None:
    """What `--nproc N` checks once before it starts N processes (which would each say it): the
    config, as `validate` does, and the device for N processes."""
    check_config(config, processes)
    check_device(config, device, processes)


def check_device(config: Config, device: str | None, processes: int) -> None:
    """The device (`--device`, else the config's) is there for `processes` processes."""
    with located_errors(config, device):
        resolve_device(config["device"] if device is None else device, processes=processes)


def make_batches(config: Config, train: Samples, process: Process) -> Batches:
    """The training batches of this process; an error when `batch_size` leaves none."""
    train_cfg = config["train"]
    batches = Batches(train, train_cfg["batch_size"], shuffle=train_cfg["shuffle"], seed=config["seed"],
                      drop_last=train_cfg["drop_last"], rank=process.rank, world_size=process.world_size)
    if len(batches) == 0:
        raise config.error(f"batch_size {train_cfg['batch_size']} leaves no full batch of the "
                           f"{batches.samples} training samples per process", "train", "batch_size")
    return batches


def _input_shape(config: Config, data: Data) -> tuple:
    declared = config["model"]["input_shape"]
    if declared is not None and tuple(declared) != data.sample_shape:
        raise config.error(f"is {list(declared)}, but the data's samples have shape "
                           f"{list(data.sample_shape)}", "model", "input_shape",
                           hint="Leave input_shape out and nncli takes it from the data.")
    return data.sample_shape


def prepare_run(config: Config, *, device: str | None = None, run_dir: Path | None = None,
                epochs: int | None = None, notice: Callable[[str], None] = print,
                normalization: dict | None = None) -> Run:
    """Load the data, build the model, loss, optimizer and schedule; nothing is trained yet.
    `normalization`: a resumed checkpoint's statistics (see load_data)."""
    with located_errors(config, device):
        target_device = resolve_device(config["device"] if device is None else device)
        if target_device.type == "cuda":  # the current GPU too: pinned copies, CUDA graphs and NCCL use it
            torch.cuda.set_device(target_device)
        process = start_process(config["parallel"], target_device)
    if process.world_size > 1:
        config.values["parallel"] = "ddp"  # implied by several processes: config.yaml says what ran
    configure_determinism(config["deterministic"], target_device)
    seed_everything(config["seed"])
    loss_fn = create_loss(config).to(target_device)  # first: the targets' checks depend on the loss
    data = load_data(config, normalization)
    check_training_config(config)
    # The weights depend on the seed alone, as in a hand-written script: built on the CPU with
    # torch's CPU generator whatever the device, then moved.
    seed_everything(config["seed"])
    with out_of_memory_as_error("building the model on the CPU", "`nncli summary` shows its size without "
                                "building it; use a smaller model, or a machine with more memory."):
        plan = plan_model(config, input_shape=_input_shape(config, data), device="cpu")
    check_data_fits_model(config, data, plan)
    warn_of_softmax_before_cross_entropy(config, plan)
    with out_of_memory_as_error(f"moving the model and data to {target_device}",
                                "The data and the model must fit in the device's memory together: "
                                "set data.loader: dataloader to keep the data on the host, or use a "
                                "smaller model, or device: cpu."):
        model = plan.model.to(target_device)
        train_data = data.train.to(target_device)
        val = data.val.to(target_device) if data.val is not None else None
    if val is not None and process.world_size > 1:
        val = val.subset(slice(process.rank, None, process.world_size))  # each process validates its share
    with located_errors(config):
        step_model = wrap_model(model, parallel=config["parallel"], device=target_device,
                                device_ids=config["device_ids"], compile_mode=config["compile"],
                                channels_last=config["channels_last"], process=process, notice=notice)
    optimizer, groups = create_optimizer(model, config)
    train_cfg = config["train"]
    batches = make_batches(config, train_data, process)
    epochs = epochs or train_cfg["epochs"]
    optimizer_steps = -(-len(batches) // train_cfg["accumulate"])
    schedule = create_schedule(optimizer, config, optimizer_steps, epochs)
    run = Run(config, plan, model, data, batches, val, loss_fn, optimizer, groups, schedule,
              target_device, run_dir or Path(config["checkpoint"]["dir"]) / config["name"], epochs,
              step_model, grad_scaler(config["amp"], target_device), process, plain_config=to_plain(config.values))
    run.state.best["metric"] = run.monitor
    return run


# --- the loop --------------------------------------------------------------------------------

class StopRequest:
    """SIGINT / SIGTERM / SIGHUP ask the loop to stop after the current optimizer step and save;
    a second signal stops at once (KeyboardInterrupt) without touching saved files."""

    def __init__(self, process: Process = Process()) -> None:
        self.requested = False
        self.process = process

    AGREE_EVERY = 10  # optimizer steps between two agreements of the DDP processes

    def agreed(self, step: int | None = None) -> bool:
        """Whether to stop now; alone, a flag check. Under DDP every process must stop at the same
        step, so the processes agree, with a tiny all-reduce and a host sync: after every
        AGREE_EVERY-th optimizer `step`, and at the end of each epoch (no `step`)."""
        if self.process.world_size == 1:
            return self.requested
        if step is not None and step % self.AGREE_EVERY:
            return False
        flag = torch.tensor([1.0 if self.requested else 0.0])
        all_reduce_sum(flag)
        agreed = bool(flag.item())
        # A signal that lands after the all-reduce is not lost: it counts at the next step.
        self.requested = self.requested or agreed
        return agreed

    def __enter__(self) -> StopRequest:
        self._signals = stop_signals_handled_by(self._handle)
        self._signals.__enter__()
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second signal (under --nproc, the launcher's second one is SIGTERM)
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        self._signals.__exit__(*exc)


def evaluate(model: nn.Module, data: Samples, loss_fn: nn.Module, metric_names: list[str],
             batch_size: int, amp: str = "off") -> dict[str, float]:
    """Loss and metrics over `data` under eval() and no_grad(), read from the device once.

    Under DDP `data` is this process's share, and the sums are added across processes."""
    was_training = model.training
    model.eval()
    device = data.device
    outputs = math.prod(data.y.shape[1:])  # numbers per sample, as the targets are shaped like the output
    metrics = {name: create_metric(name, device, outputs) for name in metric_names}
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.full((), float(len(data)), device=device, dtype=torch.float64)
    with torch.no_grad(), autocast(device, amp):
        for xb, yb in data.batches(torch.arange(len(data)), batch_size):
            out = model(xb)
            loss_sum += loss_fn(out, yb).double() * len(xb)
            for metric in metrics.values():
                metric.update(out.float(), yb)
    all_reduce_sum(loss_sum, count, *(t for m in metrics.values() for t in m.sums()))
    model.train(was_training)
    return {"loss": float(loss_sum / count), **{k: m.compute() for k, m in metrics.items()}}


def eval_batch_size(config: Config) -> int:
    """Validation's batch size: `train.eval_batch_size`, by default larger than training's, as no
    activations are kept for a backward pass."""
    return config["train"]["eval_batch_size"] or max(config["train"]["batch_size"], 1024)


def fit(run: Run, reporter: Reporter) -> TrainState:
    """Train from `run.state` to `run.epochs`; checkpoints and metrics.csv go to `run.run_dir`."""
    config, model, optimizer, state, scaler = run.config, run.step_model, run.optimizer, run.state, run.scaler
    train_cfg = config["train"]
    accumulate, grad_clip = train_cfg["accumulate"], train_cfg["grad_clip"]
    params = [p for p in model.parameters() if p.requires_grad]
    steps = len(run.batches)
    batch_sizes = run.batches.batch_sizes()
    divisors = accumulation_divisors(batch_sizes.tolist(), accumulate,
                                     summed=getattr(run.loss_fn, "reduction", "mean") == "sum")
    batch_sizes = batch_sizes.to(run.device)
    every_steps = config["checkpoint"]["every_steps"]
    channels_last = config["channels_last"]
    mixed_precision = autocast(run.device, config["amp"])  # one context, entered every step
    # DDP averages gradients across processes in backward(); with accumulation, only the last
    # micro-batch of an optimizer step needs it: the others run under no_sync().
    accumulating_ddp, no_context = accumulate > 1 and run.process.world_size > 1, contextlib.nullcontext()
    with StopRequest(run.process) as stop:
        while state.epoch < run.epochs and not state.stopped_early:
            epoch = state.epoch + 1
            model.train()
            if state.position == 0:
                state.epoch_lrs = [g["lr"] for g in optimizer.param_groups]
                run.epoch_shuffle = run.batches.generator.get_state()  # to replay this epoch on resume
            losses = list(torch.tensor(state.epoch_losses, device=run.device).unbind())  # resumed mid-epoch
            reporter.epoch_start(epoch, run.epochs, steps, state.position, state.epoch_lrs[0],
                                 run.batches.batch_size)
            started = time.perf_counter()
            for i, (xb, yb) in enumerate(run.batches.epoch(skip=state.position), start=state.position):
                if channels_last and xb.dim() == 4:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                last_micro_batch = (i + 1) % accumulate == 0 or i + 1 == steps
                with model.no_sync() if accumulating_ddp and not last_micro_batch else no_context:
                    with mixed_precision:
                        loss = run.loss_fn(model(xb), yb)
                    scaled = loss / divisors[i] if accumulate > 1 else loss
                    (scaler.scale(scaled) if scaler else scaled).backward()
                losses.append(loss.detach())
                if last_micro_batch:
                    if scaler:
                        scaler.unscale_(optimizer)
                    if grad_clip:
                        nn.utils.clip_grad_norm_(params, grad_clip)
                    if scaler:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    state.step += 1
                    if run.schedule:
                        run.schedule.step_batch()
                    stopping = i + 1 < steps and stop.agreed(state.step)
                    if stopping or (i + 1 < steps and every_steps and state.step % every_steps == 0):
                        state.position = i + 1
                        state.epoch_losses = _mean_over_processes(losses, run.process).tolist()
                        _check_finite(state.epoch_losses, epoch, run.process)
                        save_checkpoints(run, best=False)  # a mid-epoch checkpoint
                        if stopping:
                            raise Interrupted(_stopped_message(run))
                reporter.batch(i + 1, losses)
            epoch_losses = _mean_over_processes(losses, run.process)
            train_loss = float((epoch_losses * batch_sizes).sum() / batch_sizes.sum())
            _check_finite(epoch_losses.tolist(), epoch, run.process)
            row = {"epoch": epoch, "train_loss": train_loss}
            if run.val is not None:
                share_buffers(run.model, run.process)
                results = evaluate(run.model, run.val, run.loss_fn, config["metrics"],
                                   eval_batch_size(config), config["amp"])
                row.update({f"val_{k}": v for k, v in results.items()})
            row.update({group.lr_column: lr for group, lr in zip(run.groups, state.epoch_lrs)})
            row["time_s"] = time.perf_counter() - started
            if run.schedule:
                run.schedule.step_epoch(row)
            improved = _update_best(run, row)
            state.epoch, state.position, state.epoch_losses = epoch, 0, []
            state.history.append(row)
            if run.metrics_log is not None:  # before last.pt, which counts this row as its own
                run.metrics_log.append(row, state.history)
            save_checkpoints(run, best=improved)
            if epoch % train_cfg["log_every"] == 0 or epoch == run.epochs:
                reporter.epoch_end(row, run.epochs, improved)
            if stop.agreed() and state.epoch < run.epochs and not state.stopped_early:
                save_checkpoints(run, best=False, force=True)
                raise Interrupted(_stopped_message(run))
    return state


def accumulation_divisors(batch_sizes: list[float], accumulate: int, summed: bool = False) -> list[float]:
    """What each batch's loss is divided by when `accumulate` batches make one optimizer step, so
    that the step's gradient is the one large batch of its samples would give. A mean loss: the
    step's samples over the batch's (`accumulate` for equal batches of a full step; a last,
    shorter step or a short last batch weigh what they hold). A summed loss (reduction: sum): 1."""
    if summed:
        return [1.0] * len(batch_sizes)
    divisors = []
    for start in range(0, len(batch_sizes), accumulate):
        step = batch_sizes[start:start + accumulate]
        divisors += [sum(step) / size for size in step]
    return divisors


def _mean_over_processes(losses: list[torch.Tensor], process: Process) -> torch.Tensor:
    """The epoch's batch losses so far, each averaged over the DDP processes (NaNs included), so
    that every process sees the same values: the NaN check stops all of them together, and a
    mid-epoch checkpoint holds the losses of the whole job, not of the main process alone."""
    stacked = torch.stack(losses).float()
    if process.world_size > 1:
        all_reduce_sum(stacked)
        stacked /= process.world_size
    return stacked


def _check_finite(losses: list[float], epoch: int, process: Process) -> None:
    """Stop at a NaN or infinite loss. Under DDP the losses are the job's (every process stops at
    the same step), so only the main process says why."""
    bad = next((i for i, value in enumerate(losses) if not np.isfinite(value)), None)
    if bad is None:
        return
    if not process.is_main:
        raise RunError("")
    raise RunError(f"the loss became {losses[bad]} at epoch {epoch}, batch {bad + 1}; training "
                   "stopped and the checkpoints of earlier epochs are unchanged",
                   hint="Lower the learning rate, set train.grad_clip, or check the data.")


def _update_best(run: Run, row: dict) -> bool:
    """Track the best epoch by the monitored metric; count epochs without improvement."""
    state, metric = run.state, run.monitor
    value, best = row[metric], state.best["value"]
    early = run.config["train"]["early_stop"] or {}
    mode = early.get("mode", "auto")
    higher = higher_is_better(metric) if mode == "auto" else mode == "max"
    delta = early.get("min_delta", 0.0)
    improved = best is None or (value > best + delta if higher else value < best - delta)
    if improved:
        state.best.update(value=value, epoch=row["epoch"])
        state.bad_epochs = 0
    else:
        state.bad_epochs += 1
        if early and state.bad_epochs >= early["patience"]:
            state.stopped_early = True
    return improved


def _stopped_message(run: Run) -> str:
    """Where the run stopped and how to resume it; said by the main process only."""
    if not run.process.is_main:
        return ""
    where = f"epoch {run.state.epoch + (1 if run.state.position else 0)}"
    if run.state.position:
        where += f", batch {run.state.position} of {len(run.batches)}"
    return (f"stopped at {where}; saved {run.run_dir / 'last.pt'}. Resume with: "
            f"{resume_command(run.config, run.run_dir, run.process.world_size)}")


def resume_command(config: Config, target: Path | str, processes: int) -> str:
    """The command that continues a run of `config` from `target` (its directory or a checkpoint):
    with `--nproc N` when N processes on this machine ran it (a run over several machines goes on
    with the torchrun command that started it), and the options that let its checkpoint use its
    plugins and data files, which nncli takes only from the command line."""
    named = [f"--plugin {shown_path(Path(p)) if p.endswith('.py') else p}" for p in config.imported_plugins]
    folders = [path if path.is_dir() else path.parent for path in data_paths(config)]
    named += [f"--trust-data {shown_path(folder)}" for folder in dict.fromkeys(folders)
              if not any(other in folder.parents for other in folders)]
    options = "".join(f" {option}" for option in named)
    if processes == 1:
        return f"nncli resume {target}{options}"
    if local_processes(default=processes) == processes:
        return f"nncli resume {target} --nproc {processes}{options}"
    return f"torchrun <the same options> -m nncli resume {target}{options}"


# --- run directory and checkpoints -----------------------------------------------------------

def resolved_config_text(config: Config) -> str:
    return yaml.safe_dump(to_plain(config.values), sort_keys=False)


def checkpoint_dict(run: Run) -> dict:
    state = run.state
    rng = capture_rng(generator_devices(run.step_model, run.device))
    rng["data"] = run.epoch_shuffle if state.position else run.batches.generator.get_state()
    return {
        "format": FORMAT,
        "model": on_cpu(run.model.state_dict()),
        "optimizer": on_cpu(run.optimizer.state_dict()),
        "scheduler": on_cpu(run.schedule.scheduler.state_dict()) if run.schedule else None,
        "scaler": run.scaler.state_dict() if run.scaler else None,
        # where the run stands (copies: a best.pt kept in memory must not follow later epochs)
        **{f.name: copy.copy(getattr(state, f.name)) for f in fields(state) if f.name != "history"},
        "rng": rng,
        "config": run.plain_config,
        "config_dir": str(run.config.base_dir),
        "input_shape": list(run.plan.input_shape),
        "normalization": run.data.normalization,
        "data_fingerprint": run.data.fingerprint,
        "world_size": run.process.world_size,
        "metrics_rows": len(state.history),  # metrics.csv's rows that belong to this state
        "versions": {"nncli": __version__, "torch": str(torch.__version__)},
    }


def save_checkpoints(run: Run, best: bool, force: bool = False) -> None:
    """last.pt every `checkpoint.every` epochs, at the end, mid-epoch and when
    `force`d; best.pt when the monitored metric improved (kept in memory until the next last.pt
    when that is not this epoch, so a long run does not rewrite it every epoch); epoch_<N>.pt
    when `keep_last` asks. The main process only."""
    if not run.process.is_main:
        return
    cfg, state = run.config["checkpoint"], run.state
    finished = state.epoch >= run.epochs or state.stopped_early
    write_last = force or state.position or state.epoch % cfg["every"] == 0 or finished
    keep = cfg["keep_last"] and not state.position and state.epoch % cfg["every"] == 0
    if not (write_last or best or keep):
        return
    ckpt = checkpoint_dict(run)
    if best and not state.position:
        run.pending_best = ckpt if write_last else _snapshot(ckpt)
    if not (write_last or keep):
        return  # best.pt waits in memory for the next last.pt
    # best.pt and epoch_<N>.pt before last.pt: a crash between the writes then replays this
    # epoch on resume, which writes them again, instead of leaving best.pt an epoch behind.
    data = checkpoint_bytes(ckpt)  # serialised once for every file that holds this epoch
    if write_last and run.pending_best is not None:
        write_atomic(data if run.pending_best is ckpt else checkpoint_bytes(run.pending_best),
                     run.run_dir / "best.pt")
        run.pending_best = None
    if keep:
        write_atomic(data, run.run_dir / f"epoch_{state.epoch}.pt")
        kept = {int(found.group(1)): path for path in run.run_dir.glob("epoch_*.pt")
                if (found := EPOCH_CHECKPOINT.fullmatch(path.name))}  # only what save_checkpoints writes
        for epoch in sorted(kept)[:-cfg["keep_last"]]:
            kept[epoch].unlink(missing_ok=True)
    if write_last:
        write_atomic(data, run.run_dir / "last.pt")
        if run.config_changed:
            write_text_atomic(resolved_config_text(run.config), run.run_dir / "config.yaml")
            run.config_changed = False


EPOCH_CHECKPOINT = re.compile(r"epoch_(\d+)\.pt")


def _snapshot(ckpt: dict) -> dict:
    """A checkpoint dict that later training steps cannot change: the states that refer to live
    tensors are copied (on the CPU, where a GPU run's best.pt waits without taking GPU memory);
    the rest of `checkpoint_dict` is built fresh on each call."""
    return {**ckpt, **{k: on_cpu(ckpt[k], copy=True) for k in ("model", "optimizer", "scheduler")}}


def train(config: Config, reporter: Reporter, *, device: str | None = None,
          out_dir: Path | None = None) -> Run:
    """`nncli train`: prepare a run, write its directory (the main process only), fit it."""
    run = prepare_run(config, device=device, notice=reporter.print)
    start_run_dir(run, out_dir)
    announce(run, reporter)
    run_fit(run, reporter)
    return run


def start_run_dir(run: Run, out_dir: Path | None, history: list[dict] = ()) -> None:
    """A new run directory (never an earlier run's, never another's), locked for this process,
    holding the resolved config.yaml and, when the run goes on from an earlier one, its `history`
    in metrics.csv; the main process only."""
    if run.process.is_main:
        run.run_dir, run.lock = claim_run_dir(out_dir or Path(run.config["checkpoint"]["dir"]),
                                              run.config["name"])
        write_text_atomic(resolved_config_text(run.config), run.run_dir / "config.yaml")
        run.metrics_log = MetricsLog.restart(run.run_dir / "metrics.csv", list(history))


def announce(run: Run, reporter: Reporter) -> None:
    """What a new run says before its first epoch: where it writes, on which device, how much data;
    the schedule length nncli filled in; the optimizer's groups."""
    processes = f" x {run.process.world_size} processes" if run.process.world_size > 1 else ""
    reporter.print(f"run directory: {run.run_dir}   device: {run.device}{processes}   "
                   f"train/val samples: {len(run.data.train)}/{len(run.data.val) if run.val else 0}")
    if run.schedule and run.schedule.note:
        reporter.print(f"schedule: {run.schedule.note}")
    reporter.groups(run.groups, {n: p.numel() for n, p in run.model.named_parameters()})


def run_fit(run: Run, reporter: Reporter) -> None:
    """`fit`, then close the progress display and leave the process group whatever happened."""
    error = None
    try:
        with out_of_memory_as_error(f"training on {run.device}",
                                    "Lower train.batch_size (train.accumulate keeps the effective batch "
                                    "size), or train.eval_batch_size if it failed in validation, or set "
                                    "amp: bf16. The checkpoints of earlier epochs are unchanged."):
            fit(run, reporter)
        if run.process.world_size > 1:
            same = weights_in_sync(run.model)
            reporter.print(f"DDP: weights identical on all {run.process.world_size} processes" if same
                           else "warning: DDP processes ended with different weights")
    except BaseException as err:
        error = err
        if is_peer_failure(err) and (rank := failed_process()) is not None:
            raise RunError(f"stopped because process {rank} of the job failed") from None
        raise
    finally:
        reporter.close()
        for samples in (run.batches.data, run.val):
            if samples is not None:
                samples.close()
        if run.lock is not None:
            run.lock.release()
        # an agreed stop ends every process at the same step; any other error may be this one's alone
        end_process(run.process, together=error is None or isinstance(error, Interrupted), error=error)


def restore(run: Run, ckpt: dict, path: Path) -> None:
    """Put a run back exactly where the checkpoint `path` left it (model, optimizer, schedule, RNGs),
    its history read from the metrics.csv beside `path` (the rows the checkpoint counts as its own)."""
    with fitting_its_config(path):  # what an edited file can break
        run.model.load_state_dict(ckpt["model"])
        names = {id(p): name for name, p in run.model.named_parameters()}
        if (problem := optimizer_state_problem(run.optimizer, ckpt["optimizer"], names)) is not None:
            raise ValueError(problem)  # torch would take it, and fail at the first step
        run.optimizer.load_state_dict(ckpt["optimizer"])
        if run.scaler and ckpt.get("scaler"):
            run.scaler.load_state_dict(ckpt["scaler"])
        if run.schedule and ckpt.get("scheduler"):
            run.schedule.scheduler.load_state_dict(ckpt["scheduler"])
        restore_rng(ckpt["rng"], generator_devices(run.step_model, run.device))
        run.batches.generator.set_state(ckpt["rng"]["data"])
    saved = {f.name: ckpt[f.name] for f in fields(TrainState) if f.name != "history"}
    run.state = TrainState(**saved, history=saved_history(ckpt, path))
    run.epoch_shuffle = ckpt["rng"]["data"]


def saved_history(ckpt: dict, path: Path) -> list[dict]:
    """The metrics rows of the epochs a checkpoint has trained: from the metrics.csv beside it
    (files written before metrics.csv was appended to hold them themselves); what is missing
    from that file is said, and the run goes on without it."""
    if "metrics" in ckpt:
        return list(ckpt["metrics"])
    rows = ckpt["metrics_rows"]
    history = read_history(path.parent / "metrics.csv", rows)
    if history is None or len(history) < rows:
        warnings.warn(f"{path.parent / 'metrics.csv'} holds {len(history or [])} of the {rows} epochs of "
                      f"metrics that {path.name} has trained; the run goes on exactly, but its metrics.csv "
                      "lacks the rest")
    return history or []
