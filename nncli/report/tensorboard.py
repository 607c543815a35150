"""The `tensorboard` logger: a run's scalars as TensorBoard event files in `<run>/tensorboard/`.

Written with tensorboardX (the `tensorboard` extra): it writes the standard event files that
TensorBoard reads, and needs only numpy and protobuf, where torch.utils.tensorboard needs the
whole `tensorboard` package (its server, grpcio, werkzeug, ...) just to write them. Its
synchronous `EventsWriter`, not the SummaryWriter's queue and thread: an epoch's scalars are on
disk (fsynced) before the checkpoint that counts the epoch, as metrics.csv's row is.

- Per epoch, step = the epoch: every column of metrics.csv (`train_loss`, `val_loss`,
  `val_<metric>`, `lr_<group>`, `time_s`) under its own name.
- Per optimizer step, with `train.log_every_steps: N`: `step/train_loss`, the mean loss of the
  step's batches, every N steps (step = the optimizer step, counted as if every epoch took the
  run's current number of steps).

Resume appends and never shows an epoch twice: events from after the checkpoint that the run
resumes from (epochs or steps trained before a crash, which it trains again) are cut out of the
existing files, which are rewritten without them, before anything new is written. A run that
goes on in a new directory, or adds the logger on resume, gets the checkpoint's epochs first.
"""
from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING

from nncli.errors import ConfigError, RunError
from nncli.report.reporters import Reporter

if TYPE_CHECKING:
    import torch
    from tensorboardX.event_file_writer import EventsWriter

    from nncli.config import Config

FOLDER = "tensorboard"
STEP_PREFIX = "step/"  # tags whose step is the optimizer step, not the epoch
EXTRA_HINT = "Install the extra: pip install 'nncli[tensorboard]' (tensorboardX)."


def require_tensorboardx() -> None:
    """A ConfigError naming the extra when tensorboardX is not installed."""
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        raise ConfigError("the tensorboard logger needs tensorboardX, which is not installed", key="loggers",
                          hint=EXTRA_HINT) from None


def read_scalars(folder: Path) -> list[tuple[str, int, float, float]]:
    """Every scalar in the event files of `folder` as (tag, step, value, wall time), file by file
    in name order, read with tensorboardX's own protocol buffers (a record: its length, a CRC,
    the event, a CRC)."""
    from tensorboardX.proto import event_pb2

    scalars = []
    for path in sorted(Path(folder).glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            start = offset + 12
            if start + length + 4 > len(data):
                break  # a record cut short (a crash while it was written)
            event = event_pb2.Event.FromString(data[start:start + length])
            offset = start + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.append((value.tag, event.step, value.simple_value, event.wall_time))
    return scalars


class TensorBoardScalars(Reporter):
    """`<run>/tensorboard/`: the run's scalars per epoch, and per optimizer step when asked."""

    writer: EventsWriter | None

    def __init__(self, run_dir: Path, history: list[dict]) -> None:
        require_tensorboardx()
        self.folder = run_dir / FOLDER
        self.history = list(history)
        self.writer = None
        self.every_steps, self.batches, self.steps_per_epoch, self.accumulate = None, 1, 1, 1
        self.epoch, self.step_of_epoch = 0, 0

    def start(self, config: Config, epochs: int, steps: int, batch_size: int) -> None:
        self.every_steps = config["train"]["log_every_steps"]
        self.accumulate, self.batches = config["train"]["accumulate"], steps
        self.steps_per_epoch = -(-steps // self.accumulate)

    def epoch_start(self, epoch: int, done: int, lr: float) -> None:
        self.epoch = epoch
        if self.writer is None:  # where the run goes on from is known now: cut what came after it
            self._open(epochs_done=epoch - 1, steps_done=self._global_step(epoch, done))

    def _global_step(self, epoch: int, done: int) -> int:
        return (epoch - 1) * self.steps_per_epoch + -(-done // self.accumulate)

    def _open(self, epochs_done: int, steps_done: int) -> None:
        existing = sorted(self.folder.glob("events.out.tfevents.*"))
        written = read_scalars(self.folder) if existing else []
        kept = [scalar for scalar in written
                if scalar[1] <= (steps_done if scalar[0].startswith(STEP_PREFIX) else epochs_done)]
        from tensorboardX.event_file_writer import EventsWriter

        self.folder.mkdir(parents=True, exist_ok=True)
        # a suffix of its own: tensorboardX names files by the second, and would overwrite one
        self.writer = EventsWriter(str(self.folder / "events"), f".{time.time_ns()}")
        if len(kept) < len(written):
            for tag, step, value, wall_time in kept:  # the files without the events after the checkpoint
                self._add(tag, value, step, wall_time)
            self._flush()
            for path in existing:
                path.unlink()
        elif not existing:  # a new directory for a run that goes on: the epochs it has trained
            for row in self.history:
                self._add_row(row)
        self._flush()

    def _add(self, tag: str, value: float, step: int, wall_time: float | None = None) -> None:
        from tensorboardX.proto import event_pb2, summary_pb2

        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])
        self.writer.write_event(event_pb2.Event(wall_time=wall_time or time.time(), step=step,
                                                summary=summary))

    def _add_row(self, row: dict) -> None:
        for key, value in row.items():
            if key != "epoch":
                self._add(key, value, row["epoch"])

    def _flush(self) -> None:
        try:
            self.writer.flush()  # fsynced
        except OSError as err:
            raise RunError(f"cannot write {self.folder}: {err.strerror or err}",
                           file=str(self.folder)) from None

    def batch(self, done: int, losses: list[torch.Tensor]) -> None:
        ends_a_step = done % self.accumulate == 0 or done == self.batches
        if not self.every_steps or not ends_a_step:
            return
        step = self._global_step(self.epoch, done)
        if step % self.every_steps:
            return
        in_step = done - (-(-done // self.accumulate) - 1) * self.accumulate  # the step's batches
        import torch

        loss = float(torch.stack(losses[-in_step:]).float().mean())  # one read of the device
        self._add(f"{STEP_PREFIX}train_loss", loss, step)
        self._flush()

    def epoch_row(self, row: dict, history: list[dict]) -> None:
        self._add_row(row)
        self._flush()  # on disk before the checkpoint that counts this epoch

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
