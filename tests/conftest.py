"""Shared helpers for the nncli tests.

- `cli(*args)`: run the typer app in-process (fast); the result has exit_code, stdout, stderr.
- `run_nncli(*args, cwd=None)`: run `python -m nncli ...` in a subprocess (for the few tests that
  need a fresh interpreter: import side effects, a real process exit).
- `write_config(tmp_path, text, name="config.yaml")`: write a config file and return its path.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
CONFIGS = REPO / "configs"
BROKEN = Path(__file__).parent / "broken"
DATA = Path(__file__).parent / "data"


@pytest.fixture
def cli():
    """Run nncli in-process: `cli("validate", path)` -> click Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from nncli.cli import app

    runner = CliRunner()  # click >= 8.2 keeps stderr apart from stdout by default

    def invoke(*args, input: str | None = None):
        return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)

    return invoke


def run_nncli(*args, cwd: Path | str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python -m nncli ARGS` in a subprocess; text stdout/stderr, never raises on exit status."""
    return subprocess.run([sys.executable, "-m", "nncli", *map(str, args)], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout)


def write_config(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    """Write `text` (dedented) to tmp_path/name and return the path."""
    path = Path(tmp_path) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path
