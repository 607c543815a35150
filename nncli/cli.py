"""The `nncli` command line: each command parses its options, calls the library, and prints.

torch is imported inside the commands that need it, so `nncli --help` answers at once.
"""
from __future__ import annotations

import contextlib
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Callable, Optional

import typer

app = typer.Typer(help="Train PyTorch networks described in YAML.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode="rich", context_settings={"help_option_names": ["-h", "--help"]})

ConfigArg = typer.Argument(..., help="The YAML config file.", show_default=False, metavar="CONFIG")
DebugOpt = typer.Option(False, "--debug", help="Show the Python traceback of an error.")
OverridesOpt = typer.Option([], "--set", help="Override a config value: KEY=VALUE (dotted key, YAML value).")
PluginOpt = typer.Option([], "--plugin", metavar="FILE_OR_MODULE",
                         help="Import a plugin (a .py file or a module) that the checkpoint's model needs: "
                              "a checkpoint's own plugin names are never imported.")
TrustDataOpt = typer.Option([], "--trust-data", metavar="PATH",
                            help="Let the run's data be read from files under PATH: paths that a checkpoint "
                                 "names are never read otherwise.")


def _named(plugins: list[str], trusted: list[Path]):
    """What the user named for a checkpoint's config to import and read (inference.Named)."""
    from nncli.inference import Named

    return Named(tuple(plugins), tuple(trusted))


def _say_plugins(config) -> None:
    """One line naming the code a config's `plugins:` import: it runs with the user's rights."""
    if config.imported_plugins:
        from nncli.config import shown_path

        shown = [shown_path(Path(p)) if p.endswith(".py") else p for p in config.imported_plugins]
        print(f"plugins: imported {', '.join(shown)} (Python code that the config names)", file=sys.stderr)


def _print_version(value: bool) -> None:
    if value:
        from nncli import __version__

        print(f"nncli {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print nncli's version and exit."),
) -> None:
    """The options that come before a command (the app's help text is Typer's `help=`)."""


def run_command(action: Callable[[], Optional[int]], debug: bool) -> None:
    """Run a command body: nncli errors become one paragraph on stderr and an exit status
    (2 bad input, 1 failure, 130 interrupted); other exceptions too, traceback only with --debug.
    Under DDP, the other processes' messages are marked with their rank, and only the main
    process shows warnings (every process would repeat them)."""
    from nncli.errors import NncliError

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
        from nncli.reporting import silence_stdout

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
            say(f"error: {type(err).__name__}: {err}" + ("" if debug else " (run again with --debug for the traceback)"))
        raise typer.Exit(1) from None
    raise typer.Exit(code)


def _out_of_memory_text(err: Exception) -> str | None:
    """torch's out-of-memory error in one line, where no step of nncli's says what ran out (the
    data of `validate`, say); None for other errors."""
    if "torch" not in sys.modules:  # not imported: not torch's error, and --help stays fast
        return None
    from nncli.devices import is_out_of_memory, out_of_memory_text

    return out_of_memory_text(err) if is_out_of_memory(err) else None


def _is_peer_failure(err: Exception) -> bool:
    from nncli.devices import is_peer_failure

    return is_peer_failure(err)


def _stop_signals_interrupt() -> contextlib.AbstractContextManager:
    """SIGTERM and SIGHUP stop a command the way Ctrl-C does ("interrupted", exit 130), not
    silently with 143 or 129, also before training starts (its loop then takes them over to save
    first: StopRequest). Not in a torchrun worker: one waiting for the others to join the job
    would never run the handler, and its launcher says 130 itself."""
    from nncli.errors import stop_signals_handled_by

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    return stop_signals_handled_by(interrupt) if os.environ.get("WORLD_SIZE", "1") == "1" else contextlib.nullcontext()


_shown_warnings: set[str] = set()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (nncli's and torch's) as one line each, once, without the source line they came
    from (torch's warning filters let some through again on every model build)."""
    text = str(message)
    if text not in _shown_warnings:
        _shown_warnings.add(text)
        print(f"warning: {text}", file=sys.stderr)


@app.command()
def summary(
    config: Path = ConfigArg,
    depth: Optional[int] = typer.Option(None, "--depth", min=0, help="Collapse blocks nested deeper than N."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Shapes and memory for a batch of N."),
    params: bool = typer.Option(False, "--params", help="Also list every named parameter."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    overrides: list[str] = OverridesOpt,
    debug: bool = DebugOpt,
) -> None:
    """Print each layer's output shape, parameters and MACs, without allocating weights."""
    def action() -> None:
        import json

        from nncli.config import load_config
        from nncli.model import plan_model
        from nncli.optim import group_of_each_parameter
        from nncli.reporting import make_console
        from nncli.summary import print_parameters, print_summary, summarize
        from nncli.train import check_config

        cfg = load_config(config, overrides)
        _say_plugins(cfg)
        checked, groups = check_config(cfg)
        plan = plan_model(cfg, checked.input_shape, batch_size, count_macs=True)
        has_groups = isinstance(cfg["optimizer"], dict) and cfg["optimizer"].get("groups")
        result = summarize(plan, depth, group_of_each_parameter(groups) if has_groups and groups else None)
        if as_json:
            print(json.dumps(result, indent=2))
            return
        console = make_console()
        print_summary(result, console, title=f"{cfg['name']} ({config})")
        if params:
            print_parameters(plan, console)

    run_command(action, debug)


@app.command()
def validate(
    config: Path = ConfigArg,
    overrides: list[str] = OverridesOpt,
    debug: bool = DebugOpt,
) -> None:
    """Check a config without training: prints `ok` and a one-line summary, or the error."""
    def action() -> None:
        from nncli.config import load_config
        from nncli.model import describe_shape
        from nncli.train import check_config

        cfg = load_config(config, overrides)
        _say_plugins(cfg)
        plan, _ = check_config(cfg)
        total = sum(p.numel() for p in plan.model.parameters())
        layers = len(list(plan.walk()))
        verdict = "ok" if cfg["data"] is not None else "ok (model only: train needs a data: section)"
        print(f"{verdict}: {config}: {layers} layer{'s' if layers != 1 else ''}, {total:,} parameters, input "
              f"{list(plan.input_shape)} -> output {describe_shape(plan.output_shape[1:])}")

    run_command(action, debug)


@app.command()
def layers(
    name: Optional[str] = typer.Argument(None, help="A layer type: show its arguments.", metavar="NAME"),
    plugins: list[str] = typer.Option([], "--plugin", metavar="FILE_OR_MODULE",
                                      help="Load a plugin first: a .py file or a module name, as in `plugins:`."),
    debug: bool = DebugOpt,
) -> None:
    """List the layer registry by category, or one layer's arguments."""
    def action() -> None:
        from nncli.errors import option_error
        from nncli.layer_docs import print_layer, print_registry
        from nncli.registry import load_plugins
        from nncli.reporting import make_console

        load_plugins(plugins, Path.cwd(), option_error("--plugin"))
        console = make_console()
        if name:
            print_layer(name, console)
        else:
            print_registry(console)

    run_command(action, debug)


@app.command()
def train(
    config: Path = ConfigArg,
    overrides: list[str] = OverridesOpt,
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Train for N epochs."),
    out: Optional[Path] = typer.Option(None, "--out", help="Put the run directory under DIR (replaces checkpoint.dir)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the result."),
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1, help="Start N DDP processes on this machine through torchrun."),
    debug: bool = DebugOpt,
) -> None:
    """Train the config's model; write config, metrics and checkpoints to a run directory."""
    if nproc:
        def check() -> None:
            from nncli.config import load_config, with_epochs
            from nncli.train import check_launch

            check_launch(load_config(config, with_epochs(overrides, epochs)), device, nproc)

        _check_then_launch(nproc, check, debug)  # exits with the job's status
        return

    def action() -> None:
        from nncli.config import load_config, with_epochs
        from nncli.reporting import make_reporter
        from nncli.train import train as train_run

        cfg = load_config(config, with_epochs(overrides, epochs))
        if int(os.environ.get("RANK", "0")) == 0:
            _say_plugins(cfg)
        reporter = make_reporter(quiet)
        run = train_run(cfg, reporter, device=device, out_dir=out)
        _print_result(run, reporter)

    run_command(action, debug)


def _print_result(run, reporter) -> None:
    if not run.process.is_main:
        return
    state = run.state
    reporter.history(state.history, state.best["epoch"], run.config["train"]["log_every"])
    best = state.best
    if state.stopped_early:
        print(f"early stop after epoch {state.epoch}: no improvement in {best['metric']} for "
              f"{state.bad_epochs} epochs")
    if best["epoch"] is not None:
        print(f"best epoch {best['epoch']}: {best['metric']}={best['value']:.4f}")
    print(f"saved: {run.run_dir}")


@app.command()
def resume(
    path: Path = typer.Argument(..., help="A run directory or checkpoint; or a plain state_dict file with --config.",
                                metavar="PATH"),
    config: Optional[Path] = typer.Option(None, "--config", help="A config: required to warm-start from a state_dict; for a run, its changes are checked."),
    overrides: list[str] = OverridesOpt,
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Extend or shorten the run to N epochs in all."),
    warm: bool = typer.Option(False, "--warm-start", help="Start a new run of --config from the checkpoint's weights only (no optimizer, schedule or epoch count)."),
    strict: bool = typer.Option(True, "--strict/--no-strict", help="Warm start: refuse weights that do not all fit."),
    out: Optional[Path] = typer.Option(None, "--out", help="Continue in a new run directory under DIR (a warm start's, or a copy of the run's), leaving the run as it is."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the result."),
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1, help="Continue with N DDP processes through torchrun."),
    plugins: list[str] = PluginOpt,
    trusted: list[Path] = TrustDataOpt,
    debug: bool = DebugOpt,
) -> None:
    """Continue a run exactly where it stopped, or warm-start a new run from plain weights."""
    if nproc:
        def check() -> None:
            from nncli.resume import check_resume_launch

            check_resume_launch(path, config_path=config, overrides=overrides, epochs=epochs,
                                device=device, processes=nproc, warm=warm, named=_named(plugins, trusted),
                                out_dir=out)

        _check_then_launch(nproc, check, debug)  # exits with the job's status
        return

    def action() -> None:
        from nncli.errors import ConfigError
        from nncli.reporting import make_reporter
        from nncli.resume import check_warm_start, is_nncli_checkpoint, resume as resume_run, warm_start

        reporter = make_reporter(quiet)
        check_warm_start(warm, config)
        if not warm and is_nncli_checkpoint(path):
            run = resume_run(path, reporter, overrides=overrides, epochs=epochs, config_path=config,
                             device=device, named=_named(plugins, trusted), out_dir=out)
            if run is None:  # finished already: nothing trained, nothing saved
                return
        elif config is None:
            raise ConfigError("is not an nncli checkpoint; if it is a plain state_dict, give the "
                              "model's config to warm-start from it: nncli resume WEIGHTS --config CONFIG",
                              file=str(path))
        else:
            run = warm_start(path, config, reporter, overrides=overrides, epochs=epochs,
                             strict=strict, device=device, out_dir=out)
        _print_result(run, reporter)

    run_command(action, debug)


def _check_then_launch(nproc: int, check: Callable[[], None], debug: bool) -> None:
    """`train|resume ... --nproc N`: `check` the input once, here (every process would say what is
    wrong; their warnings are theirs to show), then run this command again, without --nproc, in
    N DDP processes (devices.launch)."""
    def action() -> int:
        from nncli.devices import launch
        from nncli.errors import ConfigError

        if nproc == 1:
            raise ConfigError("1 process is a plain run: leave out --nproc, or give 2 or more", key="--nproc")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check()
        args, skip = [], False
        for arg in sys.argv[1:]:
            if skip:
                skip = False
            elif arg == "--nproc":
                skip = True
            elif not arg.startswith("--nproc="):
                args.append(arg)
        return launch(nproc, args)

    run_command(action, debug)


@app.command(name="eval")
def evaluate(
    checkpoint: Path = typer.Argument(..., help="A checkpoint file or run directory.", metavar="RUN_OR_CHECKPOINT"),
    data: Optional[Path] = typer.Option(None, "--data", help="A data file (.csv, .npz) to evaluate on, read with the run's data settings."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps."),
    plugins: list[str] = PluginOpt,
    trusted: list[Path] = TrustDataOpt,
    debug: bool = DebugOpt,
) -> None:
    """Loss and metrics of a trained model on its validation data, or on --data."""
    def action() -> None:
        import json

        from nncli.inference import evaluate_checkpoint

        results, source = evaluate_checkpoint(checkpoint, data, device, _named(plugins, trusted))
        if as_json:
            print(json.dumps(results))
        else:
            print(f"{source}: " + "  ".join(f"{k}={v:.4f}" for k, v in results.items()))

    run_command(action, debug)


@app.command()
def predict(
    checkpoint: Path = typer.Argument(..., help="A checkpoint file or run directory.", metavar="RUN_OR_CHECKPOINT"),
    inputs: str = typer.Option(..., "--input", help="Inputs: a JSON list of samples, or a .json, .csv, .npy or .npz file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps."),
    plugins: list[str] = PluginOpt,
    debug: bool = DebugOpt,
) -> None:
    """The model's outputs for the given inputs, one row per input."""
    def action() -> None:
        import json

        from nncli.inference import predict_checkpoint

        rows = predict_checkpoint(checkpoint, inputs, device, _named(plugins, []))
        if as_json:
            print(json.dumps(rows))
            return
        for i, row in enumerate(rows):
            label = f"  class={row['class']}" if "class" in row else ""
            print(f"{i}: {[round(v, 6) for v in row['output']]}{label}")  # --json gives every digit

    run_command(action, debug)


def main() -> None:
    try:
        app()
    except SystemExit as done:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # A torchrun worker: every file is written and fsynced, the process group is gone.
            # Skip the interpreter's teardown, where gloo's threads can abort the process
            # ("terminate called without an active exception") after a successful run.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(done.code if isinstance(done.code, int) else 1)
        raise
