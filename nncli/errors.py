"""Errors that nncli reports to users as one paragraph, without a traceback.

`ConfigError` is bad input (exit 2): a config, a data file, a checkpoint, a command-line value.
`RunError` is a failure while running (exit 1): a loss that became NaN, a disk that filled up.
"""
from __future__ import annotations

import difflib
import re
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any


class NncliError(Exception):
    """Base class: a message meant for the user, and the exit status that goes with it."""

    exit_code = 1
    prefix = "error: "

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 key: str | None = None, hint: str | None = None) -> None:
        self.message, self.file, self.line, self.key, self.hint = message, file, line, key, hint
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        file = getattr(self.line, "file", self.file)  # a line of a config's base file names that file
        if file is not None:
            where = f"{file}:{self.line}: " if self.line else f"{file}: "
        key = f"{self.key}: " if self.key else ""
        hint = ""
        if self.hint:  # a sentence of its own: "unknown layer 'relu'. Did you mean 'ReLU'?"
            hint = (" " if self.message.rstrip().endswith((".", "?", "!", ":")) else ". ") + self.hint
        return f"{where}{key}{self.message}{hint}"


class ConfigError(NncliError):
    """Bad input from the user: exit status 2."""

    exit_code = 2


class RunError(NncliError):
    """A failure while running: exit status 1."""

    exit_code = 1


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


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """A 'did you mean ...?' hint naming the closest choice, or None when nothing is close.

    Close: difflib's usual cutoff, or within an edit for every three letters. Closest: the fewest
    edits, ignoring case, where swapping two neighbouring letters is one edit (Damerau), so that
    a transposition or a case slip wins ('Adma' -> 'Adam', not 'Adamax'; 'relu' -> 'ReLU')."""
    word = str(word)
    ranked = []
    for i, choice in enumerate(dict.fromkeys(str(c) for c in choices)):
        edits = damerau_distance(word.lower(), choice.lower())
        similarity = difflib.SequenceMatcher(None, choice, word).ratio()
        if edits <= len(word) // 3 or similarity >= 0.6:
            ranked.append((edits, -similarity, i, choice))
    return f"Did you mean '{min(ranked)[3]}'?" if ranked else None


def damerau_distance(a: str, b: str) -> int:
    """Insertions, deletions, substitutions and swaps of two neighbouring characters that turn
    `a` into `b` (the optimal string alignment distance)."""
    previous, row = None, list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        before, previous, row = previous, row, [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            row[j] = min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], before[j - 2] + 1)
    return row[-1]


def option_error(option: str) -> Callable[..., ConfigError]:
    """An error factory shaped like `Config.error` (message, *keys, hint=...) for the values of a
    command-line option: the option is named instead of a file's line."""
    def error(message: str, *keys: Any, hint: str | None = None) -> ConfigError:
        return ConfigError(message, key=option, hint=hint)
    return error


def first_line(err: BaseException) -> str:
    """An exception's message in one line (torch's often run on over several), or its type."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


# What asks a run to stop and save: Ctrl-C, a scheduler's or `kill`'s SIGTERM, a closed terminal
# (SIGHUP, which Windows does not have).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                     if hasattr(signal, name))


@contextmanager
def stop_signals_handled_by(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """`handler` for the STOP_SIGNALS inside the block, the previous handlers after it. Signals
    that are ignored stay ignored (under `nohup`, SIGHUP); only the main thread may set them
    (elsewhere nothing changes)."""
    previous = {}
    for sig in STOP_SIGNALS:
        try:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            break
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# --- running out of memory ------------------------------------------------------------------

@contextmanager
def out_of_memory_as_error(doing: str, hint: str) -> Iterator[None]:
    """A device running out of memory while `doing` something becomes a RunError (exit 1) with
    a hint, instead of torch's multi-line message and a traceback."""
    try:
        yield
    except RuntimeError as err:
        if not is_out_of_memory(err):
            raise
        raise RunError(f"out of memory {doing}: {out_of_memory_text(err)}", hint=hint) from None


def is_out_of_memory(err: BaseException) -> bool:
    """A GPU's OutOfMemoryError, or the CPU allocator's RuntimeError (which has no class of its own).
    Neither can happen before torch is imported (and this module does not import it)."""
    torch = sys.modules.get("torch")
    return torch is not None and (isinstance(err, torch.OutOfMemoryError)
                                  or "can't allocate memory" in str(err))


def out_of_memory_text(err: BaseException) -> str:
    """The allocator's message in one line, without the C++ source location the CPU's starts with."""
    return re.sub(r"^\[enforce fail at [^\]]*\] err == 0\. ", "", first_line(err))


class Interrupted(NncliError):
    """Training stopped by SIGINT / SIGTERM after saving where it was: exit status 130."""

    exit_code = 130
    prefix = ""
