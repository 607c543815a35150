"""nncli as the owner of its process (`nncli`, `python -m nncli`: nncli.cli.main): how it starts
and how it ends. A script that imports torch pays for two things it never uses, and a tool that
owns its process need not:

- `pause_collection_until_torch_imported`: Python's garbage collector scans every object it
  tracks again and again while torch imports (about 165,000 of them), and on each full collection
  after it: 0.3-0.4 s of `nncli validate`'s 1.8 s on a 2-core CPU. It is paused until torch is
  imported; torch's objects are then frozen (`gc.freeze`: never collected, as modules never are),
  and collection runs as usual on everything made later, training included. The commands that
  never import torch (`--help`, `plot`) are short and run without it (100 runs plotted: 323 MB
  at the peak, against 320 MB with collection).
- `end_process`: the interpreter's teardown, which frees torch's modules one by one (0.6-0.9 s)
  after every file is written.
"""
from __future__ import annotations

import atexit
import gc
import importlib.abc
import importlib.util
import io
import os
import sys
import threading
from typing import NoReturn

from nncli import plugins


def pause_collection_until_torch_imported() -> None:
    """Pause garbage collection until torch's import has run, then freeze what exists and collect
    as usual. Nothing changes where torch is imported already (nncli used from Python)."""
    if "torch" in sys.modules or not gc.isenabled():
        return
    gc.disable()
    sys.meta_path.insert(0, _ResumeCollectionAfterImport("torch"))


class _ResumeCollectionAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it takes the spec the other finders find for `name` and has
    collection resume once the module's code has run (or failed), then leaves sys.meta_path."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname: str, path: object = None, target: object = None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            gc.enable()
            return spec
        run_module_code = spec.loader.exec_module  # this spec's own loader object: changed for it only

        def run_then_resume(module: object) -> None:
            try:
                run_module_code(module)
            finally:
                gc.freeze()
                gc.enable()

        spec.loader.exec_module = run_then_resume
        return spec


def end_process(status: object) -> NoReturn:
    """End the process with `status` (SystemExit's code) once the command is done, skipping the
    interpreter's teardown, which a script cannot avoid. Every file nncli writes is closed and
    fsynced when its command returns; the exit handlers still run (they end data loader workers);
    what the files that plugins left open still buffer is written; output that cannot all be
    written (a full disk) fails the command.
    Where a thread that is not a daemon still runs (a plugin's), the normal exit waits for it, as
    Python's does. A torchrun worker gains more: gloo's threads can abort the process in that
    teardown ("terminate called without an active exception") after a successful run."""
    code = status if isinstance(status, int) else 0 if status is None else 1
    if status is not None and not isinstance(status, int):
        print(status, file=sys.stderr)  # as Python does for sys.exit("message")
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)  # CPython's; else the normal exit
    others = [thread for thread in threading.enumerate()
              if thread is not threading.main_thread() and not thread.daemon and thread.is_alive()]
    if run_exit_handlers is None or others:
        sys.exit(code)
    run_exit_handlers()
    if plugins.IMPORTED:  # code that is not nncli's ran here
        _flush_files_left_open()
    os._exit(_flush_output(code))


def _flush_files_left_open() -> None:
    """Write what the files that a plugin left open still hold in their buffers: the interpreter's
    teardown writes it as it frees them, os._exit would lose it. Text files first (their flush
    writes into their bytes' buffer). Not the objects frozen with torch's: plugins are imported
    after torch. Only where plugins ran: looking through every object takes up to 0.2 s."""
    files = [obj for obj in gc.get_objects()
             if isinstance(obj, (io.TextIOWrapper, io.BufferedWriter, io.BufferedRandom))
             and obj is not sys.stdout and obj is not sys.stderr]
    for file in sorted(files, key=lambda f: not isinstance(f, io.TextIOWrapper)):
        try:
            file.flush()
        except (OSError, ValueError):  # closed, or cannot be written: as the teardown, say nothing
            pass


def _flush_output(code: int) -> int:
    """Flush stdout and stderr; the exit status: `code`, or 1 where what the command printed was
    not all written (a full disk; Python's own exit would say so and end with status 120)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:  # a reader gone (`| head`): it has what it wanted; 1, as run_command
            code = code or 1
        except ValueError:  # a stream closed
            pass
        except OSError as err:
            code = code or 1
            if stream is sys.stdout:
                try:
                    print(f"error: cannot write the output: {err.strerror or err}", file=sys.stderr,
                          flush=True)
                except (OSError, ValueError):
                    pass
    return code
