"""nncli.data.augment against kornia.augmentation doing the same, on two cases, alternating in one
process, medians of `--repeats`:

  digits     the digits CNN's shape: the 1,437 training samples of digits.npz (val_split 0.2) in
             shuffled batches of 64 x 1 x 8 x 8, RandomCrop(8, padding=1) + RandomHorizontalFlip;
             Conv(1->32)+BN+ReLU+Conv(32->64)+BN+ReLU+MaxPool2+Flatten+Dropout+Linear(1024->10), AdamW
  synthetic  2,048 random 3 x 32 x 32 samples in batches of 512, RandomCrop(32, padding=4) +
             RandomHorizontalFlip + RandomErasing(p=0.25); a small 3-conv CNN, AdamW

Measured: samples/s of the augmentation alone (every batch of an epoch), and of a training epoch
without augmentation, with nncli's, and with kornia's; the epoch time augmentation adds (noisy on
a shared machine: see its spread), and the share of each epoch spent in the augmentation calls,
timed inside the epoch (the steadier measure of what augmentation costs).

kornia draws from torch's global generator and takes no generator of its own (`generator=`
raises), so it runs here the way nncli would have to run it to keep resume exact: inside
`torch.random.fork_rng`, with the run's generator's state put into the global one and taken back
after (a copy of a few KB each way, lost in the noise of these timings). The script also checks
that this replays kornia's output for a restored state.

  python bench/augment.py [--repeats 9] [--out bench/results/cpu-augment.md] [--device cpu]

kornia is not an nncli dependency: `pip install kornia` into the environment to compare (without
it, nncli's side alone is measured).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from nncli.data import augment as A  # noqa: E402 (after the checkout is put first on sys.path)

try:
    import kornia
    import kornia.augmentation as K
except ImportError:  # nncli's side alone
    kornia = K = None


def digits_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.25), nn.Linear(1024, 10))


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def case_data(case: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    if case == "digits":
        d = np.load(ROOT / "nncli" / "datasets" / "digits.npz")
        x, y = torch.from_numpy(d["images"]), torch.from_numpy(d["labels"])
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        keep = order[: len(x) - int(0.2 * len(x))]
        return x[keep], y[keep], 64
    g = torch.Generator().manual_seed(0)
    return torch.rand(2048, 3, 32, 32, generator=g), torch.randint(0, 10, (2048,), generator=g), 512


def ours(case: str) -> A.Pipeline:
    if case == "digits":
        return A.Pipeline([A.RandomCrop(8, padding=1), A.RandomHorizontalFlip()])
    return A.Pipeline([A.RandomCrop(32, padding=4), A.RandomHorizontalFlip(), A.RandomErasing(p=0.25)])


def kornias(case: str) -> nn.Module:
    if case == "digits":
        return nn.Sequential(K.RandomCrop((8, 8), padding=1), K.RandomHorizontalFlip())
    return nn.Sequential(K.RandomCrop((32, 32), padding=4), K.RandomHorizontalFlip(), K.RandomErasing(p=0.25))


def with_generator(aug: nn.Module, generator: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    """A kornia module drawing from `generator` rather than torch's global generator."""
    def apply(x: torch.Tensor) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(generator.get_state())
            out = aug(x)
            generator.set_state(torch.get_rng_state())
        return out
    return apply


def augmenters(case: str, generator: torch.Generator) -> dict[str, Callable | None]:
    pipeline = ours(case)
    variants: dict[str, Callable | None] = {"none": None, "nncli": lambda x, y: pipeline(x, y, generator)}
    if K is not None:
        k = with_generator(kornias(case), generator)
        variants["kornia"] = lambda x, y: (k(x), y)
    return variants


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batches(x: torch.Tensor, y: torch.Tensor, size: int, generator: torch.Generator):
    order = torch.randperm(len(x), generator=generator, device="cpu").to(x.device)
    for start in range(0, len(x), size):
        index = order[start:start + size]
        yield x[index], y[index]


def time_augmentation(aug: Callable, x: torch.Tensor, y: torch.Tensor, size: int,
                      device: torch.device) -> float:
    g = torch.Generator().manual_seed(1)
    data = list(batches(x, y, size, g))
    sync(device)
    start = time.perf_counter()
    for xb, yb in data:
        aug(xb, yb)
    sync(device)
    return time.perf_counter() - start


def time_epoch(model: nn.Module, opt: torch.optim.Optimizer, aug: Callable | None, x: torch.Tensor,
               y: torch.Tensor, size: int, device: torch.device) -> tuple[float, float]:
    """(the epoch's seconds, the seconds spent augmenting within it)."""
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(2)
    model.train()
    augmenting = 0.0
    sync(device)
    start = time.perf_counter()
    for xb, yb in batches(x, y, size, g):
        if aug is not None:
            sync(device)
            t = time.perf_counter()
            xb, yb = aug(xb, yb)
            sync(device)
            augmenting += time.perf_counter() - t
        opt.zero_grad(set_to_none=True)
        loss_fn(model(xb), yb).backward()
        opt.step()
    sync(device)
    return time.perf_counter() - start, augmenting


def each_transform(repeats: int, device: torch.device) -> list[str]:
    """Each transform alone on a batch of 512 x 3 x 32 x 32: samples/s, nncli's and kornia's
    (kornia's built when it is installed)."""
    pairs = {
        "RandomCrop(32, padding=4)": (A.RandomCrop(32, padding=4), lambda: K.RandomCrop((32, 32), padding=4)),
        "RandomHorizontalFlip()": (A.RandomHorizontalFlip(), lambda: K.RandomHorizontalFlip()),
        "RandomResizedCrop(32)": (A.RandomResizedCrop(32), lambda: K.RandomResizedCrop((32, 32))),
        "RandomErasing()": (A.RandomErasing(), lambda: K.RandomErasing()),
        "ColorJitter(0.4, 0.4, 0.4)": (A.ColorJitter(0.4, 0.4, 0.4),
                                       lambda: K.ColorJitter(0.4, 0.4, 0.4, p=1.0)),
        "Normalize(0.5, 0.25)": (A.Normalize(0.5, 0.25),
                                 lambda: K.Normalize(torch.tensor([0.5] * 3), torch.tensor([0.25] * 3))),
        "MixUp()": (A.MixUp(num_classes=10), None),
        "CutMix()": (A.CutMix(num_classes=10), None),
    }
    g = torch.Generator().manual_seed(4)
    x, y = torch.rand(512, 3, 32, 32, device=device), torch.randint(0, 10, (512,), device=device)

    def samples_per_s(f: Callable[[], object]) -> float:
        f()
        times = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            for _ in range(3):
                f()
            sync(device)
            times.append((time.perf_counter() - start) / 3)
        return 512 / statistics.median(times)

    lines = ["| transform, on 512 x 3 x 32 x 32 | nncli, samples/s | kornia, samples/s |", "|---|---|---|"]
    for name, (mine, theirs) in pairs.items():
        f = (lambda t=mine: t(x, y, g)) if mine.batch_level else (lambda t=mine: t(x, g))
        k = with_generator(theirs(), g) if theirs and K is not None else None
        kornia_sps = f"{samples_per_s(lambda k=k: k(x)):,.0f}" if k else "-"
        lines.append(f"| {name} | {samples_per_s(f):,.0f} | {kornia_sps} |")
    return lines


def check_kornia_generator_handling() -> list[str]:
    """What kornia does with generators, checked rather than read from its docs."""
    notes = []
    try:
        K.RandomHorizontalFlip(generator=torch.Generator())
        notes.append("kornia accepted generator= at construction")
    except TypeError:
        notes.append("kornia takes no generator: `generator=` raises TypeError at construction")
    x = torch.rand(16, 3, 32, 32)
    aug = kornias("synthetic")
    torch.manual_seed(0)
    a = aug(x)
    torch.manual_seed(0)
    b = aug(x)
    torch.manual_seed(1)
    c = aug(x)
    notes.append("kornia draws from torch's global generator: same global seed -> same output "
                 f"{torch.equal(a, b)}, another global seed -> another output {not torch.equal(a, c)}")
    g = torch.Generator().manual_seed(5)
    run = with_generator(aug, g)
    state = g.get_state()
    global_before = torch.get_rng_state()
    first = run(x)
    after = g.get_state()
    g.set_state(state)
    again = run(x)
    notes.append("inside fork_rng with the run's generator's state swapped in: a restored state replays "
                 f"the same output {torch.equal(first, again)}, the run's generator advances "
                 f"{not torch.equal(state, after)}, torch's global generator untouched "
                 f"{torch.equal(global_before, torch.get_rng_state())}")
    return notes


READING = "## Reading"  # where the results file's hand-written part begins


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    return f"{model or 'unknown CPU'}, {os.cpu_count()} CPU cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default=None, help="write the table here too (markdown)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--machine", default=None, help="the machine, in words, for the results' first line")
    args = parser.parse_args()
    device = torch.device(args.device)
    kornia_version = kornia.__version__ if kornia is not None else "not installed"
    header = (f"{datetime.date.today()}, {args.machine or machine()}; torch {torch.__version__}, kornia "
              f"{kornia_version}, device {device}, {torch.get_num_threads()} threads; {args.repeats} repeats "
              "alternating, medians")
    print(header, flush=True)
    rows = []
    for case in ("digits", "synthetic"):
        x, y, size = case_data(case)
        x, y = x.to(device), y.to(device)
        torch.manual_seed(0)
        build = digits_cnn if case == "digits" else small_cnn
        variants = augmenters(case, torch.Generator().manual_seed(3))
        models = {name: build().to(device) for name in variants}
        opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, m in models.items()}
        epoch = {name: [] for name in variants}
        inside = {name: [] for name in variants}  # share of the epoch spent augmenting
        alone = {name: [] for name in variants if name != "none"}
        epochs_per_timing = 3 if case == "digits" else 1
        for name in variants:  # warm-up
            time_epoch(models[name], opts[name], variants[name], x, y, size, device)
        for r in range(args.repeats):
            # rotate the order
            names = list(variants)[r % len(variants):] + list(variants)[:r % len(variants)]
            for name in names:
                timings = [time_epoch(models[name], opts[name], variants[name], x, y, size, device)
                           for _ in range(epochs_per_timing)]
                epoch[name].append(sum(t for t, _ in timings) / epochs_per_timing)
                inside[name].append(sum(a for _, a in timings) / sum(t for t, _ in timings))
                if name in alone:
                    alone[name].append(time_augmentation(variants[name], x, y, size, device))
        for name in variants:
            epoch_s = statistics.median(epoch[name])
            aug_s = statistics.median(alone[name]) if name in alone else None
            # the time added: the median of each repeat's ratio to that repeat's epoch without
            # augmentation (drift of a shared machine cancels), with its 25th-75th percentiles
            ratios = sorted(a / b - 1 for a, b in zip(epoch[name], epoch["none"]))
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
            rows.append((case, name, len(x) / aug_s if aug_s else None, len(x) / epoch_s, epoch_s,
                         (statistics.median(ratios), q[0], q[2]) if name != "none" else None,
                         statistics.median(inside[name]) if name != "none" else None))
        print(f"{case}: done", flush=True)
    lines = [header, "",
             ("| case | augmentation | augmentation alone, samples/s | training epoch, samples/s | epoch s | "
              "epoch time added (25th-75th pct.) | share of the epoch spent augmenting |"),
             "|---|---|---|---|---|---|---|"]
    for case, name, aug_sps, sps, epoch_s, added, share in rows:
        added_text = (f"{100 * added[0]:+.1f}% ({100 * added[1]:+.1f} to {100 * added[2]:+.1f})"
                      if added else "-")
        aug_text = f"{aug_sps:,.0f}" if aug_sps else "-"
        share_text = f"{100 * share:.1f}%" if share is not None else "-"
        lines.append(f"| {case} | {name} | {aug_text} | {sps:,.0f} | {epoch_s:.4f} | {added_text} "
                     f"| {share_text} |")
    lines += ["", *each_transform(args.repeats, device)]
    if K is not None:
        lines += ["", *[f"- {n}" for n in check_kornia_generator_handling()]]
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:  # keep the hand-written reading of the numbers, from READING on, if the file has one
        out = Path(args.out)
        old = out.read_text() if out.exists() else ""
        out.write_text(text + "\n" + (f"\n{old[old.index(READING):]}" if READING in old else ""))


if __name__ == "__main__":
    main()
