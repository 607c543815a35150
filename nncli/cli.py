"""The `nncli` command line: each command parses its options, calls the library, and prints.

torch is imported inside the commands that need it, so `nncli --help` answers at once.
"""
from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Callable, Optional

import typer

app = typer.Typer(help="Train PyTorch networks described in YAML.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode="rich", context_settings={"help_option_names": ["-h", "--help"]})

ConfigArg = typer.Argument(..., help="The YAML config file.", show_default=False)
DebugOpt = typer.Option(False, "--debug", help="Show the Python traceback of an error.")


def run_command(action: Callable[[], Optional[int]], debug: bool) -> None:
    """Run a command body: nncli errors become one paragraph on stderr and an exit status
    (2 bad input, 1 failure, 130 interrupted); other exceptions too, traceback only with --debug."""
    from nncli.errors import NncliError

    try:
        code = action() or 0
    except NncliError as err:
        if debug:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("interrupted", file=sys.stderr)
        raise typer.Exit(130) from None
    except Exception as err:
        if debug:
            traceback.print_exc()
        print(f"error: {type(err).__name__}: {err} (run again with --debug for the traceback)",
              file=sys.stderr)
        raise typer.Exit(1) from None
    raise typer.Exit(code)


def _console():
    from rich.console import Console

    return Console(highlight=False)


@app.command()
def summary(
    config: Path = ConfigArg,
    depth: Optional[int] = typer.Option(None, "--depth", min=0, help="Collapse blocks nested deeper than N."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Shapes and memory for a batch of N."),
    params: bool = typer.Option(False, "--params", help="Also list every named parameter."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    overrides: list[str] = typer.Option([], "--set", help="Override a config value: KEY=VALUE."),
    debug: bool = DebugOpt,
) -> None:
    """Print each layer's output shape, parameters and MACs, without allocating weights."""
    def action() -> None:
        import json

        from nncli.config import load_config
        from nncli.model import plan_model
        from nncli.summary import print_parameters, print_summary, summarize

        cfg = load_config(config, overrides)
        plan = plan_model(cfg, batch_size=batch_size)
        result = summarize(plan, depth)
        if as_json:
            print(json.dumps(result, indent=2))
            return
        console = _console()
        print_summary(result, console, title=f"{cfg['name']} ({config})")
        if params:
            print_parameters(plan, console)

    run_command(action, debug)


@app.command()
def validate(
    config: Path = ConfigArg,
    overrides: list[str] = typer.Option([], "--set", help="Override a config value: KEY=VALUE."),
    debug: bool = DebugOpt,
) -> None:
    """Check a config without training: prints `ok` and a one-line summary, or the error."""
    def action() -> None:
        from nncli.config import load_config
        from nncli.model import describe_shape, plan_model

        cfg = load_config(config, overrides)
        plan = plan_model(cfg)
        total = sum(p.numel() for p in plan.meta_model.parameters())
        print(f"ok: {config}: {len(list(plan.walk()))} layers, {total:,} parameters, input "
              f"{list(plan.input_shape)} -> output {describe_shape(plan.output_shape[1:])}")

    run_command(action, debug)


@app.command()
def layers(
    name: Optional[str] = typer.Argument(None, help="A layer type: show its arguments."),
    debug: bool = DebugOpt,
) -> None:
    """List the layer registry by category, or one layer's arguments."""
    def action() -> None:
        from nncli.layer_docs import print_layer, print_registry

        console = _console()
        if name:
            print_layer(name, console)
        else:
            print_registry(console)

    run_command(action, debug)


def main() -> None:
    app()
