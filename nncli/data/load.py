"""The data section read: its sources, the train/validation split, normalization, the fingerprint.

Every source yields tensors `x` (samples first) and `y`; `data.loader` decides how they are
batched (see nncli.data.samples): moved to the device once (`memory`), or kept on the host, even
memory-mapped, and read by a torch DataLoader (`dataloader`).
"""
from __future__ import annotations

import math
import warnings
import zlib
from dataclasses import dataclass, replace

import torch

from nncli.config import Config
from nncli.config.schema import is_pair
from nncli.data.samples import HostSamples, Samples, TensorPair, normalize, usable_cpus
from nncli.data.sources import LOADERS, SourceContext
from nncli.model.plan import input_dtype

CHUNK_BYTES = 64 << 20  # one pass over the inputs (statistics, fingerprint): float64 rows at a time


@dataclass
class Data:
    train: Samples
    val: Samples | None
    sample_shape: tuple
    normalization: dict | None  # {"mean": tensor, "std": tensor} of the training inputs
    fingerprint: str = ""  # see data_fingerprint
    classes: list[str] | None = None  # the class names, index by index (word labels, folder names)
    target_normalization: dict | None = None  # {"mean", "std"} of the training targets (normalize_target)


def _chunk_rows(samples: Samples) -> int:
    """Rows per chunk of a pass over the inputs, sized by their float64 copy (the statistics')."""
    return max(1, CHUNK_BYTES // (8 * max(math.prod(samples.x.shape[1:]), 1)))


def data_fingerprint(train: Samples, val: Samples | None) -> str:
    """A CRC-32 of the training and validation inputs (in the model's dtype; pixels as stored) and targets,
    about 4 GB/s; the same for either loader. Checkpoints keep it, so that eval and resume can
    tell that the data changed since training; it guards against accidents, not tampering."""
    crc = 0
    for samples in (train, val):
        if samples is None:
            continue
        for x in samples.input_chunks(_chunk_rows(samples)):
            crc = zlib.crc32(x.contiguous().view(torch.uint8).numpy(), crc)
        crc = zlib.crc32(samples.y.contiguous().view(torch.uint8).numpy(), crc)
    return f"crc32:{crc:08x} train:{len(train)} val:{len(val) if val is not None else 0}"


def normalization_of(samples: Samples, per_channel: bool = False) -> dict:
    """The mean and standard deviation of the inputs as the model takes them (pixels in [0, 1]):
    per feature, or `per_channel` (over the samples and every position: shaped (C, 1, ...), to
    broadcast over a batch of images). In one pass of float64 chunks (merged as Chan et al.), so
    the inputs need not fit in memory at once; in the inputs' dtype (float32 for integer inputs).
    A constant feature or channel keeps std 1."""
    shape = samples.x.shape[1:]
    dims = (0, *range(2, len(shape) + 1)) if per_channel else (0,)
    values_per_sample = math.prod(shape[1:]) if per_channel else 1  # of each statistic
    n, m2 = 0, 0.0
    mean = torch.zeros((shape[0], *[1] * (len(shape) - 1)) if per_channel else shape, dtype=torch.float64)
    dtype = samples.dtype if samples.dtype.is_floating_point else torch.float32
    for x in samples.input_chunks(_chunk_rows(samples)):
        x, k = x.to(torch.float64, copy=True), len(x) * values_per_sample  # a copy: deviations in place
        if samples.pixels:
            x /= 255
        chunk_mean = x.mean(dims, keepdim=True)[0]
        delta = chunk_mean - mean
        mean = mean + delta * (k / (n + k))
        m2 = m2 + x.sub_(chunk_mean).square_().sum(dims, keepdim=True)[0] + delta ** 2 * (n * k / (n + k))
        n += k
    std = (m2 / max(n - 1, 1)).sqrt()
    return {"mean": mean.to(dtype), "std": torch.where(std > 0, std, torch.ones_like(std)).to(dtype)}


def target_normalization_of(y: torch.Tensor) -> dict:
    """Each regression output's mean and standard deviation over the training targets (float64,
    then their dtype); a constant output keeps std 1."""
    mean, std = y.double().mean(0), y.double().std(0) if len(y) > 1 else torch.ones(y.shape[1:])
    return {"mean": mean.to(y.dtype), "std": torch.where(std > 0, std, torch.ones_like(std)).to(y.dtype)}


def in_target_units(values: torch.Tensor, stats: dict | None) -> torch.Tensor:
    """Outputs (or targets) of a model trained on standardized targets, in the targets' own units."""
    if stats is None:
        return values
    return values * stats["std"].to(values.device) + stats["mean"].to(values.device)


def read_source(options: dict, config: Config, where: tuple) -> tuple[Samples, list[str] | None]:
    """Read one checked source mapping (see config.check_source) as the data section's `loader`
    asks: into memory, or kept where it is for a DataLoader to read a batch at a time. With the
    samples, the names of the classes when its labels are names (y: indices into them)."""
    ctx = SourceContext(config, where, streamed=config["data"]["loader"] == "dataloader")
    x, y = LOADERS[options["source"]](options, ctx)
    if len(x) != len(y):
        raise ctx.error(f"x has {len(x)} samples but y has {len(y)}; they must match")
    if len(x) == 0:
        raise ctx.error("has no samples")
    if x.dim() == 1:  # x: [1, 2, 3] means three samples of one feature
        x = x.unsqueeze(1)
    for name, values in (("x", None if ctx.mapped_file else x), ("y", y)):  # a mapped file is not read here
        if values is not None and (bad := _first_non_finite(values)) is not None:
            position = (f", position {bad[1:]}" if len(bad) > 2 else f", column {bad[1]}" if len(bad) == 2
                        else "")
            raise ctx.error(f"{name} holds {values[tuple(bad)].item()} at sample {bad[0]} (counting from 0)"
                            f"{position}; a NaN or infinite value makes the loss NaN",
                            hint="Remove or fill in those samples.")
    dtype = input_dtype(config)
    if ctx.pixels and not dtype.is_floating_point:
        raise config.error(f"is {config['model']['input_dtype']}, but images go into the model as floats",
                           "model", "input_dtype", hint="Leave input_dtype out (float32).")
    if ctx.streamed:
        samples = HostSamples(x, torch.arange(len(x)), y, dtype, _workers(config),
                              mapped_file=ctx.mapped_file, pixels=ctx.pixels)
    else:  # pixels stay uint8, a quarter of the memory, and become floats a batch at a time
        samples = TensorPair(x if ctx.pixels else x.to(dtype), y, dtype, ctx.pixels)
    return samples, ctx.classes


def _first_non_finite(values: torch.Tensor) -> list[int] | None:
    """The index of the first NaN or infinite value, or None; read CHUNK_BYTES at a time, so the
    check needs little memory beside the data."""
    if not values.is_floating_point():
        return None
    rows = max(1, CHUNK_BYTES // max(values[:1].numel() * values.element_size(), 1))
    for start in range(0, len(values), rows):
        bad = (~torch.isfinite(values[start:start + rows])).nonzero()
        if len(bad):
            return [start + int(bad[0, 0]), *bad[0, 1:].tolist()]
    return None


def read_data(config: Config, normalization: dict | None = None, *, scan: bool = True,
              labels_for: str | None = None, target_normalization: dict | None = None) -> Data:
    """Read the (checked) data section: its sources, the class names, the split, the normalization.

    `labels_for`: the loss, when it takes class labels: the targets are then checked to be whole
    numbers (or names) and made int64 (else float). With `normalize:`, the inputs are normalized
    with `normalization` when given (a checkpoint's: what its model was trained with), else with
    the training set's statistics; with `normalize_target: true`, the targets likewise with
    `target_normalization`. `scan=False` skips the passes over every input (the fingerprint, the
    statistics) when the data is only checked: a mapped file is then not read."""
    section = config["data"]
    if section is None:
        raise config.error("the config has no 'data' section; add one, e.g. data: {source: digits}")
    if is_pair(section):
        sources = [(read_source(section["train"], config, ("data", "train")), "training")]
        if section.get("val"):
            sources.append((read_source(section["val"], config, ("data", "val")), "validation"))
    else:
        sources = [(read_source(section, config, ("data",)), "")]
    classes = name_classes(config, [(samples, names, side) for (samples, names), side in sources], labels_for)
    if is_pair(section):
        train, val = sources[0][0][0], sources[1][0][0] if len(sources) > 1 else None
    else:
        train, val = split_data(sources[0][0][0], section["val_split"], config)
    if val is not None and val.x.shape[1:] != train.x.shape[1:]:
        raise config.error(f"validation samples have shape {list(val.x.shape[1:])}, training samples "
                           f"{list(train.x.shape[1:])}; they must match", "data", "val")
    for name, pair in (("training", train), ("validation", val)):
        if labels_for and pair is not None and pair.y.is_floating_point() and \
                (unusable := (pair.y != pair.y.round()) | (pair.y.abs() >= 2**53)).any():  # 2**53: not exact
            bad = pair.y[unusable][0].item()
            raise config.error(f"{name} targets are not class indices (e.g. {bad:g}), but "
                               f"{labels_for} needs whole-number labels", "loss",
                               hint="For regression set loss: MSELoss (or another regression loss).")
    train, val = (None if p is None else replace(p, y=_class_indices(p.y) if labels_for else p.y.float())
                  for p in (train, val))
    check_normalization(config, tuple(train.x.shape[1:]), labels_for)
    fingerprint = data_fingerprint(train, val) if scan else ""
    if not (section["normalize"] and scan):
        normalization = None
    else:
        per_channel = section["normalize"] == "channel"
        normalization = normalization or normalization_of(train, per_channel)
        train = train.normalized(normalization)
        val = val.normalized(normalization) if val is not None else None
    if not (section["normalize_target"] and scan):
        target_normalization = None
    else:
        target_normalization = target_normalization or target_normalization_of(train.y)
        train, val = (None if p is None else replace(p, y=normalize(p.y, target_normalization))
                      for p in (train, val))
    return Data(train, val, tuple(train.x.shape[1:]), normalization, fingerprint, classes,
                target_normalization)


def check_normalization(config: Config, sample_shape: tuple, labels_for: str | None) -> None:
    """`normalize: channel` needs samples with channels; `normalize_target` regression targets."""
    section = config["data"]
    if section["normalize"] == "channel" and len(sample_shape) < 2:
        raise config.error(f"channel standardizes each channel of images (channels, height, width) or "
                           f"sequences (channels, length); these samples have shape {list(sample_shape)}",
                           "data", "normalize", hint="Use normalize: true for each feature's own statistics.")
    if section["normalize_target"] and labels_for:
        raise config.error(f"standardizes regression targets, but {labels_for} takes class labels",
                           "data", "normalize_target",
                           hint="Remove normalize_target, or use a regression loss.")


def name_classes(config: Config, sources: list[tuple[Samples, list[str] | None, str]],
                 labels_for: str | None) -> list[str] | None:
    """The class names of labels given as names (a CSV column of words, image folders), index by
    index: `data.class_names` when the config gives them, else every name found, sorted; each source's
    labels (indices into its own names) are made indices into them, in place, and the config
    records them (config.yaml). None when the labels are numbers: they stay as they are."""
    section, named = config["data"], [names for _, names, _ in sources if names is not None]
    if not named:
        if section["class_names"] is not None:
            raise config.error("names the classes of labels given as names (words, folder names), but "
                               "these labels are numbers", "data", "class_names",
                               hint="Remove class_names: numbers are the classes' indices themselves.")
        return None
    if len(named) < len(sources):
        words = next(side for _, names, side in sources if names is not None)
        numbers = next(side for _, names, side in sources if names is None)
        raise config.error(f"the {words} labels are names but the {numbers} labels are numbers; give both "
                           "the same kind", "data")
    if not labels_for:
        raise config.error(f"the targets are class names (e.g. '{named[0][0]}'), but this loss takes "
                           "numbers", "loss", hint="For classification set loss: CrossEntropyLoss.")
    classes = section["class_names"] or sorted(set().union(*named))
    index = {name: i for i, name in enumerate(classes)}
    for samples, names, side in sources:
        unknown = next((name for name in names if name not in index), None)
        if unknown is not None:
            raise config.error(f"the {side + ' ' if side else ''}data has a class '{unknown}' "
                               f"that is not one of the {len(classes)} classes: {', '.join(classes)}",
                               "data", "class_names",
                               hint=f"Add '{unknown}' to class_names, or remove its samples.")
        samples.y = torch.tensor([index[name] for name in names])[samples.y]
    section["class_names"] = list(classes)
    return list(classes)


def _workers(config: Config) -> int:
    """The DataLoader's worker processes: as many as asked, at most one per CPU this process may
    use (100,000 asked for would start 100,000); the config then records how many ran."""
    section = config["data"]
    if section["workers"] > (cpus := usable_cpus()):
        warnings.warn(str(config.error(f"{section['workers']} worker processes asked for, but this "
                                       f"process may use {cpus} CPUs: {cpus} workers read the batches",
                                       "data", "workers")))
        section["workers"] = cpus
    return section["workers"]


def _class_indices(y: torch.Tensor) -> torch.Tensor:
    """Labels as int64; a column of labels, (N, 1), as (N,)."""
    return (y[:, 0] if y.dim() == 2 and y.shape[1] == 1 else y).long()


MIN_VALIDATION = 10  # fewer validation samples than this: their loss says little, and it picks best.pt


def split_data(data: Samples, val_split: float, config: Config) -> tuple[Samples, Samples | None]:
    """A seeded split: the first `val_split` of a random permutation is the validation set."""
    if val_split == 0:
        return data, None
    n_val = round(len(data) * val_split)  # 0.999 of 10 samples is all 10, not 9
    if n_val == 0 or n_val == len(data):
        raise config.error(f"a split of {val_split} leaves the {'validation' if n_val == 0 else 'training'} "
                           f"side empty ({len(data)} samples)", "data", "val_split",
                           hint="Use val_split: 0 to train without validation.")
    if n_val < MIN_VALIDATION:
        warnings.warn(str(config.error(
            f"a split of {val_split} keeps {n_val} of the {len(data)} samples out of training for "
            f"validation: fewer than {MIN_VALIDATION}, too few for a validation loss that means much, yet "
            "that loss picks best.pt (and early stopping)", "data", "val_split",
            hint="Use val_split: 0 to train on every sample, or give more data.")))
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(config["seed"]))
    return data.subset(perm[n_val:]), data.subset(perm[:n_val])
