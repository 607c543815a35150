"""nncli's training loop against reference_loop.py's, alternating in ONE process: less noise.

compare_cpu.py starts a fresh process per measurement, whose timing moves by a few percent from
one start to the next (CPU frequency, memory placement); that noise is as large as the 5% target.
Here both loops run in the same interpreter, alternating, `--repeats` times: reference_loop.py's
own main() (through runpy, reading the fit_s it prints) and nncli's `fit` on the matching config,
timed the same way (epochs only, no per-epoch validation; nncli's checkpoint writes included).
Prints the medians, the ratio nncli / reference and the ratios' spread.

  python bench/compare_inprocess.py [--repeats 21] [--cases mlp,cnn,mlp_fused,mlp_loader_vs_slice,cnn_loader_vs_slice]
"""  # noqa: E501 -- the usage line is --help's text (description=__doc__), kept as it is
import argparse
import contextlib
import gc
import io
import re
import runpy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# E402: run as `python bench/compare_inprocess.py`, sys.path[0] is bench/; the checkout's nncli
# can only be imported once the line above has put the checkout's root first on sys.path.
from nncli.report.console import ConsoleReporter as Reporter  # noqa: E402
from nncli.run.loop import fit  # noqa: E402
from nncli.run.setup import load_config, prepare_run  # noqa: E402

REFERENCE = ROOT.parent / "shared" / "bench" / "reference_loop.py"
CASES = {  # case: (reference_loop.py arguments, nncli config, nncli --set overrides)
    "mlp": (["--model", "mlp", "--loader", "slice", "--epochs", "20"],
            "bench/configs/mlp_reference.yaml", []),
    "cnn": (["--model", "cnn", "--loader", "slice", "--epochs", "20"],
            "bench/configs/cnn_reference.yaml", []),
    "mlp_fused": (["--model", "mlp", "--loader", "slice", "--epochs", "20"],
                  "bench/configs/mlp_reference.yaml", ["optimizer.fused=true"]),
    # nncli's `loader: dataloader` against the hand-written slicing loop: what the DataLoader costs
    "mlp_loader_vs_slice": (["--model", "mlp", "--loader", "slice", "--epochs", "20"],
                            "bench/configs/mlp_reference.yaml", ["data.loader=dataloader"]),
    "cnn_loader_vs_slice": (["--model", "cnn", "--loader", "slice", "--epochs", "20"],
                            "bench/configs/cnn_reference.yaml", ["data.loader=dataloader"]),
}


def reference_fit_s(args: list[str]) -> float:
    out = io.StringIO()
    argv, sys.argv = sys.argv, [str(REFERENCE), *args]
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(str(REFERENCE), run_name="__main__")
    finally:
        sys.argv = argv
    return float(re.search(r"\bfit_s=([0-9.]+)", out.getvalue()).group(1))


def nncli_fit_s(config_path: str, overrides: list[str]) -> float:
    config = load_config(ROOT / config_path, overrides)
    with tempfile.TemporaryDirectory() as out:
        run = prepare_run(config, run_dir=Path(out))
        run.val = None  # the reference validates once, after training
        start = time.perf_counter()
        fit(run, Reporter(quiet=True))
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--cases", default="mlp,cnn")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats, "
          "alternating\n")
    print("| case | reference fit_s (median) | nncli fit_s (median) | ratio of medians "
          "| ratio, 25th-75th percentile of pairs |")
    print("|---|---|---|---|---|")
    for case in args.cases.split(","):
        ref_args, config, overrides = CASES[case]
        reference_fit_s(ref_args), nncli_fit_s(config, overrides)  # warm-up: first-call costs
        # A full collection scans torch's objects (about 0.1 s): frozen, they are not, and the
        # garbage of one run is collected before the next starts, so neither loop pays for the other.
        gc.collect()
        gc.freeze()
        ref, ours = [], []
        for _ in range(args.repeats):
            gc.collect()
            ref.append(reference_fit_s(ref_args))
            gc.collect()
            ours.append(nncli_fit_s(config, overrides))
        pairs = sorted(o / r for o, r in zip(ours, ref))
        q = statistics.quantiles(pairs, n=4)
        print(f"| {case} | {statistics.median(ref):.4f} | {statistics.median(ours):.4f} | "
              f"{statistics.median(ours) / statistics.median(ref):.3f} | {q[0]:.3f}-{q[2]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
