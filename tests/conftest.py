"""Fixtures for the nncli tests; the helpers themselves live in helpers.py (`from helpers import ...`).

- `cli(*args, input=None)`: run the typer app in-process (fast); the result has exit_code, stdout,
  stderr. It is `helpers.invoke`; `helpers.run_nncli` runs `python -m nncli` in a subprocess and
  `helpers.write_config` writes a config file.
"""
from __future__ import annotations

from collections.abc import Iterator

import pytest
from helpers import ENV, invoke


@pytest.fixture(scope="module", autouse=True)
def cpu_machine_unless_gpu_tests(request: pytest.FixtureRequest) -> Iterator[None]:
    """The tests are about a CPU machine, as in CI: on a GPU machine, every module but the
    GPU-marked one sees no GPU (its subprocesses through CUDA_VISIBLE_DEVICES, this process
    through torch.cuda); set before the module's own fixtures train anything."""
    if request.node.get_closest_marker("gpu"):
        yield
        return
    import torch

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(ENV, "CUDA_VISIBLE_DEVICES", "")
        patch.setattr(torch.cuda, "is_available", lambda: False)
        patch.setattr(torch.cuda, "device_count", lambda: 0)
        yield


@pytest.fixture
def cli():
    """Run nncli in-process: `cli("validate", path)` -> click Result (exit_code, stdout, stderr)."""
    return invoke
