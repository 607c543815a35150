"""What a run tells the world as it trains: a list of reporters, each told the same events.

The console (a progress bar or plain lines, report.console) is one; metrics.csv is another
(report.loggers). A new logger is one class with these hooks.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from nncli.config import Config


class Reporter:
    """The events of a run, in the order they come; every hook does nothing here."""

    def start(self, config: Config, epochs: int, steps: int, batch_size: int) -> None:
        """Training starts (or resumes): `config`'s run, `epochs` in all, `steps` batches of
        `batch_size` an epoch."""

    def epoch_start(self, epoch: int, done: int, lr: float) -> None:
        """An epoch starts, `done` of its batches already trained (a run resumed inside it)."""

    def batch(self, done: int, losses: list[torch.Tensor]) -> None:
        """`done` batches of the epoch are trained; `losses` are theirs, on the device (reading one
        waits for the device)."""

    def epoch_row(self, row: dict, history: list[dict]) -> None:
        """An epoch's `row` (metrics.csv's), the last of `history`, before the epoch's checkpoint
        is written: a logger writes it here, so that no checkpoint counts a row not yet written."""

    def sync(self) -> None:
        """A checkpoint is about to be written, counting the rows written so far: make them
        durable (fsync) now. Rows are appended without an fsync each, which on a small model costs
        more than its epoch; a checkpoint must never count a row that a power cut could take."""

    def epoch_end(self, row: dict, improved: bool) -> None:
        """The epoch ended with `row` and its checkpoints are written; `improved`: it is the best
        so far."""

    def close(self) -> None:
        """Training ended, however it ended."""


class Reporters(Reporter):
    """Several reporters told each event in turn."""

    def __init__(self, reporters: list[Reporter]) -> None:
        self.reporters = reporters

    def start(self, config: Config, epochs: int, steps: int, batch_size: int) -> None:
        for reporter in self.reporters:
            reporter.start(config, epochs, steps, batch_size)

    def epoch_start(self, epoch: int, done: int, lr: float) -> None:
        for reporter in self.reporters:
            reporter.epoch_start(epoch, done, lr)

    def batch(self, done: int, losses: list[torch.Tensor]) -> None:
        for reporter in self.reporters:
            reporter.batch(done, losses)

    def epoch_row(self, row: dict, history: list[dict]) -> None:
        for reporter in self.reporters:
            reporter.epoch_row(row, history)

    def sync(self) -> None:
        for reporter in self.reporters:
            reporter.sync()

    def epoch_end(self, row: dict, improved: bool) -> None:
        for reporter in self.reporters:
            reporter.epoch_end(row, improved)

    def close(self) -> None:
        for reporter in self.reporters:
            reporter.close()
