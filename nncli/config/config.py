"""A checked config: `Config`, and reading one from a file or a mapping.

`read_config(path)` returns a `Config`: `config.values` is the config with every default filled
in, and `config.error(message, *keys)` builds a ConfigError that names the file and the line of
that key. Sections whose keys depend on a chosen type (a layer's arguments, an optimizer's) are
checked by the stage that builds them, through `config.error`.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from nncli.config.bases import read_with_bases
from nncli.config.overrides import apply_overrides
from nncli.config.schema import (
    DATA_KEYS,
    LOADER_KEYS,
    MODEL,
    PAIR_KEYS,
    REQUIRED,
    SOURCES,
    TOP,
    Key,
    home_hint,
    is_pair,
    sample_shape,
)
from nncli.config.yamlio import YamlMap, line_of, parse_yaml, to_plain
from nncli.errors import ConfigError, did_you_mean, value_kind
from nncli.plugins import load_plugins


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
                             hint="If it is your data, add --trust-data "
                                  f"{shown_path(resolved if resolved.is_dir() else resolved.parent)}.")
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
                        hint=spec.hint(value) if spec.hint else _integer_hint(value, spec.types))
        if spec.check is not None and (problem := spec.check(value)):
            choices = getattr(spec.check, "choices", None)
            hint = spec.hint(value) if spec.hint else did_you_mean(str(value), choices) if choices else None
            raise error(f"{problem}, got {value!r}", *where, key, hint=hint)
        if spec.schema is not None and isinstance(value, dict):
            value = check_section(value, spec.schema, error, *where, key)
        out[key] = value
    return out


def _integer_hint(value: Any, types: tuple) -> str | None:
    """`1e3` reads as a float: say the integer it means, where one is expected."""
    if int in types and isinstance(value, float) and value.is_integer():
        return f"Write it as an integer: {int(value)}."
    return None


def _is_a(value: Any, types: tuple) -> bool:
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and int not in types and float in types:
        return True
    return isinstance(value, types)


# Unicode categories a run directory's name must not hold: control characters, and the invisible
# ones that make a name print as another (U+202E turns the rest of a line around)
INVISIBLE = ("Cc", "Cf", "Zl", "Zp")


def config_from_mapping(raw: Any, *, path: Path | None = None, label: str | None = None,
                        overrides: list[str] = (), base_dir: Path | None = None,
                        plugins_given: list[str] | None = None,
                        trusted_data: list[Path] | None = None) -> Config:
    """Check a parsed config and fill in its defaults (the work of `read_config`). Errors name
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
    if (not name or any(ch in name for ch in "/\\") or name in (".", "..") or len(name.encode()) > 240
            or any(unicodedata.category(ch) in INVISIBLE for ch in name)):
        raise config.error(f"{name!r} cannot name a run directory; use a name of up to 240 bytes "
                           "(letters, digits, '-', '_', '.') without slashes or control characters", "name")
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
    if shape is not None and sample_shape(shape) is not None:
        raise config.error(f"expected a list of positive integers (one sample's shape, no batch "
                           f"dimension), got {to_plain(shape)}", "model", "input_shape")
    config.values = values
    check_data_section(config)
    return config


def check_data_section(config: Config) -> None:
    """The data section against its schema and its source's (schema.SOURCES), defaults filled
    in, so that `config["data"]` is what config.yaml records; nothing is read. Either one source
    (with `val_split:`; its default depends on the source) or `train:` and optional `val:` sources."""
    section = config["data"]
    if section is None:
        return
    if is_pair(section):
        options = check_section(section, PAIR_KEYS, config.error, "data")
        options["train"] = check_source(section["train"], config, ("data", "train"))
        if section.get("val"):
            options["val"] = check_source(section["val"], config, ("data", "val"))
    else:
        if "val" in section:
            raise config.error("val: needs train: beside it (or use val_split:)", "data", "val")
        options = check_section({k: v for k, v in section.items() if k in DATA_KEYS}, DATA_KEYS,
                                config.error, "data")
        own = check_source(section, config, ("data",), DATA_KEYS)
        options.update({k: v for k, v in own.items() if k not in DATA_KEYS})
        if "val_split" not in section:
            options["val_split"] = SOURCES[options["source"]].default_split
    if options["workers"] and options["loader"] == "memory":
        raise config.error(f"workers: {options['workers']} does nothing with loader: memory (the data "
                           "is indexed where it lies; no worker reads it)", "data", "workers",
                           hint="Add loader: dataloader to read batches in worker processes, or remove "
                                "workers (on the command line: --set data.workers=0).")
    config.values["data"] = options


def check_source(options: Any, config: Config, where: tuple,
                 section_keys: dict[str, Key] | None = None) -> dict:
    """One source mapping (`source:` and that source's keys, and `section_keys` where the source
    shares its mapping with the data section's own keys), checked, its defaults filled in."""
    if not isinstance(options, dict) or not options.get("source"):
        raise config.error(f"needs 'source:', one of: {', '.join(SOURCES)}", *where)
    name = options["source"]
    if not isinstance(name, str):
        raise config.error(f"expected a data source name, got {value_kind(name)}", *where, "source")
    if name not in SOURCES:
        raise config.error(f"unknown data source '{name}'", *where, "source",
                           hint=did_you_mean(name, SOURCES))
    keys = SOURCES[name].keys
    if where != ("data",):  # a source under train: or val:, where the loader keys do not go
        for key in LOADER_KEYS:
            if key in options:
                raise config.error("belongs to the data section itself, beside train: and val: (it applies "
                                   "to both)", *where, key,
                                   hint=f"Move it up: data: {{{key}: ..., train: {{...}}}}.")
    for key in options:  # a key of another source (mmap on a csv): say whose it is
        owners = [other for other, schema in SOURCES.items() if key in schema.keys and key not in keys]
        if owners and key != "source" and key not in (section_keys or {}):
            own = f"its keys: {', '.join(keys)}" if keys else "it takes no keys"
            raise config.error(f"source {name} has no key '{key}' ({own}); {key} belongs to "
                               f"the {', '.join(owners)} source{'s' if len(owners) > 1 else ''}", *where, key)
    # every key the mapping takes, so that a misspelt one is told the closest of them all
    return check_section(options, {"source": Key((str,)), **keys, **(section_keys or {})}, config.error,
                         *where)


def data_paths(config: Config) -> list[Path]:
    """The files and folders the data section's sources read, located but not read."""
    section = config["data"] or {}
    sources = [section.get("train"), section.get("val")] if is_pair(section) else [section]
    return [config.locate(options[key]) for options in sources if options
            for key in SOURCES[options["source"]].paths if isinstance(options.get(key), str)]


def check_plugins_given(config: Config, needed: list[str], given: list[str]) -> None:
    """Every plugin a checkpoint's config names is among those the user gave with --plugin: the
    same file name (the user's file is imported, wherever it lies) or the same module."""
    given_files = {Path(plugin).name for plugin in given if plugin.endswith(".py")}
    missing = [plugin for plugin in needed
               if (Path(plugin).name not in given_files if plugin.endswith(".py") else plugin not in given)]
    if missing:
        options = " ".join(f"--plugin {shown_path(config.locate(p)) if p.endswith('.py') else p}"
                           for p in missing)
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


def read_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read and check a config file: its `base:` files merged under it, its structure, every
    section whose keys are fixed, defaults filled in, its plugins imported. `overrides` are
    `--set KEY=VALUE` strings, applied last. What depends on a registry (the default metrics for
    the loss) is resolved by `nncli.load_config`."""
    path = Path(path)
    return config_from_mapping(read_with_bases(path), path=path, overrides=overrides)
