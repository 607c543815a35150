"""The training loop: `fit` trains a run, epoch by epoch; `evaluate` scores a model on data.

The loop in `fit` is the whole story: the batch made the model's input on the device (augmented,
for training, between its conversion to floats and its normalization), forward, loss, backward,
gradient accumulation, the optimizer step (`optimizer_step`: unscaling, clipping, the step, the
weight average, the schedule), a mid-epoch checkpoint when asked (`save_mid_epoch`), and the end
of an epoch (`end_epoch`: validation under `eval()` and `no_grad()`, of the weight average with
train.ema, the best model, early stopping, checkpoints). Losses stay on the device
and are read once per epoch (and every few batches for a progress bar), never once per step.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nncli.config import Config, data_paths, shown_path
from nncli.data.load import in_target_units
from nncli.data.samples import Samples
from nncli.errors import Interrupted, RunError, stop_signals_handled_by
from nncli.optim.metrics import Metric, create_metric, higher_is_better
from nncli.report.reporters import Reporter, Reporters
from nncli.run.devices import Process, all_reduce_sum, autocast, local_processes, share_buffers
from nncli.run.save import save_checkpoints
from nncli.run.state import Run, TrainState


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
             batch_size: int, amp: str = "off", target_normalization: dict | None = None,
             tallies: Sequence[Metric] = ()) -> dict[str, float]:
    """Loss and metrics over `data` under eval() and no_grad(), read from the device once; never
    augmented. With `target_normalization` (normalize_target) the loss is the one training
    minimizes, on standardized targets, and the metrics are in the targets' own units. `tallies`:
    more metrics to update, read by the caller (eval's per-class accuracy).

    Under DDP `data` is this process's share, and the sums are added across processes."""
    was_training = model.training
    model.eval()
    device = data.device
    outputs = math.prod(data.y.shape[1:])  # numbers per sample, as the targets are shaped like the output
    metrics = [*(create_metric(name, device, outputs) for name in metric_names), *tallies]
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.full((), float(len(data)), device=device, dtype=torch.float64)
    with torch.no_grad(), autocast(device, amp):
        for xb, yb in data.batches(torch.arange(len(data)), batch_size):
            out = model(data.prepare(xb))
            loss_sum += loss_fn(out, yb).double() * len(xb)
            out = in_target_units(out.float(), target_normalization)
            yb = in_target_units(yb, target_normalization)
            for metric in metrics:
                metric.update(out, yb)
    all_reduce_sum(loss_sum, count, *(t for m in metrics for t in m.sums()))
    model.train(was_training)
    return {"loss": float(loss_sum / count), **{name: m.compute() for name, m in zip(metric_names, metrics)}}


def eval_batch_size(config: Config) -> int:
    """Validation's batch size: `train.eval_batch_size`, by default larger than training's, as no
    activations are kept for a backward pass."""
    return config["train"]["eval_batch_size"] or max(config["train"]["batch_size"], 1024)


def fit(run: Run, reporter: Reporter) -> TrainState:
    """Train from `run.state` to `run.epochs`; checkpoints go to `run.run_dir`, and every event to
    `reporter` and the run's loggers (metrics.csv)."""
    config, model, state, train = run.config, run.step_model, run.state, run.batches.data
    reporters = Reporters([reporter, *run.loggers])
    accumulate, steps = config["train"]["accumulate"], len(run.batches)
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
    reporters.start(config, run.epochs, steps, run.batches.batch_size)
    with StopRequest(run.process) as stop:
        while state.epoch < run.epochs and not state.stopped_early:
            epoch = state.epoch + 1
            model.train()
            if state.position == 0:
                state.epoch_lrs = [g["lr"] for g in run.optimizer.param_groups]
                run.epoch_shuffle = run.batches.generator.get_state()  # to replay this epoch on resume
            losses = list(torch.tensor(state.epoch_losses, device=run.device).unbind())  # resumed mid-epoch
            reporters.epoch_start(epoch, state.position, state.epoch_lrs[0])
            started = time.perf_counter()
            for i, (xb, yb) in enumerate(run.batches.epoch(skip=state.position), start=state.position):
                xb = train.as_input(xb)  # on the device: the model's dtype, pixels in [0, 1]
                if run.augment is not None:  # training batches only, before normalization
                    xb, yb = run.augment(xb, yb, augmentation_generator(run, epoch, i))
                xb = train.normalize(xb)
                if channels_last and xb.dim() == 4:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                last_micro_batch = (i + 1) % accumulate == 0 or i + 1 == steps
                with model.no_sync() if accumulating_ddp and not last_micro_batch else no_context:
                    with mixed_precision:
                        loss = run.loss_fn(model(xb), yb)
                    scaled = loss / divisors[i] if accumulate > 1 else loss
                    (run.scaler.scale(scaled) if run.scaler else scaled).backward()
                losses.append(loss.detach())
                if last_micro_batch:
                    optimizer_step(run)
                    stopping = i + 1 < steps and stop.agreed(state.step)
                    if stopping or (i + 1 < steps and every_steps and state.step % every_steps == 0):
                        save_mid_epoch(run, i + 1, losses, epoch, stopping)
                reporters.batch(i + 1, losses)
            end_epoch(run, epoch, losses, batch_sizes, time.perf_counter() - started, reporters)
            if stop.agreed() and state.epoch < run.epochs and not state.stopped_early:
                save_checkpoints(run, best=False, force=True)
                raise Interrupted(_stopped_message(run))
    return state


def augmentation_generator(run: Run, epoch: int, batch: int) -> torch.Generator:
    """The generator that augments one training batch, seeded from the run's seed, the epoch, the
    batch and the DDP process. So a run resumed anywhere (after an epoch, inside one, after
    kill -9 from its last checkpoint) draws what an uninterrupted run draws, with no generator
    state to save or draws to replay, whichever loader reads the batches; and each DDP process
    draws its own. (torch's CPU generator takes 32 bits of a seed: in a million batches, about a
    hundred pairs draw alike, which does no harm.)"""
    key = f"augment {run.config['seed']} {epoch} {batch} {run.process.rank}".encode()
    seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return torch.Generator().manual_seed(seed)


def optimizer_step(run: Run) -> None:
    """One optimizer step on the gradients accumulated since the last: unscaled (fp16), clipped,
    taken, zeroed; then the schedule's step when it steps per batch."""
    optimizer, scaler, grad_clip = run.optimizer, run.scaler, run.config["train"]["grad_clip"]
    if scaler:
        scaler.unscale_(optimizer)
    if grad_clip:
        nn.utils.clip_grad_norm_(run.model.parameters(), grad_clip)  # frozen parameters have no grad
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update()
    run.state.step += 1
    if run.schedule:
        run.schedule.step_batch()


def save_mid_epoch(run: Run, position: int, losses: list[torch.Tensor], epoch: int, stopping: bool) -> None:
    """A checkpoint inside the epoch, `position` batches into it (checkpoint.every_steps, or a stop
    asked for); a stop then ends the run (exit 130)."""
    state = run.state
    state.position = position
    state.epoch_losses = _mean_over_processes(losses, run.process).tolist()
    _check_finite(state.epoch_losses, epoch, run.process)
    save_checkpoints(run, best=False)
    if stopping:
        raise Interrupted(_stopped_message(run))


def end_epoch(run: Run, epoch: int, losses: list[torch.Tensor], batch_sizes: torch.Tensor,
              seconds: float, reporters: Reporter) -> None:
    """The epoch's row (training loss, validation loss and metrics, learning rates, time), the
    schedule's epoch step, the best epoch and early stopping, the reporters, the checkpoints."""
    config, state = run.config, run.state
    epoch_losses = _mean_over_processes(losses, run.process)
    _check_finite(epoch_losses.tolist(), epoch, run.process)
    row = {"epoch": epoch, "train_loss": float((epoch_losses * batch_sizes).sum() / batch_sizes.sum())}
    if run.val is not None:
        model = run.validated_model  # the weight average, with train.ema
        share_buffers(model, run.process)
        results = evaluate(model, run.val, run.loss_fn, config["metrics"], eval_batch_size(config),
                           config["amp"], run.data.target_normalization)
        row.update({f"val_{k}": v for k, v in results.items()})
    row.update({group.lr_column: lr for group, lr in zip(run.groups, state.epoch_lrs)})
    row["time_s"] = seconds
    if run.schedule:
        run.schedule.step_epoch(row)
    improved = _update_best(run, row)
    state.epoch, state.position, state.epoch_losses = epoch, 0, []
    state.history.append(row)
    reporters.epoch_row(row, state.history)  # metrics.csv before the last.pt that counts its row
    save_checkpoints(run, best=improved)
    reporters.epoch_end(row, improved)


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
