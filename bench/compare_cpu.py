"""nncli against the hand-written reference loops on CPU, in one run, alternating, medians.

For each case it runs, `--repeats` times and alternating:
  - reference_loop.py (fit_s: the epochs only) and bench/nncli_fit.py (the same measure for
    nncli's `fit`), and
  - the whole processes: `python reference_loop.py ...` and `nncli train CONFIG --quiet`
    (imports, data, model, training, nncli's per-epoch validation and checkpoint writes).
Writes bench/results/cpu.json (or --out) and prints a markdown table of medians and ratios (nncli / reference;
below 1 means nncli is faster): the ratio of the medians, and the median of the ratios of
each alternating pair, which holds when the machine's speed drifts during the run.

  python bench/compare_cpu.py [--repeats 5] [--cases mlp,cnn,synthetic,mlp_fused,...] [--process-only]

The *_fused cases run nncli with `optimizer.fused: true` (torch's fused Adam kernel) against the
same reference loop, which uses torch's default Adam: what one config line buys. The
*_dataloader cases run both with their DataLoader: `reference_loop.py --loader dataloader` and
nncli's `data.loader: dataloader`.
"""
import argparse
import compileall
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "bench" / "reference_loop.py"
MLP = ["--model", "mlp", "--loader", "slice", "--epochs", "20"]
CNN = ["--model", "cnn", "--loader", "slice", "--epochs", "20"]
FUSED = ["--set", "optimizer.fused=true"]  # torch's fused Adam kernel, which the reference does not use
# the reference's torch DataLoader (a TensorDataset read sample by sample) against nncli's
MLP_DL = ["--model", "mlp", "--loader", "dataloader", "--epochs", "20"]
CNN_DL = ["--model", "cnn", "--loader", "dataloader", "--epochs", "20"]
DATALOADER = ["--set", "data.loader=dataloader"]
# case: (reference_loop.py arguments, nncli config, nncli --set arguments)
CASES = {
    "mlp": (MLP, "bench/configs/mlp_reference.yaml", []),
    "cnn": (CNN, "bench/configs/cnn_reference.yaml", []),
    "synthetic": (["--data", "synthetic", "--loader", "slice", "--epochs", "2", "--batch", "256"],
                  "bench/configs/synthetic_reference.yaml", []),
    "mlp_fused": (MLP, "bench/configs/mlp_reference.yaml", FUSED),
    "cnn_fused": (CNN, "bench/configs/cnn_reference.yaml", FUSED),
    "mlp_dataloader": (MLP_DL, "bench/configs/mlp_reference.yaml", DATALOADER),
    "cnn_dataloader": (CNN_DL, "bench/configs/cnn_reference.yaml", DATALOADER),
}


def timed(command: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{done.stderr}")
    return elapsed, done.stdout


def field(output: str, key: str) -> float:
    return float(re.search(rf"\b{key}=([0-9.]+)", output).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--process-only", action="store_true",
                        help="whole processes only (skip the fit_s measurement)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu.json",
                        help="raw figures (JSON)")
    args = parser.parse_args()
    # nncli's bytecode as an install leaves it (pip compiles it; PYTHONDONTWRITEBYTECODE would
    # otherwise have every process compile nncli's sources again, which no user's does)
    compileall.compile_dir(ROOT / "nncli", quiet=1)
    results = {}
    for case in args.cases.split(","):
        ref_args, config, sets = CASES[case]
        samples = {"ref_fit": [], "nncli_fit": [], "ref_process": [], "nncli_process": [],
                   "ref_acc": [], "nncli_acc": []}
        for _ in range(args.repeats):
            if not args.process_only:
                _, out = timed([sys.executable, "bench/nncli_fit.py", config, *sets])
                samples["nncli_fit"].append(field(out, "fit_s"))
                samples["nncli_acc"].append(field(out, "val_acc"))
            elapsed, out = timed([sys.executable, str(REFERENCE), *ref_args])
            samples["ref_process"].append(elapsed)
            samples["ref_fit"].append(field(out, "fit_s"))
            samples["ref_acc"].append(field(out, "val_acc"))
            with tempfile.TemporaryDirectory() as out_dir:
                elapsed, _ = timed([sys.executable, "-m", "nncli", "train", config, *sets, "--quiet",
                                    "--out", out_dir])
            samples["nncli_process"].append(elapsed)
        med = {k: statistics.median(v) if v else float("nan") for k, v in samples.items()}
        pairs = [ours / ref for ours, ref in zip(samples["nncli_process"], samples["ref_process"])]
        results[case] = {"median": med, "samples": samples,
                         "fit_ratio": med["nncli_fit"] / med["ref_fit"],
                         "process_ratio": med["nncli_process"] / med["ref_process"],
                         "process_pair_ratio": statistics.median(pairs)}
        print(f"{case}: fit {med['nncli_fit']:.3f}s vs {med['ref_fit']:.3f}s "
              f"(x{results[case]['fit_ratio']:.3f}); process {med['nncli_process']:.2f}s vs "
              f"{med['ref_process']:.2f}s (x{results[case]['process_ratio']:.3f}, pairs "
              f"x{results[case]['process_pair_ratio']:.3f})", flush=True)
    device = {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
              "cpus": torch.get_num_threads(), "torch": torch.__version__,
              "python": platform.python_version()}
    args.out.write_text(json.dumps({"device": device, "repeats": args.repeats, "results": results}, indent=2))
    print(f"\ndevice: {device}\n")
    print("| case | reference fit_s | nncli fit_s | ratio | reference process s | nncli train process s "
          "| ratio of medians | median of pair ratios | val acc (ref / nncli fit) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case, r in results.items():
        m = r["median"]
        print(f"| {case} | {m['ref_fit']:.3f} | {m['nncli_fit']:.3f} | {r['fit_ratio']:.3f} | "
              f"{m['ref_process']:.2f} | {m['nncli_process']:.2f} | {r['process_ratio']:.3f} | "
              f"{r['process_pair_ratio']:.3f} | {m['ref_acc']:.4f} / {m['nncli_acc']:.4f} |")


if __name__ == "__main__":
    main()
