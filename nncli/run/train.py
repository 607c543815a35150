"""`nncli train` as a library call: prepare a run, claim its directory, fit it, end it well.

`train` is what the command does; `start_run_dir`, `announce` and `run_fit` are shared with
`resume` (nncli.run.resume), which continues or forks a run instead of starting one.
"""
from __future__ import annotations

from pathlib import Path

from nncli.config import Config
from nncli.errors import Interrupted, RunError, out_of_memory_as_error
from nncli.files import write_text_atomic
from nncli.report.console import ConsoleReporter
from nncli.report.loggers import open_loggers
from nncli.run.devices import end_process, failed_process, is_peer_failure, weights_in_sync
from nncli.run.loop import fit
from nncli.run.rundir import claim_run_dir
from nncli.run.save import resolved_config_text
from nncli.run.setup import prepare_run
from nncli.run.state import Run


def train(config: Config, reporter: ConsoleReporter, *, device: str | None = None,
          out_dir: Path | None = None) -> Run:
    """`nncli train`: prepare a run, write its directory (the main process only), fit it."""
    run = prepare_run(config, device=device, notice=reporter.print)
    start_run_dir(run, out_dir)
    announce(run, reporter)
    run_fit(run, reporter)
    return run


def start_run_dir(run: Run, out_dir: Path | None, history: list[dict] = ()) -> None:
    """A new run directory (never an earlier run's, never another's), locked for this process,
    holding the resolved config.yaml and, when the run goes on from an earlier one, its `history`
    in metrics.csv; the main process only."""
    if run.process.is_main:
        run.run_dir, run.lock = claim_run_dir(out_dir or Path(run.config["checkpoint"]["dir"]),
                                              run.config["name"])
        write_text_atomic(resolved_config_text(run.config), run.run_dir / "config.yaml")
        run.loggers = open_loggers(run.run_dir, list(history), run.config["loggers"])


def announce(run: Run, reporter: ConsoleReporter) -> None:
    """What a new run says before its first epoch: where it writes, on which device, how much data;
    the schedule length nncli filled in; the optimizer's groups."""
    processes = f" x {run.process.world_size} processes" if run.process.world_size > 1 else ""
    reporter.print(f"run directory: {run.run_dir}   device: {run.device}{processes}   "
                   f"train/val samples: {len(run.data.train)}/{len(run.data.val) if run.val else 0}")
    if run.schedule and run.schedule.note:
        reporter.print(f"schedule: {run.schedule.note}")
    reporter.groups(run.groups, {n: p.numel() for n, p in run.model.named_parameters()})


def run_fit(run: Run, reporter: ConsoleReporter) -> None:
    """`fit`, then close the progress display and leave the process group whatever happened."""
    error = None
    try:
        with out_of_memory_as_error(f"training on {run.device}",
                                    "Lower train.batch_size (train.accumulate keeps the effective batch "
                                    "size), or train.eval_batch_size if it failed in validation, or set "
                                    "amp: bf16. The checkpoints of earlier epochs are unchanged."):
            fit(run, reporter)
        if run.process.world_size > 1:
            same = weights_in_sync(run.model)
            reporter.print(f"DDP: weights identical on all {run.process.world_size} processes" if same
                           else "warning: DDP processes ended with different weights")
    except BaseException as err:
        error = err
        if is_peer_failure(err) and (rank := failed_process()) is not None:
            raise RunError(f"stopped because process {rank} of the job failed") from None
        raise
    finally:
        reporter.close()
        for logger in run.loggers:
            logger.close()
        for samples in (run.batches.data, run.val):
            if samples is not None:
                samples.close()
        if run.lock is not None:
            run.lock.release()
        # an agreed stop ends every process at the same step; any other error may be this one's alone
        end_process(run.process, together=error is None or isinstance(error, Interrupted), error=error)
