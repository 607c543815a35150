"""Checkpoints: written atomically, read with `weights_only=True`, checked before use.

A checkpoint is a dict of plain containers and tensors, so `torch.load(path, weights_only=True)`
reads it and loading can never run code. It is written with nncli.files.write_atomic: a crash at
any instant leaves either the previous checkpoint or the new one, never a broken file.
"""
from __future__ import annotations

import io
import pickle
import random
import re
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nncli.errors import ConfigError, is_out_of_memory

FORMAT = "nncli-checkpoint-1"


def checkpoint_bytes(obj: Any) -> memoryview:
    """`obj` serialised as `torch.save` writes it; serialising first means a failure here
    touches no file, and one serialisation can be written to several files."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer()


def on_cpu(value: Any, copy: bool = False) -> Any:
    """`value` (a state_dict, or containers of them) with every tensor on the CPU, so that a
    checkpoint from a GPU run loads on a machine without one; `copy`: tensors already on the CPU
    are cloned too, so that later training steps cannot change them."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=copy)
    if isinstance(value, dict):
        moved = type(value)((k, on_cpu(v, copy)) for k, v in value.items())
        if hasattr(value, "_metadata"):  # a module state_dict's versions, for load_state_dict
            moved._metadata = value._metadata
        return moved
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(v, copy) for v in value)
    return value


def load_file(path: Path) -> Any:
    """torch.load with weights_only=True; every way a file can be bad becomes a ConfigError."""
    path = Path(path)
    if not path.exists():
        raise ConfigError("checkpoint not found; check the path", file=str(path))
    if path.is_dir():
        raise ConfigError("is a folder with no last.pt or best.pt; expected a run directory or a "
                          "checkpoint file", file=str(path))
    if path.stat().st_size == 0:
        raise ConfigError("the file is empty (0 bytes); it is not a checkpoint", file=str(path))
    is_zip = zipfile.is_zipfile(path)
    if not is_zip:
        try:
            with open(path, "rb") as f:
                head = f.read(4)
        except OSError as err:
            raise ConfigError(f"cannot read the file: {err.strerror or err}", file=str(path)) from None
        if head == b"PK\x03\x04":  # an archive's first entry, but no end: cut short
            raise ConfigError("the file is truncated (a torch.save archive without its end; was it "
                              "still being written or copied?)", file=str(path))
        if head[:1] != b"\x80":  # neither torch's zip archive nor a pickle (protocol 2+)
            raise ConfigError("not a PyTorch checkpoint (neither a torch.save archive nor a pickle)",
                              file=str(path))
    if is_zip:  # torch's reader does not check the archive's CRCs; do it here
        try:
            with zipfile.ZipFile(path) as archive:
                _refuse_inflating(archive, path)  # before testzip, which inflates every entry
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            bad = f"({err})"
        if bad is not None:
            raise ConfigError(f"the file is corrupted: {bad} fails its checksum", file=str(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes about pickle protocols: noise here
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        reason = (f"it refers to {found.group(1)}" if found
                  else "it uses pickle instructions beyond plain data")
        raise ConfigError(f"refused to load: the file holds objects other than tensors and plain "
                          f"containers ({reason}). nncli never loads code from a checkpoint",
                          file=str(path)) from None
    except Exception as err:  # on bytes that are not a checkpoint the unpickler fails in many ways
        if isinstance(err, (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError)) and str(err):
            reason = str(err).split(". ")[0].splitlines()[0]
        else:  # KeyError: 101, IndexError: pop from empty list, ...: say what the file is not
            reason = "it is not a file written by torch.save"
        raise ConfigError(f"not a readable checkpoint (truncated or corrupted?): {reason}",
                          file=str(path)) from None


def _refuse_inflating(archive: zipfile.ZipFile, path: Path) -> None:
    """torch.save stores its archive's entries uncompressed, so together they are never larger
    than the file. Entries that would inflate beyond it (read from the archive's directory, before
    anything is inflated) were not written by torch.save, and reading them could take minutes
    and gigabytes: a 0.9 MB file inflated to 800 MB."""
    inflated, size = sum(info.file_size for info in archive.infolist()), path.stat().st_size
    if inflated > size:
        raise ConfigError(f"refused to load: its entries would inflate to {inflated:,} bytes, and the file "
                          f"has {size:,}; torch.save stores them uncompressed, so it did not write this "
                          "archive", file=str(path))


def find_checkpoint(path: str | Path, prefer: tuple[str, ...] = ("last.pt", "best.pt")) -> Path:
    """A checkpoint file, or the preferred checkpoint inside a run directory."""
    path = Path(path)
    if path.is_dir():
        for name in prefer:
            if (path / name).is_file():
                return path / name
        if (path / "config.yaml").is_file():  # a run that failed or was stopped before its first save
            raise ConfigError(f"has none of {', '.join(prefer)}: the run stopped before it saved one",
                              file=str(path), hint=f"Start it again: nncli train {path / 'config.yaml'}")
        raise ConfigError(f"has none of {', '.join(prefer)}; expected a run directory or a "
                          "checkpoint file", file=str(path))
    return path


def file_stamp(path: Path) -> tuple[int, int, int]:
    """What changes when a checkpoint file is written again (write_atomic renames a new file over
    it): its inode, modification time and size."""
    info = path.stat()
    return info.st_ino, info.st_mtime_ns, info.st_size


def holds_checkpoint(path: Path) -> bool:
    """Whether the file holds an nncli checkpoint rather than a plain state_dict, read from its
    pickle alone, not its tensors: `resume` chooses between going on and a warm start without
    reading a large file twice. Files not in torch's zip format are loaded (and checked) whole."""
    try:
        with zipfile.ZipFile(path) as archive:
            _refuse_inflating(archive, path)
            pickle_name = next(name for name in archive.namelist() if name.endswith("/data.pkl"))
            return FORMAT.encode() in archive.read(pickle_name)
    except (zipfile.BadZipFile, StopIteration, OSError):
        obj = load_file(path)  # says what is wrong with a damaged or missing file
        return isinstance(obj, dict) and obj.get("format") == FORMAT


def load_checkpoint(path: Path) -> dict:
    """An nncli checkpoint (a dict with `format`, `model`, `config`, ...), checked."""
    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ConfigError("not an nncli checkpoint (a plain state_dict? warm-start from it with "
                          "`nncli resume WEIGHTS --config CONFIG`)", file=str(path))
    if (problem := _field_problem(ckpt) or _value_problem(ckpt)) is not None:
        raise ConfigError(f"the checkpoint {problem}; it is damaged, edited or from another tool",
                          file=str(path))
    return ckpt


# What every nncli checkpoint holds, by type (None: may be null), checked before anything reads it
FIELDS = {"model": dict, "optimizer": dict, "scheduler": (dict, type(None)), "scaler": (dict, type(None)),
          "epoch": int, "step": int, "position": int, "epoch_losses": list, "epoch_lrs": list, "best": dict,
          "bad_epochs": int, "stopped_early": bool, "rng": dict, "config": dict, "config_dir": str,
          "input_shape": list, "normalization": (dict, type(None))}
# Files written before metrics.csv was appended to hold the whole history (`metrics`) instead of
# its row count (`metrics_rows`); one of the two is there. Older files lack the rest: `classes`
# (the class names), `target_normalization` (normalize_target), and with train.ema the live
# weights that training goes on from (`training_model`; `model` is then the average) and
# `ema_updates`.
OPTIONAL_FIELDS = {"data_fingerprint": str, "world_size": int, "metrics_rows": int, "metrics": list,
                   "classes": (list, type(None)), "target_normalization": (dict, type(None)),
                   "training_model": dict, "ema_updates": int}


def _field_problem(ckpt: dict) -> str | None:
    for key, kind in {**FIELDS, **OPTIONAL_FIELDS}.items():
        if key not in ckpt:
            if key in FIELDS:
                return f"lacks '{key}'"
        elif not isinstance(ckpt[key], kind) or (kind is int and isinstance(ckpt[key], bool)):
            return f"holds {type(ckpt[key]).__name__} as '{key}'"
    if ("metrics" in ckpt) == ("metrics_rows" in ckpt):
        return "holds neither 'metrics_rows' nor 'metrics'" if "metrics" not in ckpt else \
            "holds both 'metrics_rows' and 'metrics'"
    if "metric" not in ckpt["best"] or not all(isinstance(row, dict) for row in ckpt.get("metrics", [])):
        return "has a 'best' or 'metrics' of the wrong form"
    if ckpt.get("metrics_rows", 0) < 0:
        return "has a negative 'metrics_rows'"
    if not 0 <= ckpt["position"] == len(ckpt["epoch_losses"]):  # a loss for each batch done
        return "has a 'position' that its 'epoch_losses' do not match"
    for key in ("normalization", "target_normalization"):
        if ckpt.get(key) is not None and not all(isinstance(ckpt[key].get(part), torch.Tensor)
                                                 for part in ("mean", "std")):
            return f"has a '{key}' without its 'mean' and 'std' tensors"
    if not all(isinstance(name, str) for name in ckpt.get("classes") or ()):
        return "has 'classes' that are not all names (strings)"
    if ("training_model" in ckpt) != ("ema_updates" in ckpt):
        return "holds one of 'training_model' and 'ema_updates' without the other"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _value_problem(ckpt: dict) -> str | None:
    """Values of the right type that no run writes (after `_field_problem`): a file edited by hand
    would otherwise crash later, or resume from where no run stood."""
    for key in ("epoch", "step", "bad_epochs"):
        if ckpt[key] < 0:
            return f"has '{key}': {ckpt[key]}, below 0"
    if ckpt.get("world_size", 1) < 1:
        return f"has 'world_size': {ckpt['world_size']}; a run has 1 process or more"
    shape = ckpt["input_shape"]
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        return f"has 'input_shape': {shape}; expected one sample's shape, a list of positive integers"
    best = ckpt["best"]
    if best.get("value") is not None and not _is_number(best["value"]):
        return f"has a 'best' value of {best['value']!r}, not a number"
    if best.get("epoch") is not None and not (isinstance(best["epoch"], int)
                                              and not isinstance(best["epoch"], bool)
                                              and 1 <= best["epoch"] <= ckpt["epoch"]):
        return f"has a 'best' epoch of {best['epoch']!r}; expected one of the {ckpt['epoch']} epochs run"
    for key in ("epoch_losses", "epoch_lrs"):
        if not all(_is_number(value) for value in ckpt[key]):
            return f"has '{key}' that are not all numbers"
    per_channel = [shape[0], *[1] * (len(shape) - 1)]  # normalize: channel
    for key in ("normalization", "target_normalization"):
        if (stats := ckpt.get(key)) is None:
            continue
        mean, std = stats["mean"], stats["std"]
        if key == "normalization" and not (list(mean.shape) == list(std.shape) and list(mean.shape) in
                                           (shape, per_channel)):
            return (f"has a 'normalization' of shape {list(mean.shape)} (mean) and {list(std.shape)} (std), "
                    f"but the model's input is {shape}")
        if key == "target_normalization" and (mean.dim() > 1 or mean.shape != std.shape):
            return (f"has a 'target_normalization' of shape {list(mean.shape)} (mean) and {list(std.shape)} "
                    "(std); expected one number per output")
        if not (mean.is_floating_point() and std.is_floating_point() and bool(torch.isfinite(mean).all())
                and bool(torch.isfinite(std).all()) and bool((std > 0).all())):
            return f"has a '{key}' whose mean is not finite or whose std is not positive"
    if ckpt.get("ema_updates", 0) < 0:
        return f"has 'ema_updates': {ckpt['ema_updates']}, below 0"
    return None


@contextmanager
def fitting_its_config(path: Path) -> Iterator[None]:
    """Putting a checkpoint back into the run its own config builds: what does not fit (a file
    edited by hand, or written by another tool in nncli's format) is bad input naming the file."""
    try:
        yield
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as err:
        if is_out_of_memory(err):  # the machine's limit, not the file's fault
            raise
        detail = " ".join(line.strip() for line in str(err).strip().splitlines()[:2]) or type(err).__name__
        raise ConfigError(f"the checkpoint does not fit the run its own config describes ({detail}); "
                          "was it edited?", file=str(path)) from err


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A plain state_dict (torch.save(model.state_dict())), or the model of an nncli checkpoint."""
    obj = load_file(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise ConfigError("expected a state_dict (a mapping from parameter names to tensors)",
                          file=str(path))
    return strip_prefixes(obj)


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the `module.` (DataParallel, DDP) and `_orig_mod.` (torch.compile) prefixes."""
    out = {}
    for key, value in state.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


# --- random number generators ----------------------------------------------------------------

def capture_rng(gpus: list[torch.device]) -> dict:
    """Every global generator's state, as tensors and plain containers: the CPU's, and those of
    the GPUs the run draws from (`generator_devices`)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
    }
    if gpus:
        state["cuda"] = [torch.cuda.get_rng_state(gpu) for gpu in gpus]
    return state


def restore_rng(state: dict, gpus: list[torch.device]) -> None:
    """Put back what `capture_rng` saved, the GPU generators in the order of `gpus`."""
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["key"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["gauss"]))
    for gpu, gpu_state in zip(gpus, state.get("cuda", [])):
        torch.cuda.set_rng_state(gpu_state, gpu)


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
