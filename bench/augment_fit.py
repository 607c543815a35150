"""Training samples/s through nncli's own loop (`fit`, as bench/nncli_fit.py times it: the epochs
only, no per-epoch validation) with and without `data.augment`, alternating in one process,
medians of `--repeats`. Where bench/augment.py times the transforms inside a loop written for
it, this is what a user's `nncli train` pays: the per-batch generator, uint8 pixels made floats
on the device, the transforms, then normalization. Also timed inside those epochs: the share of
each epoch spent augmenting (the per-batch generator and the transforms), the steadier measure on
a shared machine, where the difference of two epoch times is noisy.

  digits CNN   bench/configs/cnn_reference.yaml (the digits, 1,437 training samples, batches of 64),
               + RandomCrop(8, padding=1), RandomHorizontalFlip
  digits PNG   configs/images_folder.yaml on the digits written as PNG files (`source: images`:
               uint8 pixels, normalize: channel), + its RandomCrop(8, padding=1); needs Pillow
  synthetic    configs/synthetic_cifar_augment.yaml (2,048 x 3 x 32 x 32 in batches of 128, its EMA
               on in both), + RandomCrop(32, padding=4), RandomHorizontalFlip, RandomErasing(0.25)

  python bench/augment_fit.py [--repeats 5] [--epochs 3] [--out bench/results/cpu-augment-fit.md]
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from nncli.report.console import ConsoleReporter  # noqa: E402 (after the checkout is put first)
from nncli.run import loop  # noqa: E402
from nncli.run.setup import load_config, prepare_run  # noqa: E402

DIGITS_AUGMENT = "data.augment=[{type: RandomCrop, size: 8, padding: 1}, {type: RandomHorizontalFlip}]"


def cases(folder: Path | None) -> dict[str, tuple[Path, list[str], list[str]]]:
    """name -> (config, --set without augmentation, --set with it)."""
    found = {"digits CNN": (ROOT / "bench" / "configs" / "cnn_reference.yaml", [], [DIGITS_AUGMENT])}
    if folder is not None:
        root = f"data.root={folder}"
        found["digits PNG"] = (ROOT / "configs" / "images_folder.yaml", [root, "data.augment=[]"], [root])
    found["synthetic 3x32x32"] = (ROOT / "configs" / "synthetic_cifar_augment.yaml", ["data.augment=[]"], [])
    return found


def timed(function: Callable, spent: list[float]) -> Callable:
    """`function`, adding the seconds of each call to `spent` (on the CPU, calls are synchronous)."""
    def call(*args):
        start = time.perf_counter()
        result = function(*args)
        spent.append(time.perf_counter() - start)
        return result
    return call


def measure(config: Path, overrides: list[str], epochs: int) -> tuple[float, float]:
    """Training samples per second over `epochs` epochs of fit, validation left out, from the
    epochs' own times (time_s: the checkpoints written at the end are not counted); and the share
    of those epochs spent augmenting."""
    loaded = load_config(config, [*overrides, f"train.epochs={epochs}", "checkpoint.every=1000"])
    spent: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        run = prepare_run(loaded, device="cpu", run_dir=Path(out))
        run.val = None
        if run.augment is not None:
            run.augment = timed(run.augment, spent)
        generator = loop.augmentation_generator
        loop.augmentation_generator = timed(generator, spent)
        try:
            loop.fit(run, ConsoleReporter(quiet=True))
        finally:
            loop.augmentation_generator = generator
    seconds = sum(row["time_s"] for row in run.state.history)
    return len(run.data.train) * epochs / seconds, sum(spent) / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = None
        try:
            sys.path.insert(0, str(ROOT / "configs" / "data"))
            from digits_to_png import write_digits

            folder = write_digits(Path(tmp) / "digits_png")
        except ImportError:  # no Pillow: the image folder case is left out
            pass
        rows = []
        for name, (config, plain, augmented) in cases(folder).items():
            measure(config, augmented, 1)  # warm-up: first-call costs out of the timings
            without, with_, shares = [], [], []
            for _ in range(args.repeats):
                without.append(measure(config, plain, args.epochs)[0])
                speed, share = measure(config, augmented, args.epochs)
                with_.append(speed)
                shares.append(share)
            a, b = statistics.median(without), statistics.median(with_)
            rows.append(f"| {name} | {a:,.0f} | {b:,.0f} | {100 * (a / b - 1):+.1f}% | "
                        f"{100 * statistics.median(shares):.1f}% |")
            print(rows[-1], flush=True)
    header = (f"{datetime.date.today()}, {platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads; torch {torch.__version__}, "
              f"Python {platform.python_version()}, "
              f"device cpu; {args.epochs} epochs per measurement, medians of {args.repeats}, alternating\n\n"
              "| case | without augmentation, samples/s | with augmentation, samples/s | epoch time added "
              "| share of the epoch spent augmenting |\n|---|---|---|---|---|\n")
    text = header + "\n".join(rows) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
