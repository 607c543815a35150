"""Helpers shared by the nncli tests: `from helpers import ...` in any test file.

tests/ has no __init__.py, so pytest (its default "prepend" import mode) puts tests/ on sys.path
before it imports conftest.py and the test modules: `helpers` imports like a top-level module.

Running nncli:
- `invoke(*args, input=None)`: the typer app in-process through click's CliRunner (fast; no
  terminal; stderr kept apart from stdout). The result has exit_code, stdout, stderr. The `cli`
  fixture in conftest.py is this function.
- `Background(*args, cwd=...)`: `python -m nncli ARGS` left running in a session of its own:
  `wait_for_line(prefix)`, `interrupt()` (Ctrl-C: SIGINT to its process group), `finish()`.
- `run_nncli(*args, cwd=None)`: `python -m nncli ARGS` in a subprocess, for what needs a real
  process: exit statuses, signals, a fresh interpreter, plain (non-terminal) output. Text
  stdout/stderr; it never raises on the exit status. `run_python(*args)`: `python ARGS` the same
  way (`-c CODE`, `-m torch.distributed.run ...`); `nncli_argv(*args)`: the command, for Popen.
- `ENV`: every subprocess's environment: this one, with one thread per process, unbuffered
  output, a 200-column console and this checkout first on PYTHONPATH.
- `ok(result)`: assert that a subprocess or in-process run exited 0 (showing its output if not);
  returns the result.

Files:
- `write_config(folder, text, name="config.yaml")`: `text`, dedented, as folder/name; the path.
- `train_config(folder, text, name)`: `text` as folder/NAME.yaml, trained to the end by
  `python -m nncli train` into folder/runs: (config path, run directory).
- `load(path)`: a checkpoint, `torch.load(..., weights_only=True)` onto the CPU.
- `read_metrics(run_dir)`: metrics.csv as (header, rows of floats).
  `metrics_rows(run_dir)`: its rows as text without time_s, for comparing two runs exactly.
- `snapshot(folder)`: every file's bytes by name; `only_run_dir(out)`: the one run directory.
- `write_digits(out)`: the bundled digits as out/<word>/<index>.png (configs/data/digits_to_png.py;
  needs Pillow). `shipped_options(config, tmp)`: the `--set` options a shipped config needs to run
  in a fresh checkout: configs/images_folder.yaml's image folder, made in tmp (skips without Pillow).
"""
from __future__ import annotations

import csv
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
BROKEN = Path(__file__).resolve().parent / "broken"
DATA = Path(__file__).resolve().parent / "data"

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", COLUMNS="200",
           PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))

# Progress-bar and terminal-control characters that must never reach a log file (rich's bar
# is drawn with "━" and "╸"/"╺"; "━" also borders tables, so tests check it separately).
BAR_CHARS = ("\r", "\x1b[", "╸", "╺", "█", "⠋", "⠙", "⠹", "samples/s", "ETA")

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

# An MLP with Dropout for 3 classes (its input size inferred from the data): the model of the
# checkpoint and resume tests' runs. Append it to a config's other sections.
DROPOUT_MLP = """
model:
  layers:
    - {type: Linear, out_features: 32}
    - ReLU
    - {type: Dropout, p: 0.2}
    - {type: Linear, out_features: 3}
"""

# Four inputs into a frozen Linear (15 parameters, not trainable), then a trainable head (8).
FROZEN_AND_HEAD = """
model:
  input_shape: [4]
  layers:
    frozen: {type: Linear, out_features: 3, trainable: false}
    head: {type: Linear, out_features: 2}
"""


# --- running nncli ------------------------------------------------------------------------------

def invoke(*args, input: str | None = None):
    """Run nncli in-process: `invoke("validate", path)` -> click Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from nncli.cli import app

    runner = CliRunner()  # click >= 8.2 keeps stderr apart from stdout by default
    return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)


def nncli_argv(*args) -> list[str]:
    """The command line of `python -m nncli ARGS` (for subprocess.Popen, with env=ENV)."""
    return [sys.executable, "-m", "nncli", *map(str, args)]


def run_python(*args, cwd: Path | str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run `python ARGS` in a subprocess (cwd: the repository unless given), with ENV and no stdin."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd or REPO, env=ENV,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def run_nncli(*args, cwd: Path | str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run `python -m nncli ARGS` in a subprocess; text stdout/stderr, never raises on exit status."""
    return run_python("-m", "nncli", *args, cwd=cwd, timeout=timeout)


class Background:
    """`python -m nncli ...` running in the background; stdout read line by line."""

    def __init__(self, *args, cwd: Path) -> None:
        self.stderr_path = cwd / f"stderr-{time.monotonic_ns()}.txt"
        self._stderr = open(self.stderr_path, "w")
        # a session of its own, as a terminal gives a command: `interrupt` signals its whole group
        self.proc = subprocess.Popen(nncli_argv(*args), cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                                     stderr=self._stderr, text=True, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        self.stdout: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for_line(self, prefix: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise AssertionError(f"no line starting {prefix!r} within {timeout}s:\n"
                                     f"{''.join(self.stdout)}")
            if line is None:
                raise AssertionError(f"the process ended (exit {self.proc.wait()}) before printing "
                                     f"{prefix!r}:\n{''.join(self.stdout)}\n{self.stderr()}")
            self.stdout.append(line)
            if line.startswith(prefix):
                return line

    def finish(self, timeout: float = 120) -> tuple[int, str, str]:
        code = self.proc.wait(timeout=timeout)
        while (line := self.lines.get(timeout=10)) is not None:
            self.stdout.append(line)
        return code, "".join(self.stdout), self.stderr()

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text()

    def interrupt(self) -> None:
        """Ctrl-C in a terminal: SIGINT to every process in the command's foreground group."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def ok(result):
    """Assert that `result` (a CompletedProcess or a click Result) exited 0; return it."""
    code = result.returncode if isinstance(result, subprocess.CompletedProcess) else result.exit_code
    assert code == 0, f"exit {code}\n{result.stdout}\n{result.stderr}"
    return result


# --- files --------------------------------------------------------------------------------------

def write_config(folder: Path | str, text: str, name: str = "config.yaml") -> Path:
    """Write `text` (dedented, leading blank lines dropped) to folder/name and return the path."""
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def train_config(folder: Path, text: str, name: str) -> tuple[Path, Path]:
    """Write `text` as folder/NAME.yaml and train it in a subprocess (`--out folder/runs -q`, asserting
    exit 0): the config file and the run directory, folder/runs/NAME."""
    config = write_config(folder, text, f"{name}.yaml")
    ok(run_nncli("train", config, "--out", Path(folder) / "runs", "-q", cwd=folder))
    return config, Path(folder) / "runs" / name


def load(path: Path) -> dict:
    """A checkpoint or state_dict file, loaded onto the CPU with weights_only=True."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def _metrics_csv(run_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames), rows


def read_metrics(run_dir: Path) -> tuple[list[str], list[dict[str, float]]]:
    """metrics.csv as (header, rows of floats)."""
    header, rows = _metrics_csv(run_dir)
    return header, [{k: float(v) for k, v in row.items()} for row in rows]


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv's rows as text, time_s left out: two runs that learnt the same compare equal."""
    return [{k: v for k, v in row.items() if k != "time_s"} for row in _metrics_csv(run_dir)[1]]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file directly in `folder`: name -> bytes (to check that nothing was written)."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def write_digits(out: Path) -> Path:
    """The bundled digits as out/<word>/<index>.png, by configs/data/digits_to_png.py."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("digits_to_png", CONFIGS / "data" / "digits_to_png.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_digits(Path(out))


def shipped_options(config: Path, tmp: Path) -> list[str]:
    """`--set` options for a shipped config whose data a fresh checkout lacks: images_folder.yaml's
    folder, which its comment tells the user to make, is made in `tmp` (skipped without Pillow)."""
    if Path(config).name != "images_folder.yaml":
        return []
    import pytest

    pytest.importorskip("PIL")
    folder = Path(tmp) / "digits_png"
    if not folder.is_dir():
        write_digits(folder)
    return ["--set", f"data.root={folder}"]


def only_run_dir(out: Path) -> Path:
    """The single run directory under `out` (asserts there is exactly one)."""
    runs = [p for p in Path(out).iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]
