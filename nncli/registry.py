"""The registry: a name in a config becomes an object through one of these.

One small class for every extension point (layers, losses, optimizers, schedules, metrics, data
sources, loggers): a name maps to an entry, the built-ins are loaded the first time one is looked
up, and an unknown name is an error with the closest spelling suggested. Torch-free.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from nncli.errors import ConfigError, did_you_mean, value_kind


class Registry:
    """Names to objects, with a 'did you mean' error for unknown names."""

    def __init__(self, kind: str, loader: Callable[[Registry], None] | None = None,
                 list_hint: str | None = None) -> None:
        self.kind, self._loader, self._items, self._loaded = kind, loader, {}, loader is None
        self.list_hint = list_hint

    @property
    def a_kind(self) -> str:
        """"an optimizer", "a layer": the kind with its article, for messages."""
        return f"{'an' if self.kind[:1] in 'aeiou' else 'a'} {self.kind}"

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            self._loader(self)

    def add(self, name: str, item: Any) -> Any:
        self._load()  # the built-ins first, so that a user's entry of the same name replaces one
        self._items[name] = item
        return item

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(self._items)

    def items(self) -> list[tuple[str, Any]]:
        self._load()
        return list(self._items.items())

    def get(self, name: str) -> Any:
        """The object for `name`; a ConfigError (to be given a file and line) when unknown."""
        self._load()
        if not isinstance(name, str):
            raise ConfigError(f"expected {self.a_kind} name, got {value_kind(name)}", hint=self.list_hint)
        if name not in self._items:
            hint = did_you_mean(name, self._items) or self.list_hint
            raise ConfigError(f"unknown {self.kind} '{name}'", hint=hint)
        return self._items[name]
