"""A config's arguments against a constructor: which it takes, whether a YAML value fits its
annotation (`lr: fast` -> "Adam's lr expects a number or a tensor, got 'fast'"), and `create`,
which builds `registry[type](**arguments)` after checking them. Layers, losses, optimizers and
schedules are all built this way. torch is imported only by the checks that need it."""
from __future__ import annotations

import inspect
import types
import typing
from collections import abc
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nncli.errors import TYPE_NOUNS, ConfigError, did_you_mean, first_line

if TYPE_CHECKING:
    from nncli.registry import Registry

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


# --- building from a config spec -----------------------------------------------------------

def signature_of(factory: Callable[..., Any]) -> inspect.Signature | None:
    """`factory`'s signature, or None when it has none Python can read (some builtins)."""
    try:
        return inspect.signature(factory)
    except (TypeError, ValueError):
        return None


def parameters_of(factory: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """`factory`'s parameters by name; {} when it has no readable signature."""
    signature = signature_of(factory)
    return dict(signature.parameters) if signature is not None else {}


def accepted_arguments(factory: Callable[..., Any]) -> list[str] | None:
    """The keyword arguments `factory` takes, or None when it takes any (**kwargs) or is opaque."""
    if signature_of(factory) is None:
        return None
    params = parameters_of(factory)
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return None
    return [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def required_arguments(factory: Callable[..., Any]) -> list[str]:
    """The arguments `factory` must be given (no default), in order; [] when it is opaque."""
    return [n for n, p in parameters_of(factory).items() if p.default is p.empty and n != "self"
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def create(registry: Registry, spec: str | dict, error: Callable[..., ConfigError], *where: Any,
           positional: tuple = (), reserved: tuple[str, ...] = (), defaults: dict | None = None) -> Any:
    """Build `registry[spec.type].factory(*positional, **spec-keywords)`, checking the keywords first.

    `spec` is a name or a mapping with `type:` and keyword arguments; keys in `reserved` are
    nncli's own (e.g. an optimizer's `groups`) and are not passed on. Errors point at `where`.
    """
    name = spec if isinstance(spec, str) else spec.get("type")
    if name is None:
        raise error(f"needs 'type:' naming {registry.a_kind}", *where)
    try:
        factory = registry.get(name).factory
    except ConfigError as err:
        raise error(err.message, *where, *(() if isinstance(spec, str) else ("type",)),
                    hint=err.hint) from None
    kwargs = {k: as_argument(v) for k, v in spec.items() if k != "type" and k not in reserved} \
        if isinstance(spec, dict) else {}
    kwargs = {**(defaults or {}), **kwargs}
    accepted = accepted_arguments(factory)
    settable = [a for a in accepted or () if a != "self"][len(positional):]  # not the optimizer, say
    for key in kwargs:
        if accepted is not None and key not in accepted:
            raise error(f"{name} has no argument '{key}'; it takes: {', '.join(settable)}", *where, key,
                        hint=did_you_mean(key, settable))
    hints = type_hints(factory)
    for key, value in kwargs.items():
        if (problem := wrong_type(name, key, value, hints)) is not None:
            raise error(problem, *where, key)
    missing = required_arguments(factory)[len(positional):]
    missing = [m for m in missing if m not in kwargs]
    if missing:
        raise error(f"{name} needs {', '.join(missing)}", *where,
                    hint=f"e.g. {{type: {name}, {missing[0]}: ...}}")
    try:
        return factory(*positional, **kwargs)
    except Exception as err:  # the class's own argument checks, whatever they raise
        given = f" with {', '.join(f'{k}={v!r}' for k, v in kwargs.items())}" if kwargs else ""
        raise error(f"{name} cannot be built{given}: {first_line(err)}", *where) from None


def as_argument(value: Any) -> Any:
    """A YAML value as a constructor argument: lists become tuples, what torch stores
    (kernel_size=(3, 3), betas=(0.9, 0.999)); mappings become plain dicts."""
    if isinstance(value, (list, tuple)):
        return tuple(as_argument(v) for v in value)
    if isinstance(value, dict):
        return {k: as_argument(v) for k, v in value.items()}
    return value

