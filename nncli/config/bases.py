"""`base:` config inheritance: a config names one base file or a list of them (relative to its own
folder), and is read as those files deep-merged under it.

- Mappings merge key by key, at every depth; the child's value wins, and among several bases a
  later one wins over an earlier one. Anything else (a list, a number, null) replaces the base's
  value whole: `layers:` as a list is replaced, not appended to; `schedule: null` removes one.
- Every value keeps the file and line where it was written (yamlio.FileLine), so an error about
  a value from a base names the base's line, one about the child's the child's.
- A path that a base file gives (a data source's file, a plugin file) is relative to the base's
  folder, as it was written; it is rewritten relative to the child's, the folder the resolved
  config's paths are relative to.

`--set` applies after the merge (nncli.config.overrides); the run's config.yaml is the merged whole,
without `base:`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nncli.config.schema import SOURCES, is_pair
from nncli.config.yamlio import YamlList, YamlMap, mark_file, read_yaml
from nncli.errors import ConfigError, value_kind


def read_with_bases(path: Path, _chain: tuple[Path, ...] = ()) -> Any:
    """The YAML of the config file `path` with its `base:` files merged under it (recursively);
    the `base:` key itself is removed."""
    raw = read_yaml(path)
    if not isinstance(raw, YamlMap) or "base" not in raw:
        return raw
    line, spec = raw.line_of("base"), raw.pop("base")
    names = spec if isinstance(spec, list) else [spec]
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ConfigError(f"expected a config file or a list of them, got {value_kind(spec)}",
                          file=str(path), line=line, key="base", hint="e.g. base: common.yaml")
    merged = YamlMap()
    merged.line, merged.key_lines = raw.line, {}
    for i, name in enumerate(names):
        where = line if not isinstance(spec, list) else spec.line_of(i)
        base_path = (path.parent / Path(name).expanduser())
        chain = (*_chain, path.resolve())
        if base_path.resolve() in chain:
            cycle = " -> ".join(p.name for p in (*chain, base_path.resolve()))
            raise ConfigError(f"the bases form a circle ({cycle})", file=str(path), line=where, key="base",
                              hint="Remove the base: that leads back to a file already read.")
        if not base_path.is_file():
            raise ConfigError(f"base file {base_path} not found (a base is relative to the folder of the "
                              "file that names it)", file=str(path), line=where, key="base")
        base = read_with_bases(base_path, chain)
        if not isinstance(base, YamlMap):
            raise ConfigError(f"a base config must be a mapping (key: value lines), got {value_kind(base)}",
                              file=str(base_path), line=getattr(base, "line", None))
        _rebase_paths(base, base_path.parent, path.parent)
        merged = deep_merge(merged, mark_file(base, str(base_path)))
    return deep_merge(merged, raw)


def deep_merge(base: YamlMap, child: YamlMap) -> YamlMap:
    """`child` over `base`: mappings merged key by key (the base's keys first, in their order, then
    the child's new ones), anything else the child's. Lines go with the values they belong to."""
    out = YamlMap()
    out.line, out.key_lines = child.line or base.line, {}
    for key in [*base, *(k for k in child if k not in base)]:
        if key in child and isinstance(child[key], YamlMap) and isinstance(base.get(key), YamlMap):
            out[key] = deep_merge(base[key], child[key])
        else:
            out[key] = child[key] if key in child else base[key]
        out.key_lines[key] = (child if key in child else base).line_of(key)
    return out


def _rebase_paths(raw: YamlMap, base_dir: Path, child_dir: Path) -> None:
    """The paths that a base file gives, from relative to its folder to relative to the child's."""
    if base_dir.resolve() == child_dir.resolve():
        return

    def moved(path: Any) -> Any:
        if not isinstance(path, str) or Path(path).expanduser().is_absolute():
            return path
        return os.path.relpath((base_dir / path).resolve(), child_dir.resolve())

    plugins = raw.get("plugins")
    if isinstance(plugins, YamlList):
        for i, plugin in enumerate(plugins):
            if isinstance(plugin, str) and plugin.endswith(".py"):
                plugins[i] = moved(plugin)
    data = raw.get("data")
    sources = [data.get("train"), data.get("val")] if is_pair(data) else [data]
    for source in sources:
        if isinstance(source, dict) and source.get("source") in SOURCES:
            for key in SOURCES[source["source"]].paths:
                if key in source:
                    source[key] = moved(source[key])
