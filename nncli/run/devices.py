"""Where training runs: the device, mixed precision, and the process group for DDP."""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nncli.data.samples import usable_cpus
from nncli.errors import ConfigError


def resolve_device(name: str, processes: int | None = None) -> torch.device:
    """`auto` is CUDA, else MPS, else CPU; an explicit device that is not there is an error.
    `processes`: how many of the job's processes run on this machine (torchrun's
    LOCAL_WORLD_SIZE by default; `--nproc N` checks its N before starting them). With several,
    each process takes the GPU of its local rank."""
    processes = processes or local_processes()
    from nncli.config.schema import DEVICES, device_hint, device_name  # the syntax that `validate` checks

    if device_name(name):
        raise ConfigError(f"'{name}' is not a device; expected {DEVICES}", key="device",
                          hint=device_hint(name))
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    device = torch.device(name)
    if device.type == "mps" and not mps:
        raise ConfigError(f"'{name}' asked for, but MPS is not available here", key="device",
                          hint="Use device: auto or cpu.")
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ConfigError(f"'{name}' asked for, but this machine has no CUDA GPU "
                          "that PyTorch can use", key="device", hint="Use device: auto or cpu.")
    visible = torch.cuda.device_count()
    if processes > 1:
        if device.index is not None:
            raise ConfigError(f"'{name}' names one GPU, but under DDP each process takes the GPU of "
                              "its local rank", key="device",
                              hint="Use device: cuda, and choose the GPUs with CUDA_VISIBLE_DEVICES.")
        if processes > visible:
            raise ConfigError(f"--nproc {processes} needs {processes} GPUs, {visible} "
                              f"{'is' if visible == 1 else 'are'} visible", key="device",
                              hint="Lower --nproc (torchrun: --nproc_per_node) or use device: cpu.")
        return torch.device("cuda", local_rank())
    if device.index is not None and device.index >= visible:
        raise ConfigError(f"'{name}' asked for, but only {visible} GPU(s) are visible", key="device")
    return torch.device("cuda", device.index or 0)


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """The autocast context for `amp` (off, bf16, fp16); a no-op context when off."""
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


# --- distributed -----------------------------------------------------------------------------

def launched_processes() -> int:
    """How many processes torchrun (or `--nproc`) started for this job; 1 without it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    """Started by torchrun (or anything that sets its environment variables)."""
    return launched_processes() > 1


def is_main_process() -> bool:
    """Rank 0 of torchrun's job, or a process on its own: the one that writes the run directory."""
    return int(os.environ.get("RANK", "0")) == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_processes(default: int = 1) -> int:
    """How many of the job's processes torchrun started on this machine (LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", default))


@dataclass
class Process:
    """This process's place in the job: rank 0 of 1 unless started by torchrun."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start_process(parallel: str, device: torch.device) -> Process:
    """Join torchrun's process group when started by it: gloo on CPU; on GPUs NCCL for GPU
    tensors and gloo for the few CPU ones (the stop flag, the end-of-run weight check)."""
    if not is_distributed():
        if parallel == "ddp":
            raise ConfigError("ddp needs several processes: start with "
                              "`nncli train CONFIG --nproc N` or "
                              "`torchrun --nproc_per_node N -m nncli train CONFIG`",
                              key="parallel")
        return Process()
    check_parallel(parallel, launched_processes())
    end_with_launcher()
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return Process(dist.get_rank(), dist.get_world_size())


LAUNCHER_GONE_GRACE_S = 15  # after its launcher died, how long a process may take to save and stop


def end_with_launcher() -> None:
    """A DDP process ends when the launcher that started it (torchrun, or `--nproc`) dies, even by
    `kill -9`: unsupervised, it would train on to the end. A thread watches for the parent to
    change; then the process stops as Ctrl-C stops it (saves at the job's next agreed step, exit
    130) or, after LAUNCHER_GONE_GRACE_S, at once."""
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(LAUNCHER_GONE_GRACE_S)
        os._exit(130)

    threading.Thread(target=watch, name="nncli-launcher-watch", daemon=True).start()


def check_parallel(parallel: str, processes: int) -> None:
    """Several processes train with DDP: `parallel` may say ddp or none (then ddp is implied),
    not dp, which is one process driving several GPUs."""
    if processes > 1 and parallel == "dp":
        raise ConfigError(f"dp is one process driving several GPUs, but {processes} processes were "
                          "asked for (--nproc or torchrun)", key="parallel", hint="Use parallel: ddp.")


def launch(nproc: int, args: list[str]) -> int:
    """`python -m nncli ARGS` in `nproc` DDP processes on this machine, started by torchrun's
    launcher inside this process; the exit status is the command's: 2 when a process had bad
    input, 130 when interrupted, else 1 for a failure. Ctrl-C here reaches the workers through
    the launcher, which forwards it: they finish the step, save and exit together."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun's default of one thread per process, without its banner; and none of the
    # launcher's log lines ("sending SIGINT to process N", "failed (exitcode: 1) local_rank: 0"):
    # the workers say what happened, and the exit status says how it ended.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cpus() // nproc)))
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)

    try:
        # the workers' last step and checkpoint may take a while: 5 minutes before a SIGKILL
        run(parse_args(["--standalone", f"--nproc_per_node={nproc}", "--shutdown-timeout=300",
                        "-m", "nncli", *args]))
    except SignalException:
        return 130
    except ChildFailedError as failed:
        codes = {failure.exitcode for failure in failed.failures.values()}
        return 2 if 2 in codes else 130 if 130 in codes else 1
    return 0


def end_process(process: Process, together: bool = True, error: BaseException | None = None) -> None:
    """Leave the process group. `together`: every process got here the same way (finished, or
    stopped by an agreed interrupt), so they wait for each other first; after an error, which may
    be this process's alone, waiting could hang the job, so it just leaves, first telling the
    others (through the job's store) that it was this process's own `error` that ended the job."""
    if process.world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            if together:
                dist.barrier()  # leave together: gloo aborts a process whose peer tears down first
            elif error is not None and not is_peer_failure(error) and (store := _job_store()) is not None:
                with contextlib.suppress(Exception):
                    store.set(FAILED_PROCESS_KEY, str(process.rank))
            dist.destroy_process_group()


FAILED_PROCESS_KEY = "nncli/failed_process"


def _job_store() -> object | None:
    """The key-value store of the job's process group (torchrun's), or None."""
    import torch.distributed.distributed_c10d as c10d

    try:
        return c10d._get_default_store()  # private, hence the guard: without it, failures go unnamed
    except Exception:
        return None


def is_peer_failure(err: BaseException) -> bool:
    """Whether `err` is gloo's word that another process of the job went away."""
    return "by peer" in str(err) and is_distributed()


def failed_process() -> int | None:
    """The rank of the process whose own error ended the job (see end_process), when it said so."""
    store = _job_store()
    try:
        return (int(store.get(FAILED_PROCESS_KEY)) if store is not None and store.check([FAILED_PROCESS_KEY])
                else None)
    except Exception:
        return None


def wrap_model(model: torch.nn.Module, *, parallel: str, device: torch.device, device_ids: list | None,
               compile_mode: bool | str, channels_last: bool, process: Process,
               notice: Callable[[str], None]) -> torch.nn.Module:
    """The module the training step calls: `model` itself, or DataParallel / DDP / compiled around it.

    Checkpoints always save `model`, the unwrapped network, so their keys carry no `module.` or
    `_orig_mod.` prefix whatever wrapped it."""
    if channels_last:
        if not any(p.dim() == 4 for p in model.parameters()):
            notice("channels_last: true changes nothing here: the model has no 4-D (convolution) weights")
        model.to(memory_format=torch.channels_last)
    if device_ids and parallel != "dp":
        notice(f"device_ids is for parallel: dp, and parallel is {parallel}: it is not used")
    step_model = model
    if parallel == "dp":
        visible = torch.cuda.device_count() if device.type == "cuda" else 0
        first = device.index or 0
        if device.type != "cuda" or visible < 2:  # as the issue asks: train on, without the wrapper
            where = ("no GPU is visible" if not torch.cuda.is_available() else
                     f"training runs on {device}" if device.type != "cuda" else "1 is visible")
            notice(f"parallel: dp needs two or more GPUs, and {where}: training without the "
                   "DataParallel wrapper")
        else:
            if device_ids and (missing := [i for i in device_ids if i >= visible]):
                raise ConfigError(f"GPU {missing[0]} asked for, but {visible} GPUs are visible",
                                  key="device_ids", hint=f"Use ids from 0 to {visible - 1}, or leave "
                                  "device_ids out to use every visible GPU.")
            # DataParallel keeps the module, and gathers the outputs, on device_ids[0]: the model's GPU
            if device_ids and device_ids[0] != first:
                raise ConfigError(f"the model is on {device}, but DataParallel needs it on the first of "
                                  f"device_ids, GPU {device_ids[0]}", key="device_ids",
                                  hint=f"List GPU {first} first, or use device: cuda:{device_ids[0]}.")
            # the model's GPU first
            ids = list(device_ids or sorted(range(visible), key=lambda i: i != first))
            if len(ids) < 2:
                notice("parallel: dp needs two or more GPUs, and device_ids lists one: training "
                       "without the DataParallel wrapper")
            else:
                notice("parallel: dp wraps the model in nn.DataParallel; PyTorch recommends DDP even on "
                       "one machine (parallel: ddp with --nproc N)")
                step_model = torch.nn.DataParallel(model, device_ids=ids)
    elif process.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        step_model = DistributedDataParallel(model,
                                             device_ids=[device.index] if device.type == "cuda" else None)
    if compile_mode:
        if isinstance(step_model, torch.nn.DataParallel):  # pytorch/pytorch#94636
            notice("compile with parallel: dp compiles the wrapper, but DataParallel's replicas run "
                   "uncompiled on the other GPUs; parallel: ddp (--nproc N) compiles every process's model")
        mode = compile_mode if isinstance(compile_mode, str) else None
        step_model = torch.compile(step_model, mode=mode)
    return step_model


def generator_devices(step_model: torch.nn.Module, device: torch.device) -> list[torch.device]:
    """The GPUs whose random generators a run draws from (dropout): the model's, and under
    DataParallel every replica's. Under DDP each process's GPU moves in step with rank 0's."""
    inner = getattr(step_model, "_orig_mod", step_model)  # inside torch.compile's wrapper
    if isinstance(inner, torch.nn.DataParallel):
        return [torch.device("cuda", index) for index in inner.device_ids]
    return [device] if device.type == "cuda" else []


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
        # as deterministic as the kernels allow: some CUDA backward passes (adaptive pooling,
        # 2-D nll_loss) have no deterministic version, and say so in a warning instead of failing
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels


def share_buffers(model: torch.nn.Module, process: Process) -> None:
    """Give every process rank 0's buffers (BatchNorm's running statistics). DDP copies them at
    the start of each training forward pass, so after an epoch's last one each process holds
    its own; shared before validation, every process's share is scored with the model that
    rank 0 saves."""
    if process.world_size > 1:
        import torch.distributed as dist

        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def weights_in_sync(model: torch.nn.Module) -> bool:
    """Whether every process holds the same weights (compares per-tensor sums' max and min).
    Parameters only: buffers are each process's own after its last forward pass (made rank 0's
    before each validation by share_buffers), and rank 0's are saved."""
    import torch.distributed as dist

    sums = torch.stack([p.detach().double().sum().cpu() for p in model.parameters()])
    high, low = sums.clone(), sums.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return bool(torch.equal(high, low))
