"""The schema of every config section: its keys, their types, defaults and checks. Torch-free,
and it imports no stage of the pipeline: every stage reads its section's keys from here.

Sections whose keys depend on a chosen type (a layer's arguments, a loss's, an optimizer's, a
scheduler's) are checked against that type's constructor when it is built.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Collection

from nncli.errors import TYPE_NOUNS, did_you_mean

REQUIRED = object()
NUMBER = (int, float)


@dataclass(frozen=True)
class Key:
    """One key of a fixed section: the accepted types, the default, an optional extra check."""

    types: tuple
    default: Any = None
    check: Callable[[Any], str | None] | None = None  # returns what is wrong, or None
    schema: dict | None = None  # for a nested mapping
    hint: Callable[[Any], str | None] | None = None  # a hint for a wrong value (else 'did you mean')

    def describe(self) -> str:
        return " or ".join(dict.fromkeys(TYPE_NOUNS[t][0] if t in TYPE_NOUNS else t.__name__
                                         for t in self.types))


def positive(value: Any) -> str | None:
    return None if value is None or value > 0 else "must be greater than 0"


def non_negative(value: Any) -> str | None:
    return None if value is None or value >= 0 else "must be 0 or more"


def sample_shape(value: Any) -> str | None:
    """One sample's shape: a non-empty list of positive integers."""
    if value and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value):
        return None
    return "must be one sample's shape, a list of positive integers (e.g. [3, 32, 32])"


def one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value is None or value in choices:
            return None
        return f"must be one of {', '.join(choices)}"
    check.choices = choices  # for a 'did you mean' hint
    return check


def compile_mode(value: Any) -> str | None:
    """`compile:` is true/false or one of torch.compile's modes."""
    return None if isinstance(value, bool) else _COMPILE_MODES(value)


_COMPILE_MODES = one_of("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
compile_mode.choices = _COMPILE_MODES.choices


def compile_hint(value: Any) -> str | None:
    """compile: 'true' is a string; true and false turn compile on and off."""
    if str(value).lower() in ("true", "false"):
        return f"Write true or false without quotes: '{value}' in quotes is a string, not a boolean."
    return did_you_mean(str(value), _COMPILE_MODES.choices) or "compile also takes true or false."


_AMP = one_of("off", "bf16", "fp16")


def amp_hint(value: Any) -> str | None:
    """amp is a precision, not a switch: true means bf16 or fp16, false means off."""
    text = str(value).lower()
    if text in ("true", "yes", "on"):
        return f"amp: {text} is not a precision: use bf16 (or fp16 on older GPUs)."
    if text in ("false", "no", "none", "fp32", "float32"):
        return "Did you mean 'off'?"
    return did_you_mean(text, _AMP.choices)


DEVICES = "auto, cpu, cuda, cuda:N or mps"
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:(0|[1-9][0-9]*))?")
MAX_GPU_INDEX = 127  # torch keeps a device index in 8 bits: cuda:128 would wrap round to cuda:-128


def device_name(value: Any) -> str | None:
    """The syntax of `device:` and `--device`; whether the device is there is checked when
    training starts (devices.resolve_device)."""
    if not _DEVICE.fullmatch(value):
        return f"must be {DEVICES}"
    return "must be a GPU index that torch can take" if _gpu_index_too_large(value) else None


def _gpu_index_too_large(value: str) -> bool:
    kind, _, index = value.partition(":")
    return kind == "cuda" and _is_index(index) and int(index) > MAX_GPU_INDEX


def device_hint(value: Any) -> str | None:
    """A fix for a malformed device: case slips, `gpu` for cuda, an index that cpu or mps cannot take."""
    text = str(value).strip().lower()
    if not text:
        return "Use auto to pick CUDA, else MPS, else the CPU."
    if _gpu_index_too_large(text):
        return f"torch numbers GPUs from 0 to {MAX_GPU_INDEX}; nvidia-smi lists this machine's."
    if _is_index(text):
        return f"Did you mean 'cuda:{int(text)}'?"
    kind, colon, index = text.partition(":")
    kind = "cuda" if kind == "gpu" else kind  # a GPU is what they mean
    if kind in ("auto", "cpu", "mps") and colon:
        return f"{kind} takes no index: use {kind}."
    if kind == "cuda" and colon and not _is_index(index):
        return "N in cuda:N is a GPU index (cuda:0, cuda:1, ...); cuda alone is the first GPU."
    fixed = f"{kind}:{int(index)}" if colon else kind
    if fixed != value and _DEVICE.fullmatch(fixed):
        return f"Did you mean '{fixed}'?"
    return did_you_mean(kind, ("auto", "cpu", "cuda", "mps"))


def _is_index(text: str) -> bool:
    return text.isascii() and text.isdigit()


def fraction(value: Any) -> str | None:
    return None if value is None or 0 < value < 1 else "must lie strictly between 0 and 1"


# What a config's `loggers:` may name (nncli.report.loggers.LOGGERS opens each). metrics.csv is
# the run's own record, read back on resume and by `nncli plot`, so csv is always one of them.
LOGGER_NAMES = ("csv", "tensorboard", "jsonl")


def logger_names(value: list) -> str | None:
    unknown = [name for name in value if name not in LOGGER_NAMES]
    if unknown:
        return f"has {unknown[0]!r}; the loggers are {', '.join(LOGGER_NAMES)}"
    if len(set(value)) < len(value):
        return "names a logger twice"
    if "csv" not in value:
        return "must include csv (metrics.csv is the run's record: resume reads it back)"
    return None


def loggers_hint(value: Any) -> str | None:
    if not isinstance(value, list):
        return "e.g. loggers: [csv, tensorboard]"
    unknown = next((str(name) for name in value if name not in LOGGER_NAMES), None)
    return did_you_mean(unknown, LOGGER_NAMES) if unknown else "e.g. loggers: [csv, tensorboard]"


EARLY_STOP = {
    "metric": Key((str,), "val_loss"),
    "patience": Key((int,), 5, positive),
    "mode": Key((str,), "auto", one_of("auto", "min", "max")),
    "min_delta": Key(NUMBER, 0.0, non_negative),
}
EMA = {
    "decay": Key(NUMBER, 0.999, fraction),
    # TensorFlow's ExponentialMovingAverage(num_updates): min(decay, (1 + t) / (10 + t)) at update t,
    # so that a short run's average is not mostly its initial weights
    "warmup": Key((bool,), True),
}
TRAIN = {
    "epochs": Key((int,), 10, positive),
    "batch_size": Key((int,), 64, positive),
    "eval_batch_size": Key((int, type(None)), None, positive),  # validation's; null: max(batch_size, 1024)
    "grad_clip": Key(NUMBER + (type(None),), None, positive),
    "accumulate": Key((int,), 1, positive),
    "early_stop": Key((dict, type(None)), None, schema=EARLY_STOP),
    "shuffle": Key((bool,), True),
    "drop_last": Key((bool,), False),
    "log_every": Key((int,), 1, positive),  # print a line every N epochs (without a terminal)
    "log_every_steps": Key((int, type(None)), None, positive),  # per-step scalars for the tensorboard logger
    "ema": Key((dict, type(None)), None, schema=EMA),  # an exponential moving average of the weights
}
CHECKPOINT = {
    "dir": Key((str,), "checkpoints"),
    "every": Key((int,), 1, positive),
    "every_steps": Key((int, type(None)), None, positive),
    "keep_last": Key((int,), 0, non_negative),
}
TOP = {
    "name": Key((str, type(None)), None),
    "seed": Key((int,), 0, lambda v: None if 0 <= v < 2**32
                else "must be from 0 to 2**32 - 1 (NumPy takes no other seed)"),
    "plugins": Key((list,), []),
    "model": Key((dict,), REQUIRED),
    "data": Key((dict, type(None)), None),
    "loss": Key((str, dict), "CrossEntropyLoss"),
    "metrics": Key((list, type(None)), None),
    "optimizer": Key((str, dict), {"type": "Adam", "lr": 1e-3}),
    "schedule": Key((str, dict, type(None)), None),
    "train": Key((dict,), {}, schema=TRAIN),
    "checkpoint": Key((dict,), {}, schema=CHECKPOINT),
    "loggers": Key((list,), ["csv"], logger_names, hint=loggers_hint),
    "device": Key((str,), "auto", device_name, hint=device_hint),
    "parallel": Key((str,), "none", one_of("none", "dp", "ddp")),
    "device_ids": Key((list, type(None)), None),  # items: check_device_ids
    "amp": Key((str,), "off", _AMP, hint=amp_hint),
    "compile": Key((bool, str), False, compile_mode, hint=compile_hint),
    "channels_last": Key((bool,), False),
    "deterministic": Key((bool,), False),
}
# Keys a config file may have beside TOP's, which reading it resolves: `base:` files are merged
# under it (nncli.config.bases), and the resolved config no longer has the key.
FILE_KEYS = {"base": Key((str, list), None)}
MODEL = {
    "input_shape": Key((list, type(None)), None),
    "input_dtype": Key((str,), "float32", one_of("float32", "float64", "int64")),  # int64: token ids
    "layers": Key((list, dict), REQUIRED),
}

# --- the data section ------------------------------------------------------------------------

# How batches are read (the data section's keys, in either layout).
LOADER_KEYS = {
    "loader": Key((str,), "memory", one_of("memory", "dataloader")),
    "workers": Key((int,), 0, non_negative),
}


def normalize_mode(value: Any) -> str | None:
    """`normalize:` is true (per feature), false, or channel (per channel of images)."""
    return None if isinstance(value, bool) or value == "channel" else "must be true, false or channel"


def normalize_hint(value: Any) -> str | None:
    if str(value).lower() in ("true", "false"):
        return f"Write {str(value).lower()} without quotes: '{value}' in quotes is a string, not a boolean."
    return did_you_mean(str(value), ("channel",)) or "true: per feature; channel: per channel of images."


def class_names(value: Any) -> str | None:
    """`class_names:` names the classes in the order of their indices: distinct strings."""
    if value is None:
        return None
    if not value or not all(isinstance(name, str) and name for name in value):
        return "must be a list of class names (non-empty strings)"
    twice = next((name for i, name in enumerate(value) if name in value[:i]), None)
    return f"names '{twice}' twice" if twice is not None else None


# How the samples become what the model trains on (either layout): normalization, targets'
# standardization, augmentation, the names of the classes.
SAMPLE_KEYS = {
    "normalize": Key((bool, str), False, normalize_mode, hint=normalize_hint),
    "normalize_target": Key((bool,), False),  # regression: standardized targets, results in their units
    "augment": Key((list, type(None)), None),  # transforms of training batches: data.augment.TRANSFORMS
    # the class names, index by index: given, or recorded (sorted) from word labels or folder names
    "class_names": Key((list, type(None)), None, class_names),
}
# Keys of the data section itself; the rest belong to its source.
DATA_KEYS = {
    "val_split": Key(NUMBER, 0.2, lambda v: None if v == 0 else fraction(v)),  # default: the source's
    **SAMPLE_KEYS,
    **LOADER_KEYS,
}
# The layout with a source of its own for each set: data: {train: {source: ...}, val: {source: ...}}
PAIR_KEYS = {"train": Key((dict,), None), "val": Key((dict, type(None)), None), **SAMPLE_KEYS, **LOADER_KEYS}


def one_delimiter(value: str) -> str | None:
    """A CSV delimiter is one character, not the quote or a line break (csv.reader's rules)."""
    if len(value) != 1:
        return "must be one character"
    return "cannot be a quote or a line break" if value in "\"\r\n" else None


def delimiter_hint(value: str) -> str:
    return "For example delimiter: ';' (a tab: delimiter: \"\\t\")."


IMAGE_MODES = ("RGB", "L")  # Pillow's names: 3 channels, 1 channel


def image_size(value: Any) -> str | None:
    """`size:` is one positive integer (a square) or [height, width]."""
    sizes = value if isinstance(value, list) else [value]
    if value is None or (len(sizes) in (1, 2) and all(isinstance(v, int) and not isinstance(v, bool)
                                                       and v > 0 for v in sizes)):
        return None
    return "must be a positive integer or [height, width]"


@dataclass(frozen=True)
class SourceSchema:
    """What a data source (`source: NAME`) takes: its keys, which of them are paths to read, and
    the validation split it gets when the config gives no `val_split:`. nncli.data.sources reads
    the data."""

    keys: dict[str, Key]
    paths: tuple[str, ...] = ()
    default_split: float = 0.2


SOURCES = {
    "digits": SourceSchema({}),
    # inline data is a handful of samples, too few to give some of them up to validation unasked
    "tensors": SourceSchema({"x": Key((list,), REQUIRED), "y": Key((list,), REQUIRED)}, default_split=0),
    "csv": SourceSchema({"path": Key((str,), REQUIRED), "target": Key((str, list), REQUIRED),
                         "features": Key((list, type(None)), None),
                         "delimiter": Key((str,), ",", one_delimiter, hint=delimiter_hint)}, paths=("path",)),
    "npz": SourceSchema({"path": Key((str,), REQUIRED), "x": Key((str,), "x"), "y": Key((str,), "y")},
                        paths=("path",)),
    "npy": SourceSchema({"x": Key((str,), REQUIRED), "y": Key((str,), REQUIRED), "mmap": Key((bool,), False)},
                        paths=("x", "y")),
    "synthetic": SourceSchema({
        "kind": Key((str,), "classification", one_of("classification", "regression", "images")),
        "n": Key((int,), 1000, positive), "features": Key((int,), 16, positive),
        "classes": Key((int,), 2, positive), "noise": Key(NUMBER, 0.5),
        "shape": Key((list,), [3, 32, 32], sample_shape)}),
    "images": SourceSchema({"root": Key((str,), REQUIRED),  # root/<class>/<image files>
                            "size": Key((int, list, type(None)), None, image_size),
                            "mode": Key((str,), "RGB", one_of(*IMAGE_MODES)),
                            "cache": Key((bool,), False)}, paths=("root",)),
    "torchvision": SourceSchema({"name": Key((str,), REQUIRED), "root": Key((str,), "data"),
                                 "download": Key((bool,), False), "train": Key((bool,), True)},
                                paths=("root",)),
}


# --- the schedule's own keys (the rest are its scheduler's arguments) ------------------------------

WARMUP = {"epochs": Key((int,), None, non_negative), "steps": Key((int,), None, non_negative),  # 0: none
          "start_factor": Key((int, float), 0.01, lambda v: None if 0 < v <= 1 else "must lie in (0, 1]")}
SCHEDULE_KEYS = {"interval": Key((str,), "epoch", one_of("epoch", "step")),
                 "warmup": Key((dict, type(None)), None, schema=WARMUP),
                 "monitor": Key((str, type(None)), None)}  # ReduceLROnPlateau's metric

# The keys of each section, to tell a user who put a key in the wrong one where it goes
# (`epochs:` at the top level belongs under train:).
SECTION_KEYS: dict[str, Collection[str]] = {
    "": TOP, "train": TRAIN, "train.early_stop": EARLY_STOP, "checkpoint": CHECKPOINT, "model": MODEL,
    "optimizer": ("lr", "momentum", "weight_decay", "betas", "groups", "fused"), "data": DATA_KEYS,
}


def home_of(key: str, where: tuple) -> str | None:
    """The section ("" for the top level) that has `key`, unknown at `where`; None when none has."""
    here = ".".join(str(part) for part in where)
    return next((name for name, keys in SECTION_KEYS.items() if key in keys and name != here), None)


def home_hint(key: str, where: tuple) -> str | None:
    """'epochs belongs under train' for a key in the wrong section, or None."""
    home = home_of(key, where)
    if home is None:
        return None
    if home == "":
        return f"'{key}' is a top-level key: move it out of {'.'.join(map(str, where))}: to the top of " \
               "the file, unindented."
    section = f"the top-level {home}:" if where else f"{home}:"  # data.train.batch_size: not data's train
    return f"'{key}' belongs under {section} move it there."


def is_pair(section: dict | None) -> bool:
    """Whether a data section has a source of its own for each set (`train:` and `val:`), rather
    than one source and a split (whose own keys may include a `train:` flag: torchvision's)."""
    return isinstance(section, dict) and isinstance(section.get("train"), dict)


def has_validation(section: dict | None) -> bool:
    """Whether a (checked) data section gives validation data: a val: source, or a val_split above 0."""
    section = section or {}
    return bool(section.get("val")) if is_pair(section) else section.get("val_split", 0.2) != 0
