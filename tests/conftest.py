"""Fixtures for the nncli tests; the helpers themselves live in helpers.py (`from helpers import ...`).

- `cli(*args, input=None)`: run the typer app in-process (fast); the result has exit_code, stdout,
  stderr. It is `helpers.invoke`; `helpers.run_nncli` runs `python -m nncli` in a subprocess and
  `helpers.write_config` writes a config file.
"""
from __future__ import annotations

import os

import pytest

from helpers import ENV, invoke


def pytest_configure(config: pytest.Config) -> None:
    """The tests are about a CPU machine, as in CI; on a GPU machine they see no GPU (this process
    and its subprocesses), unless the run is `-m gpu` (bench/gpu_check.sh), which runs only the
    GPU tests. Set before anything asks CUDA about its devices."""
    if (config.option.markexpr or "").strip() != "gpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ENV["CUDA_VISIBLE_DEVICES"] = ""


@pytest.fixture
def cli():
    """Run nncli in-process: `cli("validate", path)` -> click Result (exit_code, stdout, stderr)."""
    return invoke
