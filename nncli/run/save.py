"""What a run saves, and when: `checkpoint_dict` (everything to resume exactly), `save_checkpoints`
(last.pt, best.pt, epoch_<N>.pt), and `restore`, which puts a run back where a checkpoint left it.
The file format and its checks are nncli.run.checkpoint's.
"""
from __future__ import annotations

import copy
import re
import warnings
from dataclasses import fields
from pathlib import Path

import torch
import yaml

from nncli import __version__
from nncli.config import Config
from nncli.config.yamlio import to_plain
from nncli.files import write_atomic, write_text_atomic
from nncli.optim.optimizers import optimizer_state_problem
from nncli.report.loggers import read_history
from nncli.report.reporters import Reporters
from nncli.run.checkpoint import (
    FORMAT,
    capture_rng,
    checkpoint_bytes,
    fitting_its_config,
    on_cpu,
    restore_rng,
)
from nncli.run.devices import generator_devices
from nncli.run.state import Run, TrainState


def resolved_config_text(config: Config) -> str:
    return yaml.safe_dump(to_plain(config.values), sort_keys=False)


def checkpoint_dict(run: Run) -> dict:
    state = run.state
    rng = capture_rng(generator_devices(run.step_model, run.device))
    rng["data"] = run.epoch_shuffle if state.position else run.batches.generator.get_state()
    return {
        "format": FORMAT,
        # the weights validation scored: with train.ema their average, the live ones as training_model
        "model": on_cpu(run.validated_model.state_dict()),
        **({"training_model": on_cpu(run.model.state_dict()), "ema_updates": run.ema.updates}
           if run.ema else {}),
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
        "target_normalization": run.data.target_normalization,
        "classes": run.data.classes,
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
    Reporters(run.loggers).sync()  # the rows this checkpoint counts, on disk before it
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
    live = ("model", "training_model", "optimizer", "scheduler")
    return {**ckpt, **{k: on_cpu(ckpt[k], copy=True) for k in live if k in ckpt}}


def restore(run: Run, ckpt: dict, path: Path) -> None:
    """Put a run back exactly where the checkpoint `path` left it (model, optimizer, schedule, RNGs),
    its history read from the metrics.csv beside `path` (the rows the checkpoint counts as its own)."""
    with fitting_its_config(path):  # what an edited file can break
        run.model.load_state_dict(ckpt.get("training_model", ckpt["model"]))
        if run.ema is not None:
            if "training_model" not in ckpt:
                raise ValueError("the config has train.ema but the checkpoint holds no weight average")
            run.ema.load_state_dict(ckpt["model"], ckpt["ema_updates"])
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
