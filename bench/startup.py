"""How long nncli's short commands take as whole processes: `--help`, `train --help`, and
`validate` / `summary` of a config, each started fresh `--repeats` times, alternating with
`python -c "import torch"` (what any PyTorch program pays first), medians printed.

  python bench/startup.py [--repeats 11] [--config configs/digits_cnn.yaml] [--checkout PATH]

`--checkout PATH` times another checkout of nncli (an older commit, for a before/after figure)
in the same run, alternating with this one.
"""
import argparse
import compileall
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def seconds(command: list[str], checkout: Path) -> float:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    start = time.perf_counter()
    done = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"failed in {checkout}: {' '.join(command)}\n{done.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--config", default="configs/digits_cnn.yaml")
    parser.add_argument("--checkout", type=Path, help="another nncli checkout, timed alongside")
    args = parser.parse_args()
    nncli = [sys.executable, "-m", "nncli"]
    commands = {
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        "nncli --help": [*nncli, "--help"],
        "nncli train --help": [*nncli, "train", "--help"],
        f"nncli validate {args.config}": [*nncli, "validate", args.config],
        f"nncli summary {args.config}": [*nncli, "summary", args.config],
    }
    checkouts = {"this checkout": ROOT}
    if args.checkout:
        checkouts[str(args.checkout)] = args.checkout.resolve()
    for path in checkouts.values():  # bytecode as an install leaves it (see compare_cpu.py)
        compileall.compile_dir(path / "nncli", quiet=1)
    times = {(name, where): [] for name in commands for where in checkouts}
    for _ in range(args.repeats):
        for name, command in commands.items():
            for where, path in checkouts.items():
                times[name, where].append(seconds(command, path))
    print(f"{args.repeats} fresh processes each, alternating; medians in seconds\n")
    print("| command | " + " | ".join(checkouts) + " |")
    print("|---|" + "---|" * len(checkouts))
    for name in commands:
        medians = [f"{statistics.median(times[name, where]):.3f}" for where in checkouts]
        print(f"| `{name}` | " + " | ".join(medians) + " |")


if __name__ == "__main__":
    main()
