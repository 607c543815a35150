"""The config file: reading it, checking its structure, filling in defaults.

`load_config(path)` returns a `Config`: `config.values` is the resolved config (a dict with every
default filled in) and `config.error(message, *keys)` builds a ConfigError that names the file
and the line of that key. Sections whose keys depend on a chosen type (a layer's arguments, an
optimizer's, a data source's) are checked by the module that builds them, through `config.error`.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection

import yaml

from nncli.annotations import TYPE_NOUNS, value_kind
from nncli.errors import ConfigError, did_you_mean
from nncli.registry import load_plugins
from nncli.yamlio import YamlMap, line_of, parse_yaml, read_yaml, to_plain

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
        return " or ".join(dict.fromkeys(TYPE_NOUNS[t][0] if t in TYPE_NOUNS else t.__name__ for t in self.types))


def positive(value: Any) -> str | None:
    return None if value is None or value > 0 else "must be greater than 0"


def non_negative(value: Any) -> str | None:
    return None if value is None or value >= 0 else "must be 0 or more"


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


EARLY_STOP = {
    "metric": Key((str,), "val_loss"),
    "patience": Key((int,), 5, positive),
    "mode": Key((str,), "auto", one_of("auto", "min", "max")),
    "min_delta": Key(NUMBER, 0.0, non_negative),
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
}
CHECKPOINT = {
    "dir": Key((str,), "checkpoints"),
    "every": Key((int,), 1, positive),
    "every_steps": Key((int, type(None)), None, positive),
    "keep_last": Key((int,), 0, non_negative),
}
TOP = {
    "name": Key((str, type(None)), None),
    "seed": Key((int,), 0, lambda v: None if 0 <= v < 2**32 else "must be from 0 to 2**32 - 1 (NumPy takes no other seed)"),
    "plugins": Key((list,), []),
    "model": Key((dict,), REQUIRED),
    "data": Key((dict, type(None)), None),
    "loss": Key((str, dict), "CrossEntropyLoss"),
    "metrics": Key((list, type(None)), None),
    "optimizer": Key((str, dict), {"type": "Adam", "lr": 1e-3}),
    "schedule": Key((str, dict, type(None)), None),
    "train": Key((dict,), {}, schema=TRAIN),
    "checkpoint": Key((dict,), {}, schema=CHECKPOINT),
    "device": Key((str,), "auto", device_name, hint=device_hint),
    "parallel": Key((str,), "none", one_of("none", "dp", "ddp")),
    "device_ids": Key((list, type(None)), None),  # items: check_device_ids
    "amp": Key((str,), "off", _AMP, hint=amp_hint),
    "compile": Key((bool, str), False, compile_mode, hint=compile_hint),
    "channels_last": Key((bool,), False),
    "deterministic": Key((bool,), False),
}
MODEL = {
    "input_shape": Key((list, type(None)), None),
    "input_dtype": Key((str,), "float32", one_of("float32", "float64", "int64")),  # int64: token ids
    "layers": Key((list, dict), REQUIRED),
}
# The keys of each section, to tell a user who put a key in the wrong one where it goes
# (`epochs:` at the top level belongs under train:). data.py adds the data section's keys.
SECTION_KEYS: dict[str, Collection[str]] = {
    "": TOP, "train": TRAIN, "train.early_stop": EARLY_STOP, "checkpoint": CHECKPOINT, "model": MODEL,
    "optimizer": ("lr", "momentum", "weight_decay", "betas", "groups", "fused"),
}


def home_of(key: str, where: tuple) -> str | None:
    """The section ("" for the top level) that has `key`, unknown at `where`; None when none has."""
    importlib.import_module("nncli.data")  # adds the data section's keys (on this error path only)
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


@dataclass
class Config:
    """A checked config: `values` has every default filled in; `raw` keeps the lines for errors.

    A checkpoint's stored config is data, not the user's word: it imports nothing (its plugins are
    given on the command line) and reads only the paths inside `trusted_data` (None: any path, for
    a config file the user gave)."""

    values: dict
    raw: YamlMap
    path: Path | None = None
    base_dir: Path = field(default_factory=Path.cwd)
    trusted_data: list[Path] | None = None
    imported_plugins: list[str] = field(default_factory=list)  # resolved files, or module names
    label: str | None = None  # what errors name when the config is no file of its own

    @property
    def source(self) -> str:
        return self.label or (str(self.path) if self.path else "<config>")

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def line(self, *keys: Any) -> int | None:
        """The line of the deepest key of `keys` that the file has (a default has none)."""
        node, line = self.raw, getattr(self.raw, "line", None)
        for key in keys:
            found = line_of(node, key)
            if found is None or not _has(node, key):
                break
            node, line = node[key], found
        return line

    def error(self, message: str, *keys: Any, hint: str | None = None) -> ConfigError:
        """A ConfigError at the dotted key path `keys` (e.g. "optimizer", "groups", 0, "lr");
        a value that came from `--set` is blamed on it rather than on a line of the file."""
        dotted = ".".join(str(k) for k in keys)
        for key in getattr(self.raw, "overridden", ()):
            if dotted == key or dotted.startswith(key + "."):
                return ConfigError(message, file=f"--set {key}", key=None if dotted == key else dotted,
                                   hint=hint)
        hint = " ".join(filter(None, (hint, self.set_note(dotted)))) or None if dotted else hint
        return ConfigError(message, file=self.source, line=self.line(*keys), key=dotted or None, hint=hint)

    def set_note(self, prefix: str) -> str | None:
        """"(--set changed optimizer.lr.)" when --set changed a value under `prefix`: an error
        about the whole section (an optimizer that cannot be built) names the file's line, but
        the value came from the command line."""
        changed = [key for key in getattr(self.raw, "overridden", ()) if key.startswith(prefix + ".")]
        return f"(--set changed {', '.join(changed)}.)" if changed else None

    def locate(self, path: str) -> Path:
        """A path from the config, relative to the config file's folder; nothing is read."""
        return (self.base_dir / Path(path).expanduser()).resolve()

    def resolve_path(self, path: str, *keys: Any) -> Path:
        """A path from the config (at the key path `keys`) that is about to be read: one that a
        checkpoint stored is refused unless it lies inside a path the user trusts."""
        resolved = self.locate(path)
        if self.trusted_data is not None and not any(
                resolved == place or place in resolved.parents for place in self.trusted_data):
            raise self.error(f"the checkpoint names {resolved}, and nncli reads no path that a checkpoint "
                             "names unless you name it on the command line", *keys,
                             hint=f"If it is your data, add --trust-data {shown_path(resolved.parent)}.")
        return resolved


def shown_path(path: Path) -> str:
    """A path as a command line would give it: relative to the current folder when inside it."""
    try:
        return str(path.relative_to(Path.cwd())) or "."
    except ValueError:
        return str(path)


def _has(node: Any, key: Any) -> bool:
    if isinstance(node, dict):
        return key in node
    return isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node)


def check_section(mapping: dict, schema: dict[str, Key], error: Callable[..., ConfigError],
                  *where: Any) -> dict:
    """Check `mapping` against `schema` (unknown keys, types, checks); return it with defaults."""
    if not isinstance(mapping, dict):
        raise error(f"expected a mapping (key: value), got {value_kind(mapping)}", *where)
    for key in mapping:
        if key not in schema:
            hint = home_hint(str(key), where) or did_you_mean(str(key), schema)
            raise error(f"unknown key; expected one of: {', '.join(schema)}", *where, key, hint=hint)
    out = {}
    for key, spec in schema.items():
        if key not in mapping:
            if spec.default is REQUIRED:
                raise error(f"missing required key '{key}'", *where)
            out[key] = to_plain(spec.default)
            if spec.schema is not None and isinstance(out[key], dict):
                out[key] = check_section(out[key], spec.schema, error, *where, key)
            continue
        value = mapping[key]
        if not _is_a(value, spec.types):
            shown = "" if value is None or isinstance(value, (dict, list)) else f" {value!r}"
            raise error(f"expected {spec.describe()}, got {value_kind(value)}{shown}", *where, key,
                        hint=spec.hint(value) if spec.hint else None)
        if spec.check is not None and (problem := spec.check(value)):
            choices = getattr(spec.check, "choices", None)
            hint = spec.hint(value) if spec.hint else did_you_mean(str(value), choices) if choices else None
            raise error(f"{problem}, got {value!r}", *where, key, hint=hint)
        if spec.schema is not None and isinstance(value, dict):
            value = check_section(value, spec.schema, error, *where, key)
        out[key] = value
    return out


def _is_a(value: Any, types: tuple) -> bool:
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and int not in types and float in types:
        return True
    return isinstance(value, types)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`--set train.epochs=3` -> (["train", "epochs"], 3); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"'{text}' is not KEY=VALUE (e.g. --set train.epochs=3)", key="--set")
    key, value = text.split("=", 1)
    if not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"'{text}': the key before '=' must be a dotted path like optimizer.lr",
                          key="--set")
    return key.strip().split("."), parse_yaml(value, f"--set {key}")


def apply_overrides(raw: YamlMap, overrides: list[str], source: str) -> None:
    """Apply `--set` overrides to the raw tree; a key path that the file cannot have is an error."""
    for text in overrides:
        path, value = parse_override(text)
        node: Any = raw
        for depth, part in enumerate(path):
            where = ".".join(path[:depth]) or "the config"
            last = depth == len(path) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"'{text}': {where} is a list of {len(node)}; use an index "
                                      f"from 0 to {len(node) - 1}", file="--set")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"'{text}': {where} is not a mapping, so it has no key '{part}'",
                                  file="--set")
            schema = _schema_at(path[:depth])
            if schema is not None and part not in schema:
                home = home_of(part, tuple(path[:depth]))
                hint = did_you_mean(part, schema) if home is None else \
                    f"Did you mean --set {'.'.join(filter(None, (home, *path[depth:])))}={text.split('=', 1)[1]}?"
                raise ConfigError(f"unknown key '{'.'.join(path[:depth + 1])}' in '{text}'; expected "
                                  f"one of: {', '.join(schema)}", file="--set", hint=hint)
            if path[:2] == ["model", "layers"] and depth >= 2 and part not in node:
                names = [str(k) for k in node]
                raise ConfigError(f"'{text}': {where} has no key '{part}' (it has: {', '.join(names)})",
                                  file="--set", hint=did_you_mean(part, names))
            if last:
                node[part] = value
            else:
                if node.get(part) is None:  # start from the section's default, if it has one
                    default = schema[part].default if schema is not None and part in schema else None
                    node[part] = parse_yaml(yaml.safe_dump(default), "--set") \
                        if isinstance(default, dict) and default else YamlMap()
                node = node[part]
        raw.overridden = [*getattr(raw, "overridden", []), ".".join(path)]


def _schema_at(path: list[str]) -> dict | None:
    """The fixed schema for the mapping at `path`, or None when its keys are open (e.g. optimizer)."""
    schema: dict | None = TOP
    for part in path:
        spec = schema.get(part) if schema else None
        schema = spec.schema if spec is not None else None
    return schema


def config_from_mapping(raw: Any, *, path: Path | None = None, label: str | None = None,
                        overrides: list[str] = (), base_dir: Path | None = None,
                        plugins_given: list[str] | None = None, trusted_data: list[Path] | None = None) -> Config:
    """Check a parsed config and fill in its defaults (the work of `load_config`). Errors name
    `path`, or `label` for a config that is no file of its own.

    For a config from a checkpoint, `plugins_given` are the plugins the user imported on the command
    line (`load_plugins`' result), which must include every plugin the config names: the config's
    own are never imported. `trusted_data`: see Config."""
    source = label or (str(path) if path else "<config>")
    if raw is None:
        raise ConfigError("the file is empty; expected a mapping with at least a 'model' section",
                          file=source)
    if not isinstance(raw, dict):
        raise ConfigError(f"the top level must be a mapping (key: value lines), got {value_kind(raw)}",
                          file=source, line=getattr(raw, "line", None))
    if not isinstance(raw, YamlMap):
        # the same dump as a run's config.yaml, so error lines point into that file
        raw = parse_yaml(yaml.safe_dump(to_plain(raw), sort_keys=False), source)
    apply_overrides(raw, list(overrides), source)
    config = Config(values={}, raw=raw, path=path, label=label, trusted_data=trusted_data,
                    base_dir=base_dir or (path.resolve().parent if path else Path.cwd()))
    values = check_section(raw, TOP, config.error)
    values["model"] = check_section(raw["model"], MODEL, config.error, "model")
    if isinstance(values["optimizer"], dict) and "type" not in values["optimizer"]:
        values["optimizer"] = {"type": "Adam", **values["optimizer"]}  # the default optimizer's type
    if values["name"] is None:
        values["name"] = path.stem if path else "run"
    name = values["name"]
    if not name or any(ch in name for ch in "/\\\0") or name in (".", "..") or len(name.encode()) > 240:
        raise config.error(f"'{name}' cannot name a run directory; use a name of up to 240 bytes "
                           "(letters, digits, '-', '_', '.') without slashes", "name")
    for i, plugin in enumerate(values["plugins"]):
        if not isinstance(plugin, str):
            raise config.error(f"expected a Python file or module name, got {plugin!r}", "plugins", i)
    if plugins_given is None:  # before any name is looked up
        config.imported_plugins = load_plugins(values["plugins"], config.base_dir, config.error)
    else:
        check_plugins_given(config, values["plugins"], plugins_given)
        config.imported_plugins = plugins_given
    check_device_ids(config, values["device_ids"])
    shape = values["model"]["input_shape"]
    if shape is not None and not (shape and all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                                for d in shape)):
        raise config.error(f"expected a list of positive integers (one sample's shape, no batch "
                           f"dimension), got {to_plain(shape)}", "model", "input_shape")
    config.values = values
    if values["metrics"] is None:
        from nncli.optim import CLASS_INDEX_LOSSES, loss_name  # imports torch, as every use of a config does

        values["metrics"] = ["accuracy"] if loss_name(config) in CLASS_INDEX_LOSSES else []
    return config


def check_plugins_given(config: Config, needed: list[str], given: list[str]) -> None:
    """Every plugin a checkpoint's config names is among those the user gave with --plugin: the
    same file name (the user's file is imported, wherever it lies) or the same module."""
    given_files = {Path(plugin).name for plugin in given if plugin.endswith(".py")}
    missing = [plugin for plugin in needed
               if (Path(plugin).name not in given_files if plugin.endswith(".py") else plugin not in given)]
    if missing:
        options = " ".join(f"--plugin {shown_path(config.locate(p)) if p.endswith('.py') else p}" for p in missing)
        raise config.error(f"the run's model needs the plugin{'s' if len(missing) > 1 else ''} "
                           f"{', '.join(missing)}, and nncli imports no code that a checkpoint names",
                           "plugins", hint=f"Give each plugin you trust on the command line: {options} "
                                           "(where the run was trained, they were those files).")


def check_device_ids(config: Config, ids: list | None) -> None:
    """`device_ids:` (for parallel: dp) is null for every visible GPU, or a list of distinct GPU
    indices; whether those GPUs are there is checked when training starts (devices.wrap_model)."""
    if ids is not None and not ids:
        raise config.error("expected a non-empty list of GPU indices, got []", "device_ids",
                           hint="Leave device_ids out to use every visible GPU.")
    for i, gpu in enumerate(ids or ()):
        if isinstance(gpu, bool) or not isinstance(gpu, int) or gpu < 0:
            raise config.error(f"expected a GPU index (an integer, 0 or more), got {to_plain(gpu)!r}",
                               "device_ids", i)
        if gpu in ids[:i]:
            raise config.error(f"GPU {gpu} is listed twice; list each GPU once", "device_ids", i)


def with_epochs(overrides: list[str], epochs: int | None) -> list[str]:
    """`--set` overrides, and `--epochs N` as one more: `train.epochs=N`."""
    return [*overrides, *([f"train.epochs={epochs}"] if epochs else [])]


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read and check a config file. `overrides` are `--set KEY=VALUE` strings."""
    path = Path(path)
    return config_from_mapping(read_yaml(path), path=path, overrides=overrides)
