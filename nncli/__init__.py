"""nncli: train PyTorch networks described in YAML.

The Python API mirrors the commands: `load_config`, `build_model`, `plan_model`,
`register_layer`, `register_loss`, ... . Names are imported lazily so that `import nncli` (and `nncli --help`)
does not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_config": "nncli.run.setup",
    "Config": "nncli.config",
    "build_model": "nncli.run.setup",
    "plan_model": "nncli.model.plan",
    "register_layer": "nncli.model.layers",
    "register_loss": "nncli.optim.losses",
    "summarize": "nncli.report.summary",
    "load_data": "nncli.run.setup",
    "prepare_run": "nncli.run.setup",
    "fit": "nncli.run.loop",
    "ConfigError": "nncli.errors",
    "RunError": "nncli.errors",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nncli' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
