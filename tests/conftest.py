"""Fixtures for the nncli tests; the helpers themselves live in helpers.py (`from helpers import ...`).

- `cli(*args, input=None)`: run the typer app in-process (fast); the result has exit_code, stdout,
  stderr. It is `helpers.invoke`; `helpers.run_nncli` runs `python -m nncli` in a subprocess and
  `helpers.write_config` writes a config file.
"""
from __future__ import annotations

import pytest

from helpers import invoke


@pytest.fixture
def cli():
    """Run nncli in-process: `cli("validate", path)` -> click Result (exit_code, stdout, stderr)."""
    return invoke
