"""Where training runs: the device, mixed precision, and the process group for DDP."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from nncli.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA, else MPS, else CPU; an explicit device that is not there is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank() if is_distributed() else 0)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"'{name}' is not a device; expected auto, cpu, cuda, cuda:N or mps",
                          key="device") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device '{name}' asked for, but this machine has no CUDA GPU "
                              "that PyTorch can use", key="device",
                              hint="Use device: auto or cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device '{name}' asked for, but only {torch.cuda.device_count()} "
                              "GPU(s) are visible", key="device")
        if device.index is None:
            device = torch.device("cuda", local_rank() if is_distributed() else 0)
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None)
                                       and torch.backends.mps.is_available()):
        raise ConfigError(f"device '{name}' asked for, but MPS is not available here", key="device",
                          hint="Use device: auto or cpu.")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device '{name}' is not supported; expected auto, cpu, cuda, cuda:N or mps",
                          key="device")
    return device


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """The autocast context for `amp` (off, bf16, fp16); a no-op context when off."""
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


# --- distributed -----------------------------------------------------------------------------

def is_distributed() -> bool:
    """Started by torchrun (or anything that sets its environment variables)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


@dataclass
class Process:
    """This process's place in the job: rank 0 of 1 unless started by torchrun."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0
