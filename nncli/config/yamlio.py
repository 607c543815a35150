"""Reading YAML safely, keeping the line of every key and item so errors can point at it.

Differences from `yaml.safe_load`, each on purpose:
- numbers as people write them (`1e-4`, `3e5`) are floats, not strings (YAML 1.1 wants `1.0e-4`);
- only `true` / `false` are booleans: `amp: off` stays the string "off" (the "Norway problem");
- a key given twice is an error, not a silent overwrite; a merge key (`<<: *anchor`, or a list
  of anchors) copies the anchored mappings' keys in, and the mapping's own keys win over them;
- an integer beyond 64 bits is an error (torch cannot take it);
- a document whose aliases add more than `MAX_ALIASED` nodes once expanded (an "alias bomb") is
  refused before it is built; a large document without aliases loads as any other;
- a character that YAML does not allow (a control character, U+FFFE) is an error at its line.

libyaml's parser (PyYAML's C extension) reads a document when PyYAML has it, about 4x faster than
the pure-Python one on a large inline `tensors:` section; the two build the same nodes, with the
same line marks. A document that libyaml refuses is read again by the pure-Python parser, whose
messages (the same as `yaml.safe_load`'s) say more: which character, which token.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from nncli.errors import ConfigError

MAX_ALIASED = 200_000  # nodes that aliases may add: ample for anchors of settings, far below a bomb
MAX_DEPTH = 100


class FileLine(int):
    """A line number that names its file: the lines of a `base:` file keep pointing into it once
    its keys are merged into another config's (an error then names the base and its line)."""

    file: str

    def __new__(cls, line: int, file: str) -> FileLine:
        self = super().__new__(cls, line)
        self.file = file
        return self


class YamlMap(dict):
    """A dict that remembers its own line and the line of each key (1-based)."""

    line: int = 0
    key_lines: dict

    def line_of(self, key: Any) -> int:
        return getattr(self, "key_lines", {}).get(key, self.line)


class YamlList(list):
    """A list that remembers its own line and the line of each item (1-based)."""

    line: int = 0
    item_lines: list

    def line_of(self, index: int) -> int:
        lines = getattr(self, "item_lines", [])
        return lines[index] if 0 <= index < len(lines) else self.line


def line_of(container: Any, key: Any) -> int | None:
    """The line of `container[key]` when the container came from YAML, else None."""
    if isinstance(container, (YamlMap, YamlList)):
        return container.line_of(key) or None
    return None


_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")


class _LineKeeping:
    """Constructors for line-keeping containers, YAML-1.2 numbers and booleans, no duplicate keys
    (mixed into either parser's SafeLoader)."""

    def construct_yaml_map(self, node):
        data = YamlMap()
        data.line, data.key_lines = node.start_mark.line + 1, {}
        yield data
        merged, own = self.merged_and_own_pairs(node)
        for key_node, value_node in merged:  # keys from `<<:`, the first anchor listed winning
            key = self.construct_key(key_node)
            if key not in data:
                data[key] = self.construct_object(value_node, deep=True)
                data.key_lines[key] = key_node.start_mark.line + 1  # where the anchor wrote it
        merged_keys = set(data)
        for key_node, value_node in own:
            key = self.construct_key(key_node)
            if key in data and key not in merged_keys:
                raise ConfigError(
                    f"key '{key}' is given twice (first on line {data.key_lines[key]}); "
                    "remove one of them", line=key_node.start_mark.line + 1)
            merged_keys.discard(key)  # a mapping's own key replaces a merged one, once
            data[key] = self.construct_object(value_node, deep=True)
            data.key_lines[key] = key_node.start_mark.line + 1

    def construct_key(self, key_node):
        key = self.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)) and key is not None:
            raise ConfigError("a mapping key must be a plain value", line=key_node.start_mark.line + 1)
        return key

    def merged_and_own_pairs(self, node) -> tuple[list, list]:
        """A mapping node's (key, value) pairs: those its merge keys (`<<: *a` or `<<: [*a, *b]`)
        bring in, in the order they take precedence, and its own. Without the tree change
        that PyYAML's flatten_mapping makes, which would turn an override into a duplicate."""
        merged, own = [], []
        for key_node, value_node in node.value:
            if key_node.tag != "tag:yaml.org,2002:merge":
                own.append((key_node, value_node))
                continue
            sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            for source in sources:
                if not isinstance(source, yaml.MappingNode):
                    raise ConfigError("a merge key (<<) takes a mapping or a list of mappings "
                                      "(e.g. <<: *defaults)", line=source.start_mark.line + 1)
                inner_merged, inner_own = self.merged_and_own_pairs(source)
                merged += inner_own + inner_merged
        return merged, own

    def construct_yaml_int(self, node):
        value = super().construct_yaml_int(node)
        if not -2**63 <= value < 2**63:  # torch would fail on it with a stack dump
            raise ConfigError(f"{node.value} is beyond the integers torch takes (-2**63 to 2**63 - 1)",
                              line=node.start_mark.line + 1)
        return value

    def construct_yaml_seq(self, node):
        data = YamlList()
        data.line = node.start_mark.line + 1
        data.item_lines = [child.start_mark.line + 1 for child in node.value]
        yield data
        data.extend(self.construct_object(child, deep=True) for child in node.value)


class Loader(_LineKeeping, yaml.SafeLoader):
    """The pure-Python parser: always there, and the one whose errors are reported."""


class FastLoader(_LineKeeping, getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """libyaml's parser where PyYAML was built with it (else the same as Loader)."""


for _loader in (Loader, FastLoader):
    _loader.add_constructor("tag:yaml.org,2002:map", _loader.construct_yaml_map)
    _loader.add_constructor("tag:yaml.org,2002:seq", _loader.construct_yaml_seq)
    _loader.add_constructor("tag:yaml.org,2002:int", _loader.construct_yaml_int)
    # Drop YAML 1.1's yes/no/on/off booleans, then add 1.2-style floats and booleans.
    _loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    _loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
    _loader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL, list("tTfF"))


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many nodes the document has once every alias is expanded (memoised per node)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a self-referencing alias counts once instead of recursing forever
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    else:
        size = 1
    memo[id(node)] = size
    return size


def _first_too_large(node: yaml.Node, sizes: dict[int, int]) -> yaml.Node:
    """The innermost node (first in file order) that alone expands past MAX_ALIASED: the line to
    blame for an alias bomb, rather than the top of the document."""
    seen = set()
    while id(node) not in seen:
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            break
        big = next((c for c in children if sizes.get(id(c), 0) > MAX_ALIASED and id(c) not in seen), None)
        if big is None:
            break
        node = big
    return node


def _too_deep_line(text: str) -> int | None:
    """The line where nesting first goes deeper than MAX_DEPTH (the parser itself is not recursive)."""
    depth = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    return event.start_mark.line + 1
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    except yaml.YAMLError:
        pass
    return None


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse one YAML document; every problem becomes a ConfigError naming `source` and the line."""
    one_line = source.startswith("--set")  # a --set value: the option names it, no line
    try:
        try:
            return _load(FastLoader, text, source)
        except yaml.YAMLError:
            return _load(Loader, text, source)  # its errors say more (see the module's doc)
    except ConfigError as err:
        err.file = source
        if one_line:
            err.line = None
        raise
    except yaml.reader.ReaderError as err:  # the pure-Python reader's: `position` counts characters
        code = ord(err.character) if isinstance(err.character, str) else err.character
        raise ConfigError(f"contains the character U+{code:04X}, which YAML does not allow (control "
                          "characters, U+FFFE, U+FFFF)", file=source,
                          line=None if one_line else text[:err.position].count("\n") + 1,
                          hint="Delete it; ESC (U+001B) characters come with text copied from a "
                               "coloured terminal.") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        problem = err.problem or err.context or "not valid YAML"
        if "could not determine a constructor" in problem:
            problem = (f"the tag {problem.split('tag ', 1)[-1]} is not allowed: "
                       "nncli configs hold plain values only")
        # a --set value is one line; a glob such as *.b reads as a YAML alias unless quoted
        hint = "Quote the value: --set 'KEY=\"VALUE\"'." if one_line else None
        raise ConfigError(f"not valid YAML: {problem}", file=source, hint=hint,
                          line=None if one_line else mark.line + 1 if mark else None) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"not valid YAML: {err}", file=source) from None
    except RecursionError:  # PyYAML composes and constructs recursively
        raise ConfigError(f"lists and mappings are nested too deeply (more than {MAX_DEPTH} "
                          "levels); nncli configs are a few levels deep",
                          file=source, line=_too_deep_line(text)) from None


def _load(loader_class: type, text: str, source: str) -> Any:
    """The document read by `loader_class`, refused before it is built when it is an alias bomb."""
    loader = loader_class(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        sizes: dict[int, int] = {}
        if _expanded_size(node, sizes) - len(sizes) > MAX_ALIASED:  # the nodes aliases add
            culprit = _first_too_large(node, sizes)
            raise ConfigError(f"aliases (&anchor / *alias) expand the document by more than "
                              f"{MAX_ALIASED:,} values; refusing to read it",
                              file=source, line=culprit.start_mark.line + 1)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> Any:
    """Read a YAML file; missing, unreadable or non-text files are ConfigErrors too."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError("file not found; check the path", file=str(path)) from None
    except IsADirectoryError:
        raise ConfigError("is a directory, expected a YAML file", file=str(path)) from None
    except OSError as err:
        raise ConfigError(f"cannot be read ({err.strerror})", file=str(path)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ConfigError("not a text file (bytes that are not UTF-8); expected a YAML config",
                          file=str(path), line=line) from None
    if "\x00" in text:
        raise ConfigError("not a text file (contains NUL bytes); expected a YAML config",
                          file=str(path), line=text[:text.index("\x00")].count("\n") + 1)
    return parse_yaml(text, str(path))


def mark_file(value: Any, file: str) -> Any:
    """Every line in `value`'s containers that names no file yet, made one of `file`'s (FileLine),
    so that errors about it name `file` after it is merged into another config. Returns `value`."""
    if isinstance(value, YamlMap):
        value.line = _in_file(value.line, file)
        value.key_lines = {k: _in_file(line, file) for k, line in getattr(value, "key_lines", {}).items()}
        for item in value.values():
            mark_file(item, file)
    elif isinstance(value, YamlList):
        value.line = _in_file(value.line, file)
        value.item_lines = [_in_file(line, file) for line in getattr(value, "item_lines", [])]
        for item in value:
            mark_file(item, file)
    return value


def _in_file(line: int, file: str) -> int:
    return line if isinstance(line, FileLine) or not line else FileLine(line, file)


def to_plain(value: Any) -> Any:
    """Line-keeping containers back to plain dicts and lists (tuples too), e.g. for yaml.safe_dump."""
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value
