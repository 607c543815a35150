"""How a command ends: nncli's errors as one paragraph on stderr and an exit status (2 bad input,
1 a failure while running, 130 interrupted), other exceptions in one line too (the traceback only
with --debug), warnings as one line each, and SIGTERM/SIGHUP taken as Ctrl-C. torch is not
imported here, so that `nncli --help` answers at once.
"""
from __future__ import annotations

import contextlib
import os
import sys
import traceback
import warnings
from typing import Callable, Optional

import typer

from nncli.errors import NncliError, is_out_of_memory, out_of_memory_text, stop_signals_handled_by


def run_command(action: Callable[[], Optional[int]], debug: bool) -> None:
    """Run a command body: nncli errors become one paragraph on stderr and an exit status
    (2 bad input, 1 failure, 130 interrupted); other exceptions too, traceback only with --debug.
    Under DDP, the other processes' messages are marked with their rank, and only the main
    process shows warnings (every process would repeat them)."""
    rank = int(os.environ.get("RANK", "0"))  # torchrun's: which process of the job this is

    def say(text: str) -> None:
        print(text if rank == 0 else f"[process {rank}] {text}", file=sys.stderr)

    if not debug:
        warnings.showwarning = _show_warning if rank == 0 else (lambda *args, **kwargs: None)
    try:
        with _stop_signals_interrupt():
            code = action() or 0
    except NncliError as err:
        if debug:
            traceback.print_exc()
        if str(err):  # empty on the DDP processes that leave the message to the main one
            say(f"{err.prefix}{err}")
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        say("interrupted")
        raise typer.Exit(130) from None
    except BrokenPipeError:  # `nncli predict ... | head`: the reader has what it wanted (training
        # is not stopped by it: see Reporter.print)
        if debug:
            traceback.print_exc()
        from nncli.report.console import silence_stdout

        silence_stdout()
        raise typer.Exit(1) from None
    except Exception as err:
        if debug:
            traceback.print_exc()
        if (out_of_memory := _out_of_memory_text(err)) is not None:
            say(f"error: out of memory: {out_of_memory}. The config's sizes (data, layers, batch) ask for "
                "more than this machine has; `nncli summary` shows the model's size")
        elif "torch" in sys.modules and _is_peer_failure(err):
            say("error: stopped because another process of the job failed")  # gloo's words for it
        else:
            say(f"error: {type(err).__name__}: {err}"
                + ("" if debug else " (run again with --debug for the traceback)"))
        raise typer.Exit(1) from None
    raise typer.Exit(code)


def _out_of_memory_text(err: Exception) -> str | None:
    """torch's out-of-memory error in one line, where no step of nncli's says what ran out (the
    data of `validate`, say); None for other errors."""
    if "torch" not in sys.modules:  # not imported: not torch's error, and --help stays fast
        return None
    return out_of_memory_text(err) if is_out_of_memory(err) else None


def _is_peer_failure(err: Exception) -> bool:
    from nncli.run.devices import is_peer_failure

    return is_peer_failure(err)


def _stop_signals_interrupt() -> contextlib.AbstractContextManager:
    """SIGTERM and SIGHUP stop a command the way Ctrl-C does ("interrupted", exit 130), not
    silently with 143 or 129, also before training starts (its loop then takes them over to save
    first: StopRequest). Not in a torchrun worker: one waiting for the others to join the job
    would never run the handler, and its launcher says 130 itself."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    return (stop_signals_handled_by(interrupt) if os.environ.get("WORLD_SIZE", "1") == "1"
            else contextlib.nullcontext())


_shown_warnings: set[str] = set()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (nncli's and torch's) as one line each, once, without the source line they came
    from (torch's warning filters let some through again on every model build)."""
    text = str(message)
    if text not in _shown_warnings:
        _shown_warnings.add(text)
        print(f"warning: {text}", file=sys.stderr)
