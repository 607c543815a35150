"""The `data:` section: sources, the train/validation split, normalization, the fingerprint.

Every source yields tensors `x` (samples first) and `y`; `data.loader` decides how they are
batched (see nncli.samples): moved to the device once (`memory`), or kept on the host, even
memory-mapped, and read by a torch DataLoader (`dataloader`).
"""
from __future__ import annotations

import csv
import importlib.metadata
import math
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nncli.annotations import value_kind
from nncli.config import (NUMBER, REQUIRED, SECTION_KEYS, Config, Key, check_section, fraction, non_negative,
                          one_of, positive)
from nncli.devices import usable_cpus
from nncli.errors import ConfigError, did_you_mean, first_line
from nncli.optim import CLASS_INDEX_LOSSES, loss_name
from nncli.registry import Registry, accepted_arguments
from nncli.samples import HostSamples, Samples, TensorPair, map_npy
from nncli.yamlio import to_plain


@dataclass
class Source:
    load: Callable[[dict, SourceContext], tuple[torch.Tensor, torch.Tensor]]
    keys: dict[str, Key]
    paths: tuple[str, ...] = ()  # the keys that name files or folders to read
    default_split: float = 0.2  # val_split when the data section gives none


@dataclass
class SourceContext:
    """What a source needs besides its own keys: errors at its keys, paths, the seed."""

    config: Config
    where: tuple  # key path of the source's mapping, e.g. ("data",) or ("data", "train")
    streamed: bool = False  # `loader: dataloader`: the inputs are read a batch at a time
    mapped_file: Path | None = None  # set by a source whose x is a memory map of this file

    def error(self, message: str, key: str | None = None, hint: str | None = None) -> ConfigError:
        return self.config.error(message, *self.where, *([key] if key else []), hint=hint)

    def path(self, options: dict, key: str = "path") -> Path:
        path = self.config.resolve_path(options[key], *self.where, key)
        if path.is_dir():
            raise self.error(f"{path} is a folder; expected a file", key)
        if not path.is_file():
            raise self.error(f"file {path} not found (paths are relative to the config file)", key)
        return path

    @property
    def seed(self) -> int:
        return self.config["seed"]


SOURCES = Registry("data source")


def source(name: str, /, *, paths: tuple[str, ...] = (), default_split: float = 0.2, **keys: Key) -> Callable:
    """Register a data source with the keys it takes (checked like every other section), which of
    them are paths, and the validation split it gets when the config gives no `val_split:`."""
    def add(load: Callable) -> Callable:
        SOURCES.add(name, Source(load, keys, paths, default_split))
        return load
    return add


@source("digits")
def load_digits(options: dict, ctx: SourceContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The bundled 8x8 handwritten digits: 1,797 images (1, 8, 8) in [0, 1], 10 classes."""
    with resources.files("nncli").joinpath("datasets", "digits.npz").open("rb") as f:
        arrays = np.load(f)
        return torch.from_numpy(arrays["images"]), torch.from_numpy(arrays["labels"])


# Inline data is a handful of samples, too few to give some of them up to validation unasked.
@source("tensors", default_split=0, x=Key((list,), REQUIRED), y=Key((list,), REQUIRED))
def load_tensors(options: dict, ctx: SourceContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Inline `x:` and `y:` lists, as in the tutorial's linear regression."""
    tensors = []
    for key in ("x", "y"):
        try:
            tensors.append(torch.tensor(options[key], dtype=torch.float32))
        except (TypeError, ValueError) as err:
            raise ctx.error(f"expected a (nested) list of numbers with equal-length rows: {err}", key) from None
    return tensors[0], tensors[1]


def read_csv_rows(path: Path, delimiter: str) -> tuple[list[str], list[list[str]]]:
    """A CSV file's header row (names stripped; [] for an empty file) and its non-blank rows."""
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter=delimiter))
    header = [h.strip() for h in rows[0]] if rows else []
    return header, [row for row in rows[1:] if any(cell.strip() for cell in row)]


def one_delimiter(value: str) -> str | None:
    """A CSV delimiter is one character, not the quote or a line break (csv.reader's rules)."""
    if len(value) != 1:
        return "must be one character"
    return "cannot be a quote or a line break" if value in "\"\r\n" else None


def delimiter_hint(value: str) -> str:
    return "For example delimiter: ';' (a tab: delimiter: \"\\t\")."


@source("csv", paths=("path",), path=Key((str,), REQUIRED), target=Key((str, list), REQUIRED),
        features=Key((list, type(None)), None), delimiter=Key((str,), ",", one_delimiter, hint=delimiter_hint))
def load_csv(options: dict, ctx: SourceContext) -> tuple[torch.Tensor, torch.Tensor]:
    """A CSV file with a header row; `target` names the label column(s), `features` the inputs
    (default: every other column; the list read is put in `options`, so that the run's config
    records which columns its model takes). Linear in the number of cells."""
    path = ctx.path(options)
    try:
        header, body = read_csv_rows(path, options["delimiter"])
    except (UnicodeDecodeError, csv.Error) as err:
        raise ctx.error(f"{path.name} is not a text CSV file ({err})", "path") from None
    if not header:
        raise ctx.error(f"{path} is empty; expected a header row and data rows", "path")
    if not body:
        raise ctx.error(f"{path} has a header but no data rows", "path")
    for key in ("target", "features"):
        for name in options[key] if isinstance(options[key], list) else []:
            if not isinstance(name, str):
                raise ctx.error(f"expected column names, got {value_kind(name)} {to_plain(name)!r}", key,
                                hint=f"Quote a column named by a number: '{name}'." if isinstance(name, (int, float))
                                else None)
    targets = options["target"] if isinstance(options["target"], list) else [options["target"]]
    target_set = set(targets)
    features = options["features"] or [h for h in header if h not in target_set]
    if set(features) & target_set:
        raise ctx.error(f"column '{sorted(set(features) & target_set)[0]}' is both a feature and "
                        "a target; the model would see the answer", "features")
    if len(header) == 1 and options["delimiter"] == "," and any(d in header[0] for d in ";\t|"):
        raise ctx.error(f"{path.name} has a single column '{header[0]}'", "path",
                        hint="Set delimiter: to the file's separator, e.g. delimiter: ';'.")
    columns: dict[str, int] = {}
    for i, name in enumerate(header):
        columns.setdefault(name, i)  # a name given twice: its first column
    for key, names in (("target", targets), ("features", features)):
        for name in names:
            if name not in columns:
                raise ctx.error(f"column '{name}' is not in {path.name} (columns: {_listed(header)})",
                                key, hint=_column_hint(name, header))
    short = next((r for r, row in enumerate(body) if len(row) != len(header)), None)
    if short is not None:
        raise ctx.error(f"{path.name} row {short + 2} has {len(body[short])} cells, the header has "
                        f"{len(header)}", "path")

    def numbers(names: list[str]) -> torch.Tensor:
        index = [columns[name] for name in names]
        cells = [[row[i] for i in index] for row in body]
        try:
            values = np.array(cells, dtype=np.float64)  # float() of each cell, spaces allowed
        except ValueError:
            r, c = next((r, c) for r, row in enumerate(cells) for c, cell in enumerate(row) if not _is_number(cell))
            raise ctx.error(f"{path.name} row {r + 2}, column '{names[c]}': '{cells[r][c].strip()}' is not a "
                            "number", "path") from None
        if not (finite := np.isfinite(values)).all():
            r, c = np.argwhere(~finite)[0]
            raise ctx.error(f"{path.name} row {r + 2}, column '{names[c]}': '{cells[r][c].strip()}' is not a "
                            "finite number; a NaN or infinite value makes the loss NaN", "path",
                            hint="Remove or fill in that row.")
        return torch.from_numpy(values.astype(np.float32))

    y = numbers(targets)
    options["features"] = list(features)
    return numbers(features), y[:, 0] if len(targets) == 1 else y


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


LISTED_COLUMNS = 20  # an error about a wide file names its first columns, not a million


def _listed(header: list[str]) -> str:
    shown = ", ".join(header[:LISTED_COLUMNS])
    return shown if len(header) <= LISTED_COLUMNS else f"{shown}, ... {len(header):,} in all"


def _column_hint(name: str, header: list[str]) -> str | None:
    """'Did you mean ...?' among the columns whose names are about as long (a close spelling is),
    the closest in length first, at most 100,000: comparing with every name of a 10^6-column
    header would take seconds."""
    near = sorted((h for h in header if abs(len(h) - len(name)) <= 2), key=lambda h: abs(len(h) - len(name)))
    return did_you_mean(name, near[:100_000])


@source("npz", paths=("path",), path=Key((str,), REQUIRED), x=Key((str,), "x"), y=Key((str,), "y"))
def load_npz(options: dict, ctx: SourceContext) -> tuple[torch.Tensor, torch.Tensor]:
    """A NumPy .npz archive; `x` and `y` name its arrays."""
    path = ctx.path(options)
    try:
        arrays = np.load(path, allow_pickle=False)
        if not hasattr(arrays, "files"):
            raise ValueError("a single array, not an archive")
    except Exception as err:
        reason = "not a NumPy archive" if "pickle" in str(err) else str(err)
        raise ctx.error(f"{path.name} is not a readable .npz file ({reason})", "path") from None
    out = []
    for key in ("x", "y"):
        if options[key] not in arrays.files:
            raise ctx.error(f"{path.name} has no array '{options[key]}' (it has: "
                            f"{', '.join(arrays.files)})", key)
        try:  # each array is read here, when asked for
            array = arrays[options[key]]
        except Exception as err:
            raise ctx.error(f"{path.name}: array '{options[key]}' cannot be read: {_array_problem(err)}", key,
                            hint=_OBJECT_HINT if _holds_objects(err) else None) from None
        out.append(_numeric_tensor(array, ctx, key))
    return out[0], out[1]


@source("npy", paths=("x", "y"), x=Key((str,), REQUIRED), y=Key((str,), REQUIRED), mmap=Key((bool,), False))
def load_npy(options: dict, ctx: SourceContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Two NumPy .npy files: `x` (the inputs) and `y` (the targets). `mmap: true` maps `x` instead
    of reading it: with `loader: dataloader` only the rows of each batch are read, so `x` may be
    larger than memory."""
    if options["mmap"] and not ctx.streamed:
        raise ctx.error("mmap: true reads samples a batch at a time, which needs loader: dataloader",
                        "mmap", hint="Add loader: dataloader to the data section, or remove mmap "
                                     "(on the command line: --set data.mmap=false).")
    out = []
    for key in ("x", "y"):
        path = ctx.path(options, key)
        mapped = options["mmap"] and key == "x"
        try:
            array = map_npy(path) if mapped else np.load(path, allow_pickle=False)
            if not isinstance(array, np.ndarray):  # np.load opens .npz archives too
                raise ValueError(f"it is an .npz archive (arrays: {', '.join(array.files)}); "
                                 f"use source: npz with path: {options[key]}")
        except Exception as err:
            raise ctx.error(f"{path.name} is not a readable .npy file: {_array_problem(err)}", key,
                            hint=_OBJECT_HINT if _holds_objects(err) else None) from None
        if mapped and not array.flags.c_contiguous:  # a copy would read the whole file into memory
            raise ctx.error(f"{path.name} is stored in Fortran order; a memory map can only read it "
                            "row by row in C order", key, hint="Re-save it with "
                            "np.save(path, np.ascontiguousarray(x)), or remove mmap.")
        if mapped and not array.dtype.isnative:
            raise ctx.error(f"{path.name} is stored {_BYTE_ORDER[array.dtype.byteorder]}; a memory map "
                            "reads it as stored, and torch takes this machine's byte order", key,
                            hint="Re-save it with np.save(path, x.astype(x.dtype.newbyteorder('='))), "
                                 "or remove mmap.")
        out.append(_numeric_tensor(array, ctx, key))
        if mapped:
            ctx.mapped_file = path
    return out[0], out[1]


_BYTE_ORDER = {">": "big-endian", "<": "little-endian"}
_OBJECT_HINT = "Save numbers: e.g. np.save(path, np.asarray(x, dtype=np.float32))."


def _holds_objects(err: Exception) -> bool:
    return "allow_pickle" in str(err)


def _array_problem(err: Exception) -> str:
    """Why NumPy cannot read an array, in words: an object array is refused unread (reading it
    would unpickle it, which can run code)."""
    if _holds_objects(err):
        return "it holds Python objects (dtype object), which only pickle can read, and nncli never unpickles data"
    return str(err) or type(err).__name__


def _numeric_tensor(array: np.ndarray, ctx: SourceContext, key: str) -> torch.Tensor:
    """A tensor of the array's real numbers or booleans, in this machine's byte order."""
    if np.issubdtype(array.dtype, np.complexfloating):  # torch would drop the imaginary parts with a warning
        raise ctx.error(f"array '{key}' holds complex numbers ({array.dtype}); a model trains on real numbers",
                        key, hint="Give the real and imaginary parts as two features: "
                                  "np.stack([x.real, x.imag], axis=-1).")
    if not np.issubdtype(array.dtype, np.number) and array.dtype != bool:
        raise ctx.error(f"array '{key}' holds {array.dtype}, not numbers", key)
    if not array.dtype.isnative:  # valid data (written on a big-endian machine, say); torch reads native only
        array = array.astype(array.dtype.newbyteorder("="))
    return torch.from_numpy(np.ascontiguousarray(array))


@source("synthetic", kind=Key((str,), "classification", one_of("classification", "regression", "images")),
        n=Key((int,), 1000, positive), features=Key((int,), 16, positive),
        classes=Key((int,), 2, positive), noise=Key(NUMBER, 0.5), shape=Key((list,), [3, 32, 32]))
def load_synthetic(options: dict, ctx: SourceContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Random Gaussian inputs and a noisy linear target, generated from the run's seed.

    Two classes are `x @ w + noise > 0`, the same data as reference_loop.py's synthetic set;
    `kind: images` gives random images of `shape` with random labels (for throughput only)."""
    g = torch.Generator().manual_seed(ctx.seed)
    n, features, noise = options["n"], options["features"], options["noise"]
    if options["kind"] == "images":
        return torch.randn(n, *options["shape"], generator=g), torch.randint(0, options["classes"], (n,), generator=g)
    x = torch.randn(n, features, generator=g)
    if options["kind"] == "regression":
        w = torch.randn(features, generator=g)
        return x, x @ w + noise * torch.randn(n, generator=g)
    if options["classes"] == 2:
        w = torch.randn(features, generator=g)
        return x, ((x @ w + noise * torch.randn(n, generator=g)) > 0).long()
    w = torch.randn(features, options["classes"], generator=g)
    return x, (x @ w + noise * torch.randn(n, options["classes"], generator=g)).argmax(1)


@source("torchvision", paths=("root",), name=Key((str,), REQUIRED), root=Key((str,), "data"),
        download=Key((bool,), False), train=Key((bool,), True))
def load_torchvision(options: dict, ctx: SourceContext) -> tuple[torch.Tensor, torch.Tensor]:
    """A torchvision dataset (e.g. MNIST), read once into memory as tensors. `root`, `train` and
    `download` go to the datasets that take them (FakeData, made up in memory, takes none)."""
    datasets, to_tensor = _import_torchvision(ctx)
    name = options["name"]
    names = [n for n in dir(datasets) if isinstance(getattr(datasets, n), type)]
    if name not in names:
        raise ctx.error(f"torchvision has no dataset '{name}'", "name", hint=did_you_mean(name, names))
    dataset_class = getattr(datasets, name)
    takes = accepted_arguments(dataset_class)
    given = {"train": options["train"], "download": options["download"]}
    root = ctx.config.locate(options["root"])
    if takes is None or "root" in takes:  # a folder to read (and write, with download): checked as one
        given["root"] = str(ctx.config.resolve_path(options["root"], *ctx.where, "root"))
    try:
        dataset = dataset_class(**{k: v for k, v in given.items() if takes is None or k in takes},
                                transform=to_tensor)
    except Exception as err:
        if options["download"]:  # fetching failed: the network, a proxy, the disk
            hint = (f"Check the network connection; or download the files elsewhere, copy them to {root} "
                    "and set download: false.")
        else:
            hint = f"Set download: true to fetch them, or root: to the folder that holds them (now {root})."
        raise ctx.error(f"cannot load {name}: {first_line(err)}", "name", hint=hint) from None
    loader = torch.utils.data.DataLoader(dataset, batch_size=1024)
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def data_paths(config: Config) -> list[Path]:
    """The files and folders the data section's sources read, located but not read."""
    section = config["data"] or {}
    sources = [section.get("train"), section.get("val")] if "train" in section else [section]
    located = []
    for options in sources:
        name = options.get("source") if isinstance(options, dict) else None
        if isinstance(name, str) and name in SOURCES:
            located += [config.locate(options[key]) for key in SOURCES.get(name).paths
                        if isinstance(options.get(key), str)]
    return located


def _import_torchvision(ctx: SourceContext) -> tuple[Any, Callable]:
    """torchvision's datasets and a ToTensor transform. Bad input (exit 2) when torchvision is
    missing, or does not work with the installed torch: one built for another torch fails as it
    loads its operators ("operator torchvision::nms does not exist")."""
    try:
        import torchvision
        from torchvision.transforms import ToTensor
    except Exception as err:  # a broken install fails in many ways: RuntimeError, OSError, ImportError
        if isinstance(err, ModuleNotFoundError) and err.name == "torchvision":
            raise ctx.error("needs torchvision, which is not installed", "name",
                            hint="Install it with: pip install 'nncli[vision]'.") from None
        why = first_line(err)
        other_torch = "torchvision::" in why or "undefined symbol" in why  # its operators do not load
        torch_version = torch.__version__.split("+")[0]
        raise ctx.error(f"torchvision {_version('torchvision')} does not work with the installed torch "
                        f"{torch.__version__}: importing it fails with '{why}'"
                        + (", the sign of a torchvision built for another torch" if other_torch else ""), "name",
                        hint=f"Install the torchvision made for torch {torch_version}, from the package index "
                             f"torch came from: pip install --upgrade 'torch=={torch_version}' torchvision.") from None
    return torchvision.datasets, ToTensor()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


# --- the data section ------------------------------------------------------------------------

# How batches are read (the data section's keys, in either layout).
LOADER_KEYS = {
    "loader": Key((str,), "memory", one_of("memory", "dataloader")),
    "workers": Key((int,), 0, non_negative),
}
# Keys of the data section itself; the rest belong to its source.
DATA_KEYS = {
    "val_split": Key(NUMBER, 0.2, lambda v: None if v == 0 else fraction(v)),  # tensors: 0 (see load_tensors)
    "normalize": Key((bool,), False),
    **LOADER_KEYS,
}
PAIR_KEYS = {"train": Key((dict,), None), "val": Key((dict, type(None)), None),
             "normalize": DATA_KEYS["normalize"], **LOADER_KEYS}
SECTION_KEYS["data"] = DATA_KEYS  # `loader:` put under train: is told where it goes
CHUNK_BYTES = 64 << 20  # one pass over the inputs (statistics, fingerprint): float64 rows at a time


@dataclass
class Data:
    train: Samples
    val: Samples | None
    sample_shape: tuple
    normalization: dict | None  # {"mean": tensor, "std": tensor} of the training inputs
    fingerprint: str = ""  # see data_fingerprint


def _chunk_rows(samples: Samples) -> int:
    """Rows per chunk of a pass over the inputs, sized by their float64 copy (the statistics')."""
    return max(1, CHUNK_BYTES // (8 * max(math.prod(samples.x.shape[1:]), 1)))


def data_fingerprint(train: Samples, val: Samples | None) -> str:
    """A CRC-32 of the training and validation inputs (as the model takes them) and targets,
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


def normalization_of(samples: Samples) -> dict:
    """Per-feature mean and standard deviation of the inputs, in one pass of float64 chunks
    (merged as Chan et al.), so the inputs need not fit in memory at once; in the inputs' dtype
    (float32 for integer inputs). A constant feature keeps std 1."""
    n, mean, m2 = 0, torch.zeros(samples.x.shape[1:], dtype=torch.float64), 0.0
    dtype = samples.dtype if samples.dtype.is_floating_point else torch.float32
    for x in samples.input_chunks(_chunk_rows(samples)):
        x, k = x.to(torch.float64, copy=True), len(x)  # a copy: the deviations are taken in place
        chunk_mean = x.mean(0)
        delta = chunk_mean - mean
        mean = mean + delta * (k / (n + k))
        m2 = m2 + x.sub_(chunk_mean).square_().sum(0) + delta ** 2 * (n * k / (n + k))
        n += k
    std = (m2 / max(n - 1, 1)).sqrt()
    return {"mean": mean.to(dtype), "std": torch.where(std > 0, std, torch.ones_like(std)).to(dtype)}


def read_source(options: dict, config: Config, where: tuple, loader: dict,
                section_keys: dict[str, Key] | None = None) -> tuple[Samples, dict]:
    """Check one source mapping (`source:` and that source's keys, and `section_keys` where the
    source shares its mapping with the data section's own keys) and load it, as the `loader`
    options ask; also return the mapping with the defaults filled in."""
    if not isinstance(options, dict) or not options.get("source"):
        raise config.error(f"needs 'source:', one of: {', '.join(SOURCES)}", *where)
    try:
        src = SOURCES.get(options["source"])
    except ConfigError as err:
        raise config.error(err.message, *where, "source", hint=err.hint) from None
    if where != ("data",):  # a source under train: or val:, where the loader keys do not go
        for key in LOADER_KEYS:
            if key in options:
                raise config.error("belongs to the data section itself, beside train: and val: (it applies "
                                   "to both)", *where, key, hint=f"Move it up: data: {{{key}: ..., train: {{...}}}}.")
    for key in options:  # a key of another source (mmap on a csv): say whose it is
        owners = [name for name, other in SOURCES.items() if key in other.keys and key not in src.keys]
        if owners and key != "source":
            own = f"its keys: {', '.join(src.keys)}" if src.keys else "it takes no keys"
            raise config.error(f"source {options['source']} has no key '{key}' ({own}); {key} belongs to "
                               f"the {', '.join(owners)} source{'s' if len(owners) > 1 else ''}", *where, key)
    # every key the mapping takes, so that a misspelt one is told the closest of them all
    checked = check_section(options, {"source": Key((str,)), **src.keys, **(section_keys or {})},
                            config.error, *where)
    ctx = SourceContext(config, where, streamed=loader["loader"] == "dataloader")
    x, y = src.load(checked, ctx)
    if len(x) != len(y):
        raise ctx.error(f"x has {len(x)} samples but y has {len(y)}; they must match")
    if len(x) == 0:
        raise ctx.error("has no samples")
    if x.dim() == 1:  # x: [1, 2, 3] means three samples of one feature
        x = x.unsqueeze(1)
    for name, values in (("x", None if ctx.mapped_file else x), ("y", y)):  # a mapped file is not read here
        if values is not None and (bad := _first_non_finite(values)) is not None:
            position = f", position {bad[1:]}" if len(bad) > 2 else f", column {bad[1]}" if len(bad) == 2 else ""
            raise ctx.error(f"{name} holds {values[tuple(bad)].item()} at sample {bad[0]} (counting from 0)"
                            f"{position}; a NaN or infinite value makes the loss NaN",
                            hint="Remove or fill in those samples.")
    dtype = getattr(torch, config["model"]["input_dtype"])
    if ctx.streamed:
        return HostSamples(x, torch.arange(len(x)), y, dtype, loader["workers"],
                           mapped_file=ctx.mapped_file), checked
    return TensorPair(x.to(dtype), y), checked


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


def load_data(config: Config, normalization: dict | None = None, *, scan: bool = True) -> Data:
    """Read the data section: sources, split, normalization; targets as the loss needs them.

    Either one source (with `val_split:`, default 0.2, inline tensors 0; 0 for no validation) or
    `train:` and optional `val:` sources. The section, its defaults filled in, replaces `config["data"]`, so
    the run's config.yaml records them. With `normalize: true`, the inputs are normalized with
    `normalization` when given (a checkpoint's: what its model was trained with), else with the
    training set's statistics. `scan=False` skips the passes over every input (the fingerprint,
    the statistics) when the data is only checked: a mapped file is then not read."""
    section = config["data"]
    if section is None:
        raise config.error("the config has no 'data' section; add one, e.g. data: {source: digits}")
    if "train" in section:
        options = check_section(section, PAIR_KEYS, config.error, "data")
        _check_loader(options, config)
        train, options["train"] = read_source(section["train"], config, ("data", "train"), options)
        val = None
        if section.get("val"):
            val, options["val"] = read_source(section["val"], config, ("data", "val"), options)
    else:
        if "val" in section:
            raise config.error("val: needs train: beside it (or use val_split:)", "data", "val")
        own = {k: v for k, v in section.items() if k in DATA_KEYS}
        options = check_section(own, DATA_KEYS, config.error, "data")
        _check_loader(options, config)
        everything, source_options = read_source(section, config, ("data",), options, DATA_KEYS)
        options.update({k: v for k, v in source_options.items() if k not in DATA_KEYS})  # the section's: checked
        if "val_split" not in section:
            options["val_split"] = SOURCES.get(options["source"]).default_split
        train, val = split_data(everything, options["val_split"], config)
    if val is not None and val.x.shape[1:] != train.x.shape[1:]:
        raise config.error(f"validation samples have shape {list(val.x.shape[1:])}, training samples "
                           f"{list(train.x.shape[1:])}; they must match", "data", "val")
    classes = loss_name(config) in CLASS_INDEX_LOSSES
    for name, pair in (("training", train), ("validation", val)):
        if classes and pair is not None and pair.y.is_floating_point() and \
                (unusable := (pair.y != pair.y.round()) | (pair.y.abs() >= 2**53)).any():  # 2**53: not exact
            bad = pair.y[unusable][0].item()
            raise config.error(f"{name} targets are not class indices (e.g. {bad:g}), but "
                               f"{loss_name(config)} needs whole-number labels", "loss",
                               hint="For regression set loss: MSELoss (or another regression loss).")
    train, val = (None if p is None else replace(p, y=_class_indices(p.y) if classes else p.y.float())
                  for p in (train, val))
    fingerprint = data_fingerprint(train, val) if scan else ""
    if not (options["normalize"] and scan):
        normalization = None
    else:
        normalization = normalization or normalization_of(train)
        train = train.normalized(normalization)
        val = val.normalized(normalization) if val is not None else None
    config.values["data"] = options
    return Data(train, val, tuple(train.x.shape[1:]), normalization, fingerprint)


def _check_loader(options: dict, config: Config) -> None:
    """`workers` only with `loader: dataloader`, and no more of them than CPUs to run them (the
    `options` then say how many run)."""
    if options["workers"] and options["loader"] == "memory":
        raise config.error(f"workers: {options['workers']} does nothing with loader: memory (the data "
                           "is indexed where it lies; no worker reads it)", "data", "workers",
                           hint="Add loader: dataloader to read batches in worker processes, or remove "
                                "workers (on the command line: --set data.workers=0).")
    if options["workers"] > (cpus := usable_cpus()):
        warnings.warn(str(config.error(f"{options['workers']} worker processes asked for, but this process may "
                                       f"use {cpus} CPUs: {cpus} workers read the batches", "data", "workers")))
        options["workers"] = cpus


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
            f"a split of {val_split} keeps {n_val} of the {len(data)} samples out of training for validation: "
            f"fewer than {MIN_VALIDATION}, too few for a validation loss that means much, yet that loss picks "
            "best.pt (and early stopping)", "data", "val_split",
            hint="Use val_split: 0 to train on every sample, or give more data.")))
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(config["seed"]))
    return data.subset(perm[n_val:]), data.subset(perm[:n_val])


def token_id_problem(x: torch.Tensor, model: nn.Module) -> str | None:
    """For token ids (integer inputs): an id outside the model's first Embedding, which would
    stop training (or predict) with torch's IndexError; None when all fit."""
    embedding = next((m for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))), None)
    if x.is_floating_point() or embedding is None or not len(x):
        return None
    low, high, size = int(x.min()), int(x.max()), embedding.num_embeddings
    if low >= 0 and high < size:
        return None
    return f"token id {low if low < 0 else high} is outside the Embedding's num_embeddings: {size} (ids 0 to {size - 1})"


def check_token_ids(data: Data, model: nn.Module, config: Config) -> None:
    """Every token id within the model's Embedding (a memory-mapped file is not read here)."""
    for name, pair in (("training", data.train), ("validation", data.val)):
        if pair is not None and getattr(pair, "mapped_file", None) is None:
            if (problem := token_id_problem(pair.x, model)) is not None:
                raise config.error(f"{name} inputs: {problem}", "data",
                                   hint="Make num_embeddings the size of the vocabulary.")


def check_targets(data: Data, output_shape: tuple, config: Config) -> None:
    """Labels within the output layer's classes; regression targets shaped like the output."""
    for name, pair in (("training", data.train), ("validation", data.val)):
        if pair is None:
            continue
        if pair.y.dtype == torch.long:
            expected = pair.y.dim()  # the output per sample: classes, then the labels' own dims (for maps)
            if len(output_shape) != expected:
                raise config.error(f"the model's output has shape {list(output_shape)} per sample, but "
                                   f"class labels need {'[classes]' if expected == 1 else f'{expected} dimensions'}",
                                   "model", "layers", hint="Flatten before the last Linear layer?")
            classes = output_shape[0] if output_shape else 1
            low, high = int(pair.y.min()), int(pair.y.max())
            if low < 0 or high >= classes:
                raise config.error(f"{name} labels run from {low} to {high}, but the model's output "
                                   f"has {classes} classes (labels 0 to {classes - 1})", "data",
                                   hint="Make the last layer's out_features the number of classes.")
        else:
            if pair.y.dim() == 1 and tuple(output_shape) == (1,):
                pair.y = pair.y[:, None]  # (N,) targets for an (N, 1) output: avoid silent broadcasting
            if tuple(pair.y.shape[1:]) != tuple(output_shape):  # the loss would broadcast, or fail
                labels = pair.y.dim() == 1 and len(output_shape) == 1 and torch.equal(pair.y, pair.y.round())
                raise config.error(f"{name} targets have shape {list(pair.y.shape[1:])} per sample, but "
                                   f"the model's output has shape {list(output_shape)}", "data",
                                   hint="For class labels, use a classification loss (loss: CrossEntropyLoss)."
                                   if labels else "Make the last layer's out_features match the targets.")
