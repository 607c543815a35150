"""Helpers for the training tests (test_train.py, test_data.py, test_optim.py).

- `nncli(*args)`: run the typer app in-process; the result has exit_code, stdout, stderr.
- `nncli_process(*args)`: `python -m nncli ...` in a subprocess with pipes (no terminal), for
  real exit statuses and plain (non-terminal) output.
- `write(tmp_path, name, text)`: a dedented text file; `read_metrics(run_dir)`: metrics.csv rows.
- `TINY_REGRESSION`: a config that trains in milliseconds, for the loop's behaviour.
"""
from __future__ import annotations

import csv
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TEST_DATA = Path(__file__).resolve().parent / "data"

# Progress-bar and terminal-control characters that must never reach a log file (rich's bar
# is drawn with "━" and "╸"/"╺"; "━" also borders tables, so tests check it separately).
BAR_CHARS = ("\r", "\x1b[", "╸", "╺", "█", "⠋", "⠙", "⠹", "samples/s", "ETA")


def nncli(*args):
    """Run nncli in-process (CliRunner: no terminal, stderr kept apart from stdout)."""
    from typer.testing import CliRunner

    from nncli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def nncli_process(*args, cwd: Path | str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nncli", *map(str, args)], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def write(folder: Path, name: str, text: str) -> Path:
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def read_metrics(run_dir: Path) -> tuple[list[str], list[dict[str, float]]]:
    """metrics.csv as (header, rows of floats)."""
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = [{k: float(v) for k, v in row.items()} for row in reader]
        return list(reader.fieldnames), rows


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def only_run_dir(out: Path) -> Path:
    runs = [p for p in Path(out).iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


# A linear regression on 64 synthetic samples: one or a few steps per epoch, milliseconds each.
TINY_REGRESSION = """
seed: 0
data: {source: synthetic, kind: regression, n: 64, features: 2, val_split: 0.25}
loss: MSELoss
metrics: [mae]
optimizer: {type: SGD, lr: 0.1}
train: {epochs: 3, batch_size: 16}
model:
  layers:
    - {type: Linear, out_features: 1}
"""
