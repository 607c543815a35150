"""Whether a value read from YAML fits a constructor's annotation, and the annotation in a
config's words: how layer, loss, optimizer and schedule arguments are type-checked before
anything is built (`lr: fast` -> "expects a number or a tensor, got 'fast'")."""
from __future__ import annotations

import types
import typing
from collections import abc
from typing import Any

# Python types in a config's words: one, and several ("expected a list of 2 integers")
TYPE_NOUNS = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings"),
              bool: ("true or false", "booleans"), list: ("a list", "lists"), dict: ("a mapping", "mappings"),
              type(None): ("null", "nulls")}


def value_kind(value: Any) -> str:
    """A config value's type in a config's words: "integer", "list", "mapping", ..."""
    for kind in (bool, *TYPE_NOUNS):  # bool first: True is an int too
        if isinstance(value, kind):
            return TYPE_NOUNS[kind][1][:-1]  # "integers" -> "integer"
    return type(value).__name__


# What YAML gives as a list (MultiStepLR's milestones: Iterable[int])
SEQUENCES = (tuple, list, abc.Iterable, abc.Sequence)


def type_hints(factory: Any) -> dict[str, Any]:
    """The annotations of a class's constructor (or a function), resolved; {} when they cannot be."""
    try:
        target = factory.__init__ if isinstance(factory, type) else factory
        # typing's names too: torch imports some (Iterable) for type checkers only
        return typing.get_type_hints(target, localns={name: getattr(typing, name) for name in typing.__all__})
    except Exception:  # unresolvable annotations: skip type checks rather than fail
        return {}


def fits_annotation(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits an annotation (int, float, bool, str, tensors, tuples, unions)."""
    import torch  # here, not at the top: importing nncli.config (which imports this) needs no torch

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any or hint is None:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(fits_annotation(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is torch.Tensor:  # from YAML: a number or a list of them (class weights)
        return isinstance(value, torch.Tensor) or (
            not isinstance(value, (bool, str, dict)) and _numbers(value))
    if origin in SEQUENCES or hint in (tuple, list) or hint is torch.Size:
        if not isinstance(value, (tuple, list)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(args) == len(value) and all(fits_annotation(v, a) for v, a in zip(value, args))
        return not args or all(fits_annotation(v, args[0]) for v in value)
    return True  # a class we cannot check from YAML (a dtype, a module): let the constructor decide


def _numbers(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_numbers(v) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def describe_annotation(hint: Any) -> str:
    """An annotation in YAML words: Union[int, tuple[int, int]] -> 'an integer or a list of 2
    integers'."""
    import torch

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(describe_annotation(a) for a in args))
    if hint in TYPE_NOUNS:
        return TYPE_NOUNS[hint][0]
    if hint is torch.Tensor:
        return "a tensor (a list of numbers)"
    if origin in SEQUENCES and args:
        items = [a for a in args if a is not Ellipsis]
        count = f"{len(args)} " if origin is tuple and args[-1] is not Ellipsis else ""
        if len(set(items)) == 1 and items[0] in TYPE_NOUNS:
            return f"a list of {count}{TYPE_NOUNS[items[0]][1]}"
        if count:
            return f"a list of {count}values"
    if origin in SEQUENCES or hint in (tuple, list) or hint is torch.Size:
        return "a list"
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def wrong_type(owner: str, key: str, value: Any, hints: dict[str, Any]) -> str | None:
    """"Adam's lr expects a number or a tensor ..., got 'fast'" when `value` does not fit the
    annotation of argument `key` of `owner` (from `type_hints`); None when it fits or has none.
    NaN fits no argument (`lr: .nan` would train without a word)."""
    shown = list(value) if isinstance(value, tuple) else value
    if has_nan(value):
        return f"{owner}'s {key} cannot be NaN, got {shown!r}"
    if key not in hints or fits_annotation(value, hints[key]):
        return None
    return f"{owner}'s {key} expects {describe_annotation(hints[key])}, got {shown!r}"


def has_nan(value: Any) -> bool:
    """A NaN in a number or a list of them: no constructor argument can use one."""
    if isinstance(value, float):
        return value != value
    return isinstance(value, (list, tuple)) and any(has_nan(v) for v in value)
