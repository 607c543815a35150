"""A training or validation set, and how its batches are read: the `data.loader` setting.

- `TensorPair` (`loader: memory`): x and y held whole, moved to the training device once, and
  each batch gathered there with an index. On small models this is much faster than a
  per-sample DataLoader.
- `HostSamples` (`loader: dataloader`): the inputs stay on the host as the source read them (a
  memory-mapped file stays one); a torch DataLoader reads each batch, in `workers` processes,
  into pinned memory when it goes to a GPU, for a copy that does not block.

Both take the same index batches from `Batches`, so both train the same model. A batch comes out
on the device as stored (image pixels stay uint8); `prepare` then makes it what the model takes,
there: floats (pixels in [0, 1]), normalized. Training augments it in between (run.loop.fit).
"""
from __future__ import annotations

import atexit
import math
import os
import signal
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.utils.data

from nncli.errors import STOP_SIGNALS


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where the OS keeps one (a container's or
    a scheduler's share), else every CPU of the machine."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def normalize(x: torch.Tensor, normalization: dict | None) -> torch.Tensor:
    if normalization is None:
        return x
    return (x - normalization["mean"].to(x.device)) / normalization["std"].to(x.device)


def map_npy(path: Path) -> np.ndarray:
    """A .npy file's pages, copy-on-write: writable, as torch wants its arrays, never written back."""
    return np.load(path, mmap_mode="c", allow_pickle=False)


class ModelInputs:
    """What both kinds of samples do to a gathered batch, on the device, before the model sees
    it: the model's dtype (`as_input`), then the training set's normalization (`normalize`).
    Augmentation, of training batches only, comes between the two."""

    dtype: torch.dtype  # what the model takes (model.input_dtype)
    pixels: bool  # x holds uint8 pixels (the images source): as floats in [0, 1], as ToTensor makes them
    normalization: dict | None  # {"mean", "std"}: per feature, or per channel (shaped (C, 1, ...))

    def as_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype) / 255 if self.pixels else x.to(self.dtype)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, self.normalization)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """A gathered batch as the model takes it (validation's and eval's; training augments it
        between `as_input` and `normalize`)."""
        return self.normalize(self.as_input(x))


GATHER_BYTES = 32 * 2**20  # the samples a TensorPair gathers at once: a copy this large at most, or one
# batch where a batch is larger


@dataclass
class TensorPair(ModelInputs):
    """Samples held whole (`loader: memory`): moved to the training device once and batched by
    indexing there."""

    x: torch.Tensor
    y: torch.Tensor
    dtype: torch.dtype | None = None  # None: x's own
    pixels: bool = False
    normalization: dict | None = None

    def __post_init__(self) -> None:
        self.dtype = self.dtype or self.x.dtype

    def __len__(self) -> int:
        return len(self.x)

    @property
    def device(self) -> torch.device:
        return self.x.device

    def to(self, device: torch.device) -> TensorPair:
        return replace(self, x=self.x.to(device), y=self.y.to(device),
                       normalization=_statistics_on(self.normalization, device))

    def subset(self, index: torch.Tensor | slice) -> TensorPair:
        return replace(self, x=self.x[index], y=self.y[index])

    def normalized(self, normalization: dict | None) -> TensorPair:
        return replace(self, normalization=_statistics_on(normalization, self.device))

    def input_chunks(self, rows: int) -> Iterator[torch.Tensor]:
        """The inputs in order, `rows` samples at a time."""
        return iter(self.x.split(rows))

    def batches(self, index: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) for each `batch_size` entries of `index` in turn, x as stored (see `prepare`);
        none for an empty index (a DDP process's share of a tiny validation set may be empty).
        Gathered GATHER_BYTES at a time and split into batches: on a small model one gather per
        batch costs more than the optimizer step's arithmetic."""
        if not len(index):
            return
        sample_bytes = (self.x[0].nbytes + self.y[0].nbytes) or 1
        chunk = max(1, GATHER_BYTES // (sample_bytes * batch_size)) * batch_size
        for rows in index.to(self.x.device).split(chunk):
            yield from zip(self.x.index_select(0, rows).split(batch_size),
                           self.y.index_select(0, rows).split(batch_size))

    def close(self) -> None:
        """Nothing to end: no loader reads these samples."""


@dataclass(eq=False)  # compared by identity: its fields are tensors
class HostSamples(ModelInputs):
    """Samples read a batch at a time (`loader: dataloader`): a torch DataLoader gathers each
    batch's rows of `x` and converts them to the model's dtype (pixels stay uint8: a quarter of
    the bytes to copy), in `workers` processes, pins the batch when it goes to a GPU, and it is
    copied without blocking. One pass at a time."""

    x: torch.Tensor  # every row the source read, in its own dtype (a memory map stays one)
    rows: torch.Tensor  # which rows of x are this set's samples
    y: torch.Tensor  # their targets, in memory
    dtype: torch.dtype  # what the model takes (model.input_dtype)
    workers: int = 0
    normalization: dict | None = None
    device: torch.device = torch.device("cpu")  # where the batches go
    mapped_file: Path | None = None  # x maps this .npy file (`mmap: true`, an image cache)
    pixels: bool = False
    _loader: torch.utils.data.DataLoader | None = field(default=None, init=False, repr=False)
    _passes: PassIndex | None = field(default=None, init=False, repr=False)

    def __len__(self) -> int:
        return len(self.rows)

    def to(self, device: torch.device) -> HostSamples:
        device = torch.device(device)  # the samples stay; their batches move
        return replace(self, device=device, normalization=_statistics_on(self.normalization, device))

    def subset(self, index: torch.Tensor | slice) -> HostSamples:
        return replace(self, rows=self.rows[index], y=self.y[index])

    def normalized(self, normalization: dict | None) -> HostSamples:
        return replace(self, normalization=_statistics_on(normalization, self.device))

    def __getitem__(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch: the DataLoader passes one tensor of sample indices per batch."""
        return self._read(self.rows[index]), self.y[index]

    def _read(self, rows: torch.Tensor) -> torch.Tensor:
        """x's `rows`, in that order, in the model's dtype (pixels as stored); from a mapped file,
        read in the file's order."""
        if self.mapped_file is None:
            x = self.x[rows]
        else:
            ordered, where = rows.sort()
            x = self.x[ordered][where.argsort()]
        return x if self.pixels else x.to(self.dtype)

    def input_chunks(self, rows: int) -> Iterator[torch.Tensor]:
        for chunk in self.rows.split(rows):
            yield self._read(chunk)

    def batches(self, index: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not len(index):
            return
        if self._loader is None:
            # One loader for every pass, so its workers start once, not every epoch. Its own
            # generator: otherwise it draws its workers' seed from torch's global generator, and
            # dropout would differ from `loader: memory`.
            self._passes = PassIndex()
            self._loader = torch.utils.data.DataLoader(
                self, sampler=self._passes, batch_size=None, num_workers=self.workers,
                persistent_workers=self.workers > 0, pin_memory=self.device.type == "cuda",
                generator=torch.Generator().manual_seed(0), worker_init_fn=_leave_stopping_to_training)
            if self.workers:
                _OPEN_LOADERS.add(self)
        self._passes.batches = index.split(batch_size)
        # a non-blocking copy from unpinned memory is not safe on every device
        pinned = self._loader.pin_memory
        for xb, yb in self._loader:
            yield xb.to(self.device, non_blocking=pinned), yb.to(self.device, non_blocking=pinned)

    def close(self) -> None:
        """End the loader's workers now. nncli's process leaves with os._exit, after which they
        would run on for seconds, holding the job's output open, until their watchdog notices;
        and they ignore the SIGTERM with which torch ends a worker that does not stop in time.
        (torch has no public call to end persistent workers.)"""
        iterator = self._loader._iterator if self._loader is not None else None
        if iterator is not None:
            iterator._shutdown_workers()
            for worker in iterator._workers:
                if worker.is_alive():
                    worker.kill()
        self._loader = self._passes = None
        _OPEN_LOADERS.discard(self)

    def __getstate__(self) -> dict:
        """What a worker started by `spawn` (macOS, Windows) receives: not the loader, and a
        mapped file as its path and shape, to map it again, not its pages copied."""
        state = {**self.__dict__, "_loader": None, "_passes": None}
        if self.mapped_file is not None:
            state["x"] = tuple(self.x.shape)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if isinstance(self.x, tuple):
            self.x = torch.from_numpy(map_npy(self.mapped_file)).view(self.x)


Samples = TensorPair | HostSamples


def _statistics_on(normalization: dict | None, device: torch.device) -> dict | None:
    """Normalization statistics where the batches are normalized, moved there once."""
    if normalization is None:
        return None
    return {key: value.to(device) for key, value in normalization.items()}

_OPEN_LOADERS: weakref.WeakSet[HostSamples] = weakref.WeakSet()  # samples whose loader has workers


# Registered after `import torch.utils.data` above, so it runs before torch's exit hook that
# turns worker shutdown into a no-op, and before multiprocessing's, which would end the workers
# with SIGTERM (ignored) and wait. torch ends pinned loaders' workers by itself; not CPU ones.
@atexit.register
def _close_open_loaders() -> None:
    for samples in list(_OPEN_LOADERS):
        samples.close()


def _leave_stopping_to_training(worker_id: int) -> None:
    """A loader worker ignores the signals that ask a run to stop (the terminal and schedulers
    send them to every process): the training process finishes its step, saves, then ends it."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class PassIndex:
    """The sampler of a HostSamples loader: the index batches of the pass about to start."""

    def __init__(self) -> None:
        self.batches: tuple[torch.Tensor, ...] = ()

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.batches)


class Batches:
    """One epoch of shuffled (x, y) batches per call, from either kind of samples.

    The shuffle comes from its own seeded generator, so a resumed run can restore it. With
    `world_size > 1` every rank draws the same permutation and takes its own share of it.
    """

    def __init__(self, data: Samples, batch_size: int, *, shuffle: bool, seed: int,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1) -> None:
        self.data, self.batch_size = data, batch_size
        self.shuffle, self.drop_last, self.rank, self.world_size = shuffle, drop_last, rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        n = len(data) // world_size  # every rank takes the same number of samples
        self.samples = n
        self.steps = n // batch_size if drop_last else math.ceil(n / batch_size)

    def __len__(self) -> int:
        return self.steps

    def epoch(self, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the epoch's batches, skipping the first `skip` (to resume inside an epoch)."""
        n = len(self.data)
        if self.shuffle:
            index = torch.randperm(n, generator=self.generator)
        else:
            index = torch.arange(n)
        if self.world_size > 1:
            index = index[self.rank:self.samples * self.world_size:self.world_size]
        return self.data.batches(index[skip * self.batch_size:self.steps * self.batch_size], self.batch_size)

    def batch_sizes(self) -> torch.Tensor:
        sizes = torch.full((self.steps,), float(self.batch_size))
        if not self.drop_last and self.samples % self.batch_size:
            sizes[-1] = self.samples % self.batch_size
        return sizes
