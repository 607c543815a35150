"""What `nncli train` prints: the group table, progress, and the per-epoch metrics table.

On a terminal a rich progress bar (epoch, batch, loss, lr, samples/s, ETA); otherwise one plain
line per epoch (every `train.log_every`), so CI and cluster logs do not fill with bars. The loss
shown on the bar is read from the device only every few batches, never once per step.
"""
from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING

import torch

from nncli.optim.optimizers import ParamGroup, optimizer_settings
from nncli.report.chart import loss_chart
from nncli.report.loggers import history_columns
from nncli.report.reporters import Reporter

if TYPE_CHECKING:
    from rich.console import Console

    from nncli.config import Config


def make_console() -> Console:
    """rich's console for tables: as wide as the terminal; in a log, wide enough that a table of
    many metrics keeps its headers (rich would fit it into 80 columns)."""
    from rich.console import Console

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
    console.on_broken_pipe = _closed_output  # rich would exit the process; let the caller decide
    return console


def _closed_output() -> None:
    raise BrokenPipeError("the output was closed")


def silence_stdout() -> None:
    """Send what is left to print to /dev/null, after the reader of a pipe went away (so that the
    interpreter's last flush at exit does not fail a second time)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def format_value(key: str, value: object) -> str:
    if not isinstance(value, float):
        return str(value)
    if key.startswith("lr_"):
        return f"{value:.3g}"
    if key == "time_s":
        return f"{value:.2f}"
    return f"{value:.4f}"


class ConsoleReporter(Reporter):
    """Plain output: a line every `log_every` epochs. Also the base for the terminal progress display."""

    def __init__(self, console: Console | None = None, quiet: bool = False) -> None:
        self._console = console
        self.quiet = quiet
        self.epochs, self.log_every = 0, 1

    @property
    def console(self) -> Console:
        if self._console is None:  # rich is imported when there is something to show, not for --quiet
            self._console = make_console()
        return self._console

    def print(self, item: object) -> None:
        """A line (plain print: no wrapping or markup in logs) or a rich table."""
        if self.quiet:
            return
        try:
            if isinstance(item, str):
                print(item, flush=True)
            else:
                self.console.print(item)
        except BrokenPipeError:  # `nncli train ... | head`: the reader left; training goes on, unheard
            silence_stdout()
            self.quiet = True

    def groups(self, groups: list[ParamGroup], params: dict[str, int]) -> None:
        if self.quiet:
            return
        from rich.table import Table

        table = Table("Group", "Patterns", "Tensors", "Parameters", "Settings", title="Optimizer groups",
                      title_justify="left")
        for group in groups:
            table.add_row(group.name, ", ".join(group.patterns), str(len(group.param_names)),
                          f"{sum(params[n] for n in group.param_names):,}", optimizer_settings(group))
        self.print(table)

    def start(self, config: Config, epochs: int, steps: int, batch_size: int) -> None:
        self.epochs, self.log_every = epochs, config["train"]["log_every"]
        self.steps, self.batch_size = steps, batch_size

    def epoch_start(self, epoch: int, done: int, lr: float) -> None:
        self._started = time.perf_counter()

    def epoch_end(self, row: dict, improved: bool) -> None:
        if self.quiet or (row["epoch"] % self.log_every and row["epoch"] != self.epochs):
            return
        parts = [f"{k}={format_value(k, v)}" for k, v in row.items() if k != "epoch"]
        self.print(f"epoch {row['epoch']}/{self.epochs} " + " ".join(parts) + (" *" if improved else ""))

    def history(self, history: list[dict], best_epoch: int | None, log_every: int = 1) -> None:
        if self.quiet or not history:
            return
        from rich.table import Table

        table = Table(title="Metrics (* best)", title_justify="left")
        columns = history_columns(history)
        for key in columns:
            table.add_column(key, justify="right")
        for row in history:
            if (len(history) > 30 and row["epoch"] % log_every
                    and row["epoch"] not in (1, best_epoch, history[-1]["epoch"])):
                continue  # long runs: every log_every-th epoch, the first, the best and the last
            mark = " *" if row["epoch"] == best_epoch else ""
            table.add_row(*(format_value(k, row[k]) + (mark if k == "epoch" else "") if k in row else ""
                            for k in columns))
        self.print(table)


class ProgressReporter(ConsoleReporter):
    """A rich progress bar per epoch, refreshed about 20 times per epoch."""

    def __init__(self, console: Console | None = None) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        super().__init__(console)
        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[speed]} samples/s"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=self.console, transient=True)
        self.task = None  # the bar starts with the first epoch: nothing to clean up before it

    def epoch_start(self, epoch: int, done: int, lr: float) -> None:
        super().epoch_start(epoch, done, lr)
        self.every = max(1, self.steps // 20)
        if self.task is None:
            self.progress.start()
        else:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task("train", total=self.steps, completed=done,
                                           epoch=f"{epoch}/{self.epochs}",
                                           loss="-", lr=f"{lr:.3g}", speed="-")
        self._done_at_start = done

    def batch(self, done: int, losses: list[torch.Tensor]) -> None:
        if done % self.every:
            return
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        recent = torch.stack(losses[-self.every:]).mean().item()  # one read every `every` batches
        rate = (done - self._done_at_start) / elapsed
        self.progress.update(self.task, completed=done, loss=f"{recent:.4f}",
                             speed=f"{rate * self.batch_size:,.0f}")

    def history(self, history: list[dict], best_epoch: int | None, log_every: int = 1) -> None:
        """The metrics table, then a text chart of the losses (on a terminal only: a log has the
        table, and `nncli plot` draws the runs)."""
        super().history(history, best_epoch, log_every)
        for line in loss_chart(history, width=max(10, min(60, self.console.width - 12))):
            self.print(line)

    def close(self) -> None:
        self.progress.stop()


def make_reporter(quiet: bool) -> ConsoleReporter:
    """Quiet for --quiet and for every DDP process but the first (RANK is torchrun's)."""
    if quiet or int(os.environ.get("RANK", "0")) > 0:
        return ConsoleReporter(quiet=True)
    return ProgressReporter() if sys.stdout.isatty() else ConsoleReporter()
