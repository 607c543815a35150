"""Data sources: the functions that read each `source:` into tensors `x` (samples first) and `y`.

Each is registered with `@loads(name)`; the keys it takes, checked and with their defaults
filled in before it is called, are in `nncli.config.schema.SOURCES`.
"""
from __future__ import annotations

import csv
import importlib.metadata
import math
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nncli.arguments import accepted_arguments
from nncli.config import Config
from nncli.config.yamlio import to_plain
from nncli.data import images
from nncli.data.samples import map_npy
from nncli.errors import ConfigError, did_you_mean, first_line, value_kind


@dataclass
class SourceContext:
    """What a source needs besides its own keys: errors at its keys, paths, the seed."""

    config: Config
    where: tuple  # key path of the source's mapping, e.g. ("data",) or ("data", "train")
    streamed: bool = False  # `loader: dataloader`: the inputs are read a batch at a time
    mapped_file: Path | None = None  # set by a source whose x is a memory map of this file
    pixels: bool = False  # set by a source whose x is uint8 pixels, 0 to 255 (images)
    classes: list[str] | None = None  # set by a source whose labels are names: y indexes these

    def error(self, message: str, key: str | None = None, hint: str | None = None) -> ConfigError:
        return self.config.error(message, *self.where, *([key] if key else []), hint=hint)

    def path(self, options: dict, key: str = "path") -> Path:
        path = self.config.resolve_path(options[key], *self.where, key)
        if path.is_dir():
            raise self.error(f"{path} is a folder; expected a file", key)
        if not path.exists():
            raise self.error(f"file {path} not found (paths are relative to the config file)", key)
        if not path.is_file():
            raise self.error(f"{path} is not a regular file (a device or a pipe); expected a file", key)
        return path

    @property
    def seed(self) -> int:
        return self.config["seed"]


Loader = Callable[[dict, "SourceContext"], tuple[torch.Tensor, torch.Tensor]]
LOADERS: dict[str, Loader] = {}  # a source's name (config.schema.SOURCES) -> what reads it


def loads(name: str) -> Callable[[Loader], Loader]:
    """Register the function that reads the source `name`; its keys, checked before it is called
    and given to it with their defaults, are in config.schema.SOURCES."""
    def add(load: Loader) -> Loader:
        LOADERS[name] = load
        return load
    return add


@loads("digits")
def load_digits(options: dict, ctx: SourceContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The bundled 8x8 handwritten digits: 1,797 images (1, 8, 8) in [0, 1], 10 classes."""
    with resources.files("nncli").joinpath("datasets", "digits.npz").open("rb") as f:
        arrays = np.load(f)
        return torch.from_numpy(arrays["images"]), torch.from_numpy(arrays["labels"])


@loads("tensors")
def load_tensors(options: dict, ctx: SourceContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Inline `x:` and `y:` lists, as in the tutorial's linear regression."""
    tensors = []
    for key in ("x", "y"):
        try:
            tensors.append(torch.tensor(options[key], dtype=torch.float32))
        except (TypeError, ValueError) as err:
            raise ctx.error(f"expected a (nested) list of numbers with equal-length rows: {err}",
                            key) from None
    return tensors[0], tensors[1]


def read_csv_rows(path: Path, delimiter: str) -> tuple[list[str], list[list[str]]]:
    """A CSV file's header row (names stripped; [] for an empty file) and its non-blank rows."""
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter=delimiter))
    header = [h.strip() for h in rows[0]] if rows else []
    return header, [row for row in rows[1:] if any(cell.strip() for cell in row)]


@loads("csv")
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
                                hint=f"Quote a column named by a number: '{name}'."
                                if isinstance(name, (int, float)) else None)
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
            r, c = next((r, c) for r, row in enumerate(cells) for c, cell in enumerate(row)
                        if not _is_number(cell))
            raise ctx.error(f"{path.name} row {r + 2}, column '{names[c]}': '{cells[r][c].strip()}' is not a "
                            "number", "path") from None
        if not (finite := np.isfinite(values)).all():
            r, c = np.argwhere(~finite)[0]
            raise ctx.error(f"{path.name} row {r + 2}, column '{names[c]}': '{cells[r][c].strip()}' is not a "
                            "finite number; a NaN or infinite value makes the loss NaN", "path",
                            hint="Remove or fill in that row.")
        return torch.from_numpy(values.astype(np.float32))

    names = _label_names(body, columns[targets[0]], ctx, path, targets[0]) if len(targets) == 1 else None
    if names is not None:  # words: indices into their sorted names (data.load.name_classes maps them on)
        ctx.classes = sorted(set(names))
        index = {name: i for i, name in enumerate(ctx.classes)}
        y = torch.tensor([index[name] for name in names])
    else:
        y = numbers(targets)
        y = y[:, 0] if len(targets) == 1 else y
    options["features"] = list(features)
    return numbers(features), y


def _label_names(body: list[list[str]], column: int, ctx: SourceContext, path: Path,
                 name: str) -> list[str] | None:
    """A target column of words (iris's species), as its stripped cells; None when it holds numbers.
    Numbers with a word among them are a typo, not names: an error naming the cell, unless the
    config lists the classes by name (`data.class_names`), which makes every cell a name."""
    cells = [row[column].strip() for row in body]
    given = (ctx.config["data"] or {}).get("class_names") is not None
    numeric = [_is_number(cell) for cell in cells]
    if all(numeric) and not given:
        return None
    if any(numeric) and not given:
        r = numeric.index(False) if numeric.count(False) <= numeric.count(True) else numeric.index(True)
        kind = "not a number" if not numeric[r] else "a number"
        others = "numbers" if not numeric[r] else "names"
        raise ctx.error(f"{path.name} row {r + 2}, column '{name}': '{cells[r]}' is {kind}, but the "
                        f"column's other labels are {others}", "path",
                        hint="Fix that cell; to use numbers as class names, list them in data.class_names.")
    empty = next((r for r, cell in enumerate(cells) if not cell), None)
    if empty is not None:
        raise ctx.error(f"{path.name} row {empty + 2}, column '{name}' is empty; a class label needs a name",
                        "path", hint="Fill in that row's class, or remove the row.")
    return cells


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


@loads("npz")
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


@loads("npy")
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
        return ("it holds Python objects (dtype object), which only pickle can read, and nncli never "
                "unpickles data")
    return str(err) or type(err).__name__


def _numeric_tensor(array: np.ndarray, ctx: SourceContext, key: str) -> torch.Tensor:
    """A tensor of the array's real numbers or booleans, in this machine's byte order."""
    if np.issubdtype(array.dtype, np.complexfloating):  # torch would drop the imaginary parts with a warning
        raise ctx.error(f"array '{key}' holds complex numbers ({array.dtype}); a model trains on "
                        "real numbers",
                        key, hint="Give the real and imaginary parts as two features: "
                                  "np.stack([x.real, x.imag], axis=-1).")
    if not np.issubdtype(array.dtype, np.number) and array.dtype != bool:
        raise ctx.error(f"array '{key}' holds {array.dtype}, not numbers", key)
    if not array.dtype.isnative:  # valid data (written on a big-endian machine, say); torch reads native only
        array = array.astype(array.dtype.newbyteorder("="))
    return torch.from_numpy(np.ascontiguousarray(array))


@loads("synthetic")
def load_synthetic(options: dict, ctx: SourceContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Random Gaussian inputs and a noisy linear target, generated from the run's seed.

    Two classes are `x @ w + noise > 0`, the same data as reference_loop.py's synthetic set;
    `kind: images` gives random images of `shape` with random labels (for throughput only)."""
    g = torch.Generator().manual_seed(ctx.seed)
    n, features, noise = options["n"], options["features"], options["noise"]
    per_sample = (math.prod(options["shape"]) if options["kind"] == "images"
                  else max(features, options["classes"]))
    if n * per_sample >= 2**63:  # else torch's "Storage size calculation overflowed"
        raise ctx.error(f"{n:,} samples of {per_sample:,} numbers each are more than a tensor holds (2**63)",
                        "n")
    if options["kind"] == "images":
        return (torch.randn(n, *options["shape"], generator=g),
                torch.randint(0, options["classes"], (n,), generator=g))
    x = torch.randn(n, features, generator=g)
    if options["kind"] == "regression":
        w = torch.randn(features, generator=g)
        return x, x @ w + noise * torch.randn(n, generator=g)
    if options["classes"] == 2:
        w = torch.randn(features, generator=g)
        return x, ((x @ w + noise * torch.randn(n, generator=g)) > 0).long()
    w = torch.randn(features, options["classes"], generator=g)
    return x, (x @ w + noise * torch.randn(n, options["classes"], generator=g)).argmax(1)


@loads("images")
def load_images(options: dict, ctx: SourceContext) -> tuple[torch.Tensor, torch.Tensor]:
    """A folder of class folders, `root/<class>/<image>`: the class names are the folder names,
    sorted; every image decoded once, converted to `mode`, resized to `size`, into uint8
    (N, C, H, W). With `cache: true`, decoded into an .npy beside the folder and mapped from it,
    read again while the folder is unchanged (nncli.data.images)."""
    root = ctx.config.resolve_path(options["root"], *ctx.where, "root")
    size = options["size"]  # (height, width), from one number or a list of one or two
    if size is not None:
        size = tuple(size * 2 if len(size) == 1 else size) if isinstance(size, list) else (size, size)
    try:
        images.pillow()
    except images.ImageProblem as err:
        raise ctx.error(str(err), "source", hint=err.hint) from None
    try:
        folder = images.list_folder(root)
        if options["cache"]:
            pixels = images.cached_images(folder, options["mode"], size)
            if isinstance(pixels, np.memmap):  # else decoded into memory: the cache could not be written
                ctx.mapped_file = Path(pixels.filename)
        else:
            pixels = images.decode_images(folder.files, options["mode"], size)
    except images.ImageProblem as err:
        raise ctx.error(str(err), "root", hint=err.hint) from None
    ctx.pixels, ctx.classes = True, folder.classes
    return torch.from_numpy(pixels), torch.tensor(folder.labels)


@loads("torchvision")
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
                        + (", the sign of a torchvision built for another torch" if other_torch else ""),
                        "name",
                        hint=f"Install the torchvision made for torch {torch_version}, from the package "
                             f"index torch came from: pip install --upgrade 'torch=={torch_version}' "
                             "torchvision.") from None
    return torchvision.datasets, ToTensor()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


