"""Where training runs: the device, mixed precision, and the process group for DDP."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from nncli.errors import ConfigError, RunError


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
            raise ConfigError(f"'{name}' asked for, but this machine has no CUDA GPU "
                              "that PyTorch can use", key="device",
                              hint="Use device: auto or cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"'{name}' asked for, but only {torch.cuda.device_count()} "
                              "GPU(s) are visible", key="device")
        if device.index is None:
            device = torch.device("cuda", local_rank() if is_distributed() else 0)
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None)
                                       and torch.backends.mps.is_available()):
        raise ConfigError(f"'{name}' asked for, but MPS is not available here", key="device",
                          hint="Use device: auto or cpu.")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"'{name}' is not supported; expected auto, cpu, cuda, cuda:N or mps",
                          key="device")
    return device


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """The autocast context for `amp` (off, bf16, fp16); a no-op context when off."""
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def out_of_memory_as_error(doing: str, hint: str) -> Iterator[None]:
    """A device running out of memory while `doing` something becomes a RunError (exit 1) with
    a hint, instead of torch's multi-line message and a traceback."""
    try:
        yield
    except torch.OutOfMemoryError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else "out of memory"
        raise RunError(f"out of memory {doing}: {first_line}", hint=hint) from None


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


def start_process(parallel: str, device: torch.device) -> Process:
    """Join torchrun's process group when started by it (NCCL on GPUs, gloo on CPU)."""
    if not is_distributed():
        if parallel == "ddp":
            raise ConfigError("ddp needs several processes: start with "
                              "`nncli train CONFIG --nproc N` or `torchrun --nproc_per_node N -m nncli train CONFIG`",
                              key="parallel")
        return Process()
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend)
    return Process(dist.get_rank(), dist.get_world_size())


def end_process(process: Process) -> None:
    if process.world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()  # leave together: gloo aborts a process whose peer tears down first
            dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, *, parallel: str, device: torch.device, device_ids: list | None,
               compile_mode: bool | str, channels_last: bool, process: Process,
               notice: Callable[[str], None]) -> torch.nn.Module:
    """The module the training step calls: `model` itself, or DataParallel / DDP / compiled around it.

    Checkpoints always save `model`, the unwrapped network, so their keys carry no `module.` or
    `_orig_mod.` prefix whatever wrapped it."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
    step_model = model
    if parallel == "dp":
        count = torch.cuda.device_count() if device.type == "cuda" else 0
        ids = device_ids or list(range(count))
        if len(ids) < 2:
            notice(f"parallel: dp needs two or more GPUs, and {len(ids)} {'is' if len(ids) == 1 else 'are'} "
                   "visible: training without the DataParallel wrapper")
        else:
            notice("parallel: dp wraps the model in nn.DataParallel; PyTorch recommends DDP even on "
                   "one machine (parallel: ddp with --nproc N)")
            step_model = torch.nn.DataParallel(model, device_ids=ids)
    elif process.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        step_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile_mode:
        mode = compile_mode if isinstance(compile_mode, str) else None
        step_model = torch.compile(step_model, mode=mode)
    return step_model


def grad_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling; bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum tensors across the process group in place (nothing to do in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in tensors:
            dist.all_reduce(tensor)


def configure_determinism(deterministic: bool, device: torch.device) -> None:
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels


def weights_in_sync(model: torch.nn.Module) -> bool:
    """Whether every process holds the same weights (compares per-tensor sums' max and min)."""
    import torch.distributed as dist

    sums = torch.stack([p.detach().double().sum().cpu() for p in model.state_dict().values()
                        if p.is_floating_point()])
    high, low = sums.clone(), sums.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return bool(torch.equal(high, low))
