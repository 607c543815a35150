"""Loggers: reporters that write a run's history into its run directory, an epoch at a time,
so that saving costs the same at epoch 4,000 as at epoch 4. A checkpoint records how many of the
history's rows are its own (`metrics_rows`); a resumed run opens its loggers with those rows,
which cuts off any written after the checkpoint.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from nncli.errors import ConfigError, RunError
from nncli.files import write_text_atomic
from nncli.report.reporters import Reporter

if TYPE_CHECKING:
    from nncli.config import Config


def history_columns(history: list[dict]) -> list[str]:
    """The columns of metrics.csv and of the table: the latest row's first, then any that only
    earlier rows have (metrics added or dropped on resume leave empty cells)."""
    return list(dict.fromkeys([*history[-1], *(key for row in history for key in row)]))


def _csv_text(columns: list[str], rows: list[dict], header: bool) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, restval="", lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


class AppendedLog(Reporter):
    """A file that grows a line per epoch: appended without an fsync each (one costs more than a
    small model's epoch), fsynced in `sync`, before the checkpoint that counts its lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.unsynced = False  # lines appended since the last fsync

    def append(self, text: str) -> None:
        try:
            with open(self.path, "a", encoding="utf-8", newline="") as f:
                f.write(text)
        except OSError as err:
            raise RunError(f"cannot write {self.path}: {err.strerror or err}", file=str(self.path)) from None
        self.unsynced = True

    def sync(self) -> None:
        if not self.unsynced:
            return
        try:
            with open(self.path, "rb") as f:
                os.fsync(f.fileno())
        except OSError as err:
            raise RunError(f"cannot write {self.path}: {err.strerror or err}", file=str(self.path)) from None
        self.unsynced = False


class MetricsCsv(AppendedLog):
    """`metrics.csv`: the run's history, a row per epoch. A row whose columns the file already has
    is appended; one with new columns (a metric added on resume) rewrites the file once."""

    FILE = "metrics.csv"

    def __init__(self, run_dir: Path, history: list[dict]) -> None:
        """A log that holds exactly `history` (a checkpoint's rows, or none for a new run): later
        rows, which a run killed after its last checkpoint left behind, are cut off."""
        super().__init__(run_dir / self.FILE)
        self.columns = history_columns(history) if history else []
        if history:  # else the first row written replaces the whole file
            write_text_atomic(_csv_text(self.columns, history, header=True), self.path)

    def epoch_row(self, row: dict, history: list[dict]) -> None:
        if not self.columns or set(row) - set(self.columns):
            self.columns = history_columns(history)
            write_text_atomic(_csv_text(self.columns, history, header=True), self.path)
            return
        self.append(_csv_text(self.columns, [row], header=False))


def read_history(path: Path, rows: int) -> list[dict] | None:
    """Up to the first `rows` complete rows of a metrics.csv as numbers (epoch an integer, empty
    cells left out); None when the file is missing or unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    found = list(csv.DictReader(io.StringIO(text)))
    if found and not text.endswith("\n"):
        found.pop()  # cut off in the middle of a row (a kill while it was appended)
    try:
        return [{key: int(cell) if key == "epoch" else float(cell)
                 for key, cell in values.items() if cell not in ("", None)} for values in found[:rows]]
    except (TypeError, ValueError):
        return None


class MetricsJsonl(AppendedLog):
    """`metrics.jsonl`: one JSON object per epoch (metrics.csv's row), a line each, appended as
    the epoch ends, for tools that tail a run."""

    FILE = "metrics.jsonl"

    def __init__(self, run_dir: Path, history: list[dict]) -> None:
        """A file that holds exactly `history` (see MetricsCsv)."""
        super().__init__(run_dir / self.FILE)
        if history or self.path.exists():
            write_text_atomic("".join(json.dumps(row) + "\n" for row in history), self.path)

    def epoch_row(self, row: dict, history: list[dict]) -> None:
        self.append(json.dumps(row) + "\n")


def _tensorboard(run_dir: Path, history: list[dict]) -> Reporter:
    from nncli.report.tensorboard import TensorBoardScalars  # its own module: tensorboardX, the extra

    return TensorBoardScalars(run_dir, history)


# The loggers a config's `loggers:` may name (config.schema.LOGGER_NAMES, which the torch-free
# schema checks against): name -> what opens it in a run directory.
LOGGERS = {"csv": MetricsCsv, "tensorboard": _tensorboard, "jsonl": MetricsJsonl}


def check_loggers(config: Config) -> None:
    """What the config's loggers need is installed (before a run directory is made)."""
    if "tensorboard" in config["loggers"]:
        from nncli.report.tensorboard import require_tensorboardx

        try:
            require_tensorboardx()
        except ConfigError as err:
            raise config.error(err.message, "loggers", hint=err.hint) from None


def open_loggers(run_dir: Path, history: list[dict], names: list[str]) -> list[Reporter]:
    """The run directory's loggers `names` (config `loggers:`), holding `history` (see MetricsCsv)."""
    return [LOGGERS[name](run_dir, history) for name in names]
