"""Time nncli's training loop on a config, the way reference_loop.py times its own: the epochs
only (not imports, data preparation or set-up), and without per-epoch validation, which the
reference does not do. Prints one line of key=value pairs like reference_loop.py.

  python bench/nncli_fit.py bench/configs/mlp_reference.yaml [--epochs N]
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch

from nncli.report.console import ConsoleReporter as Reporter
from nncli.run.loop import evaluate, fit
from nncli.run.setup import load_config, prepare_run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE, as nncli train --set")
    args = parser.parse_args()
    config = load_config(args.config, [*args.set, *([f"train.epochs={args.epochs}"] if args.epochs else [])])
    with tempfile.TemporaryDirectory() as out:
        run = prepare_run(config, run_dir=Path(out))
        val, run.val = run.val, None  # the reference validates once, after training
        start = time.perf_counter()
        fit(run, Reporter(quiet=True))
        fit_s = time.perf_counter() - start
    acc = evaluate(run.model, val, run.loss_fn, ["accuracy"], 1024)["accuracy"]
    n_train, epoch_s = len(run.data.train), [row["time_s"] for row in run.state.history]
    # throughput after the first epoch, which carries warm-up (compilation, autotuning)
    steady = n_train * (len(epoch_s) - 1) / sum(epoch_s[1:]) if len(epoch_s) > 1 else float("nan")
    print(f"name=nncli config={args.config} device={run.device} epochs={run.epochs} n_train={n_train} "
          f"fit_s={fit_s:.4f} samples_per_s={n_train * run.epochs / fit_s:.1f} "
          f"first_epoch_s={epoch_s[0]:.4f} steady_samples_per_s={steady:.1f} val_acc={acc:.4f} "
          f"torch={torch.__version__}", flush=True)


if __name__ == "__main__":
    main()
