"""The `nncli` command line: each command parses its options, calls the library, and prints.

The options several commands share are defined once, below. torch is imported inside the
commands that need it, so `nncli --help` answers at once; nncli.exits turns errors into one
paragraph and an exit status.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional

import typer

from nncli.exits import run_command
from nncli.process import end_process, pause_collection_until_torch_imported

app = typer.Typer(help="Train PyTorch networks described in YAML.", no_args_is_help=True,
                  add_completion=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]})

# --- options that several commands take ----------------------------------------------------------

CONFIG = typer.Argument(..., help="The YAML config file.", show_default=False, metavar="CONFIG")
CHECKPOINT = typer.Argument(..., help="A checkpoint file or run directory.", metavar="RUN_OR_CHECKPOINT")
DEBUG = typer.Option(False, "--debug", help="Show the Python traceback of an error.")
SET = typer.Option([], "--set", help="Override a config value: KEY=VALUE (dotted key, YAML value).")
EPOCHS = typer.Option(None, "--epochs", min=1, help="Train for N epochs (resume: N in all).")
DEVICE = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps.")
QUIET = typer.Option(False, "--quiet", "-q", help="Print only the result.")
NPROC = typer.Option(None, "--nproc", min=1, help="Run N DDP processes on this machine through torchrun.")
JSON = typer.Option(False, "--json", help="Print JSON.")
PLUGIN = typer.Option([], "--plugin", metavar="FILE_OR_MODULE",
                      help="Import a plugin (a .py file or a module) that the checkpoint's model needs: "
                           "a checkpoint's own plugin names are never imported.")
LOAD_PLUGIN = typer.Option([], "--plugin", metavar="FILE_OR_MODULE",
                           help="Load a plugin first: a .py file or a module name, as in `plugins:`.")
TRUST_DATA = typer.Option([], "--trust-data", metavar="PATH",
                          help="Let the run's data be read from files under PATH: paths that a checkpoint "
                               "names are never read otherwise.")


def _named(plugins: list[str], trusted: list[Path]):
    """What the user named for a checkpoint's config to import and read (inference.Named)."""
    from nncli.run.inference import Named

    return Named(tuple(plugins), tuple(trusted))


def _say_plugins(config) -> None:
    """One line naming the code a config's `plugins:` imported: it runs with the user's rights."""
    if config.imported_plugins and int(os.environ.get("RANK", "0")) == 0:
        from nncli.config import shown_path

        shown = [shown_path(Path(p)) if p.endswith(".py") else p for p in config.imported_plugins]
        print(f"plugins: imported {', '.join(shown)} (Python code that the config names)", file=sys.stderr)


def _load(config: Path, overrides: list[str], epochs: int | None = None):
    """The user's config, resolved, its plugins said."""
    from nncli.config.overrides import with_epochs
    from nncli.run.setup import load_config

    cfg = load_config(config, with_epochs(overrides, epochs))
    _say_plugins(cfg)
    return cfg


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


# --- commands ------------------------------------------------------------------------------------

@app.command()
def summary(
    config: Path = CONFIG,
    depth: Optional[int] = typer.Option(None, "--depth", min=0, help="Collapse blocks nested deeper than N."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Shapes and memory for a batch of N."),
    params: bool = typer.Option(False, "--params", help="Also list every named parameter."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    overrides: list[str] = SET,
    debug: bool = DEBUG,
) -> None:
    """Print each layer's output shape, parameters and MACs, without allocating weights."""
    def action() -> None:
        import json

        from nncli.optim.optimizers import group_of_each_parameter
        from nncli.report.console import make_console
        from nncli.report.summary import print_parameters, print_summary, summarize
        from nncli.run.setup import check_config

        cfg = _load(config, overrides)
        plan, groups = check_config(cfg, batch_size=batch_size, count_macs=True)
        has_groups = isinstance(cfg["optimizer"], dict) and cfg["optimizer"].get("groups")
        result = summarize(plan, depth, group_of_each_parameter(groups) if has_groups else None)
        if as_json:
            print(json.dumps(result, indent=2))
            return
        console = make_console()
        print_summary(result, console, title=f"{cfg['name']} ({config})")
        if params:
            print_parameters(plan, console)

    run_command(action, debug)


MODEL_ONLY = "ok (model only: train needs a data: section)"


@app.command()
def validate(config: Path = CONFIG, overrides: list[str] = SET, debug: bool = DEBUG) -> None:
    """Check a config without training: prints `ok` and a one-line summary, or the error."""
    def action() -> None:
        from nncli.model.plan import describe_shape
        from nncli.run.setup import check_config

        cfg = _load(config, overrides)
        plan, _ = check_config(cfg)
        total = sum(p.numel() for p in plan.model.parameters())
        layers = len(list(plan.walk()))
        verdict = "ok" if cfg["data"] is not None else MODEL_ONLY
        print(f"{verdict}: {config}: {layers} layer{'s' if layers != 1 else ''}, {total:,} parameters, input "
              f"{list(plan.input_shape)} -> output {describe_shape(plan.output_shape[1:])}")

    run_command(action, debug)


@app.command()
def layers(
    name: Optional[str] = typer.Argument(None, help="A layer type: show its arguments.", metavar="NAME"),
    plugins: list[str] = LOAD_PLUGIN,
    debug: bool = DEBUG,
) -> None:
    """List the layer registry by category, or one layer's arguments."""
    def action() -> None:
        from nncli.errors import option_error
        from nncli.plugins import load_plugins
        from nncli.report.console import make_console
        from nncli.report.layer_docs import print_layer, print_registry

        load_plugins(plugins, Path.cwd(), option_error("--plugin"))
        console = make_console()
        if name:
            print_layer(name, console)
        else:
            print_registry(console)

    run_command(action, debug)


@app.command()
def schema(
    out: Optional[Path] = typer.Option(None, "--out", help="Write the schema to FILE (default: print it)."),
    plugins: list[str] = LOAD_PLUGIN,
    debug: bool = DEBUG,
) -> None:
    """Print the config format's JSON Schema (2020-12), for editors: layer types and their arguments,
    losses, optimizers, schedules, data sources, every section's keys and defaults."""
    def action() -> None:
        from nncli.errors import option_error
        from nncli.plugins import load_plugins
        from nncli.report.config_schema import schema_text

        load_plugins(plugins, Path.cwd(), option_error("--plugin"))
        _print_or_write(schema_text(), out, f"wrote {out}")

    run_command(action, debug)


@app.command()
def train(
    config: Path = CONFIG,
    overrides: list[str] = SET,
    epochs: Optional[int] = EPOCHS,
    out: Optional[Path] = typer.Option(None, "--out",
                                       help="Put the run directory under DIR (replaces checkpoint.dir)."),
    device: Optional[str] = DEVICE,
    quiet: bool = QUIET,
    nproc: Optional[int] = NPROC,
    debug: bool = DEBUG,
) -> None:
    """Train the config's model; write config, metrics and checkpoints to a run directory."""
    if nproc:
        def check() -> None:
            from nncli.config.overrides import with_epochs
            from nncli.run.setup import check_launch, load_config

            check_launch(load_config(config, with_epochs(overrides, epochs)), device, nproc)

        _check_then_launch(nproc, check, debug)  # exits with the job's status
        return

    def action() -> None:
        from nncli.report.console import make_reporter
        from nncli.run.train import train as train_run

        reporter = make_reporter(quiet)
        run = train_run(_load(config, overrides, epochs), reporter, device=device, out_dir=out)
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
    path: Path = typer.Argument(..., help="A run directory or checkpoint; or a plain state_dict file "
                                          "with --config.",
                                metavar="PATH"),
    config: Optional[Path] = typer.Option(None, "--config",
                                          help="A config: required to warm-start from a state_dict; for a "
                                               "run, its changes are checked."),
    overrides: list[str] = SET,
    epochs: Optional[int] = EPOCHS,
    warm: bool = typer.Option(False, "--warm-start",
                              help="Start a new run of --config from the checkpoint's weights only (no "
                                   "optimizer, schedule or epoch count)."),
    strict: bool = typer.Option(True, "--strict/--no-strict",
                                help="Warm start: refuse weights that do not all fit."),
    out: Optional[Path] = typer.Option(None, "--out",
                                       help="Continue in a new run directory under DIR (a warm start's, or a "
                                            "copy of the run's), leaving the run as it is."),
    device: Optional[str] = DEVICE,
    quiet: bool = QUIET,
    nproc: Optional[int] = NPROC,
    plugins: list[str] = PLUGIN,
    trusted: list[Path] = TRUST_DATA,
    debug: bool = DEBUG,
) -> None:
    """Continue a run exactly where it stopped, or warm-start a new run from plain weights."""
    def request():
        from nncli.run.resume import ResumeRequest

        return ResumeRequest(path, config, warm, tuple(overrides), epochs, strict, device, out,
                             _named(plugins, trusted))

    if nproc:
        def check() -> None:
            from nncli.run.resume import check_resume_launch

            check_resume_launch(request(), nproc)

        _check_then_launch(nproc, check, debug)  # exits with the job's status
        return

    def action() -> None:
        from nncli.report.console import make_reporter
        from nncli.run.resume import resume_or_warm_start

        reporter = make_reporter(quiet)
        run = resume_or_warm_start(request(), reporter)
        if run is not None:  # None: finished already, nothing trained, nothing saved
            _print_result(run, reporter)

    run_command(action, debug)


def _check_then_launch(nproc: int, check: Callable[[], None], debug: bool) -> None:
    """`train|resume ... --nproc N`: `check` the input once, here (every process would say what is
    wrong; their warnings are theirs to show), then run this command again, without --nproc, in
    N DDP processes (devices.launch)."""
    def action() -> int:
        from nncli.errors import ConfigError
        from nncli.run.devices import launch

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
    checkpoint: Path = CHECKPOINT,
    data: Optional[Path] = typer.Option(None, "--data",
                                        help="A data file (.csv, .npz), or a folder of class folders of "
                                             "images, to evaluate on, read with the run's data settings."),
    as_json: bool = JSON,
    device: Optional[str] = DEVICE,
    plugins: list[str] = PLUGIN,
    trusted: list[Path] = TRUST_DATA,
    debug: bool = DEBUG,
) -> None:
    """Loss and metrics of a trained model on its validation data, or on --data."""
    def action() -> None:
        import json

        from nncli.run.inference import evaluate_checkpoint

        results, source = evaluate_checkpoint(checkpoint, data, device, _named(plugins, trusted))
        if as_json:
            print(json.dumps(results))
            return
        per_class = results.pop("per_class", [])
        print(f"{source}: " + "  ".join(f"{k}={v:.4f}" for k, v in results.items()))
        if per_class:
            width = max(len(str(row["class"])) for row in per_class)
            print("per class:")
            for row in per_class:
                accuracy = "-" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
                print(f"  {str(row['class']):<{width}}  accuracy={accuracy}  samples={row['samples']}")

    run_command(action, debug)


@app.command()
def predict(
    checkpoint: Path = CHECKPOINT,
    inputs: str = typer.Option(..., "--input",
                               help="Inputs: a JSON list of samples, a .json, .csv, .npy or .npz file, an "
                                    "image file or a folder of images."),
    as_json: bool = JSON,
    device: Optional[str] = DEVICE,
    plugins: list[str] = PLUGIN,
    debug: bool = DEBUG,
) -> None:
    """The model's outputs for the given inputs, one row per input."""
    def action() -> None:
        import json

        from nncli.run.inference import predict_checkpoint

        rows = predict_checkpoint(checkpoint, inputs, device, _named(plugins, []))
        if as_json:
            print(json.dumps(rows))
            return
        for i, row in enumerate(rows):
            file = f" {row['file']}:" if "file" in row else ""
            label = f"  class={row['class']}" if "class" in row else ""
            print(f"{i}:{file} {[round(v, 6) for v in row['output']]}{label}")  # --json gives every digit

    run_command(action, debug)


@app.command()
def export(
    checkpoint: Path = CHECKPOINT,
    format: str = typer.Option(..., "--format", "-f",
                               help="torchscript, pt2, onnx, safetensors or state_dict."),
    out: Optional[Path] = typer.Option(None, "--out", help="The file to write (default: beside the "
                                       "checkpoint, e.g. best.onnx)."),
    which: str = typer.Option("best", "--checkpoint", help="A run directory's best or last checkpoint."),
    batch_size: int = typer.Option(8, "--batch-size", min=1,
                                   help="The batch the written file is checked on."),
    plugins: list[str] = PLUGIN,
    debug: bool = DEBUG,
) -> None:
    """Write the trained model as TorchScript, torch.export, ONNX, safetensors or a state_dict, and
    check that the written file gives the checkpoint model's outputs."""
    def action() -> None:
        from nncli.run.export import export_checkpoint

        done = export_checkpoint(checkpoint, format, out, batch_size=batch_size, checkpoint=which,
                                 named=_named(plugins, []))
        normalization = {"none": "", "folded in": "; input normalization folded in"}.get(
            done.normalization, f"; input normalization in {done.normalization}")
        print(f"exported {done.source} to {done.file} ({format}: {done.note}{normalization})")
        print(f"checked: on a batch of {done.batch}, its outputs are the checkpoint model's within "
              f"{done.difference:.2g} (limit {done.limit:.2g})")

    run_command(action, debug)


@app.command()
def plot(
    runs: list[Path] = typer.Argument(..., help="Run directories (or their metrics.csv files).",
                                      metavar="RUN..."),
    out: Path = typer.Option(Path("plot.png"), "--out", help="The PNG file to write."),
    debug: bool = DEBUG,
) -> None:
    """Plot runs' losses, validation metrics and learning rates per epoch, overlaid (matplotlib)."""
    def action() -> None:
        from nncli.report.plot import plot_runs

        panels = plot_runs(runs, out)
        print(f"wrote {out}: {', '.join(panels)} of {len(runs)} run{'s' if len(runs) > 1 else ''}")

    run_command(action, debug)


@app.command()
def codegen(
    config: Path = CONFIG,
    out: Optional[Path] = typer.Option(None, "--out", help="Write the script to FILE (default: print it)."),
    overrides: list[str] = SET,
    debug: bool = DEBUG,
) -> None:
    """Write the config's training as a standalone plain-PyTorch script (torch and numpy only)."""
    def action() -> None:
        from nncli.run.codegen import check_output, codegen

        if out is not None:
            check_output(out)
        _print_or_write(codegen(_load(config, overrides)), out,
                        f"wrote {out}: python {out} trains the config's model and saves model.pt")

    run_command(action, debug)


def _print_or_write(text: str, out: Optional[Path], written: str) -> None:
    """`text` on stdout, or into the file `out` (atomically), saying `written`."""
    if out is None:
        sys.stdout.write(text)
        return
    from nncli.files import write_text_atomic

    write_text_atomic(text, out)
    print(written)


def main() -> None:
    """`nncli`: run the command line as this process, which nncli owns (nncli.process)."""
    pause_collection_until_torch_imported()
    try:
        app(prog_name="nncli")  # also as `python -m nncli`: completion is installed for `nncli`
    except SystemExit as done:
        end_process(done.code)
    end_process(0)
