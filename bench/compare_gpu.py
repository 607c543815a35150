"""nncli against the hand-written ResNet-9 loop on a GPU, in one run, alternating, medians.

Runs reference_loop.py (--data images --model resnet9 --batch 512 --amp bf16 --channels-last,
with and without --compile) and nncli's loop on bench/configs/resnet9.yaml (the same settings,
with and without compile, and with compile plus the fused Adam kernel, `optimizer.fused: true`,
which the reference does not use), `--repeats` times each, and compares steady throughput
(images/s after the first epoch, which carries compilation and autotuning). Prints a markdown
table; ratios are nncli / the best reference (above 1: nncli is faster). Two more variants, run
only when named in --variants, keep the images on the host and read them with a DataLoader:
"reference dataloader compile" and "nncli dataloader compile".

  python bench/compare_gpu.py [--repeats 2] [--epochs 3] [--device cuda] [--n-train N]
                              [--variants "reference eager,nncli compile"] [--reference PATH]
"""
import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# ../shared beside a developer's checkout; on the device tool, a copy inside it (shared/ travels)
REFERENCES = [ROOT / "shared" / "bench" / "reference_loop.py",
              ROOT.parent / "shared" / "bench" / "reference_loop.py"]


def run(command: list[str]) -> dict[str, str]:
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    line = done.stdout.strip().splitlines()[-1]
    return dict(re.findall(r"(\w+)=(\S+)", line))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    # 97 whole batches of 512: no short last batch, for which both sides would compile again
    parser.add_argument("--n-train", type=int, default=97 * 512, help="training images")
    parser.add_argument("--variants", default=None, help="a comma-separated subset of the variants")
    parser.add_argument("--reference", type=Path, default=next((p for p in REFERENCES if p.exists()), None),
                        help="reference_loop.py (default: shared/bench/ in or beside the checkout)")
    args = parser.parse_args()
    if args.reference is None or not args.reference.exists():
        sys.exit(f"no reference loop: give --reference PATH, or copy ../shared into the checkout "
                 f"({REFERENCES[0]})")
    n_train = args.n_train
    ref = [sys.executable, str(args.reference), "--data", "images", "--model", "resnet9", "--batch", "512",
           "--epochs", str(args.epochs), "--device", args.device, "--amp", "bf16", "--channels-last",
           "--n-train", str(n_train)]
    ours = [sys.executable, "bench/nncli_fit.py", "bench/configs/resnet9.yaml", "--epochs", str(args.epochs),
            "--set", f"device={args.device}", "--set", f"data.n={n_train + 10_000}",  # 10,000 to validate
            "--set", f"data.val_split={10_000 / (n_train + 10_000)}"]
    variants = {
        "reference eager": ref, "reference compile": [*ref, "--compile"],
        "nncli eager": [*ours, "--set", "compile=false"], "nncli compile": ours,
        "nncli compile fused-adam": [*ours, "--set", "optimizer.fused=true"],
    }
    loaders = {  # the data on the host, read by a DataLoader, pinned, copied without blocking
        "reference dataloader compile": [*ref, "--compile", "--loader", "dataloader"],
        "nncli dataloader compile": [*ours, "--set", "data.loader=dataloader"],
    }
    if args.variants:
        known = {**variants, **loaders}
        variants = {name.strip(): known[name.strip()] for name in args.variants.split(",")}
    speeds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, command in variants.items():
            speeds[name].append(float(run(command)["steady_samples_per_s"]))
            print(f"{name}: {speeds[name][-1]:,.0f} images/s", flush=True)
    med = {name: statistics.median(v) for name, v in speeds.items()}
    references = [value for name, value in med.items() if name.startswith("reference")]
    best_ref = max(references) if references else float("nan")
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    print(f"\ndevice: {device}, torch {torch.__version__}, {n_train} images, batch 512, bf16, "
          f"channels_last, {args.epochs} epochs, {args.repeats} repeats\n")
    print("| variant | steady images/s (median) | / best reference |")
    print("|---|---|---|")
    for name, value in med.items():
        print(f"| {name} | {value:,.0f} | {value / best_ref:.3f} |")


if __name__ == "__main__":
    main()
