"""A compact text chart of a run's losses per epoch, for the end of `nncli train` on a terminal
(no plotting package needed)."""
from __future__ import annotations

import math

MARKS = {"train_loss": "•", "val_loss": "∘"}
BOTH = "◉"  # two series in one cell


def loss_chart(history: list[dict], width: int = 60, height: int = 8) -> list[str]:
    """The lines of a chart of train_loss and val_loss (where the history has it) against the
    epoch: one column per epoch, or per group of epochs (their mean) beyond `width`; a log scale
    when the losses span a factor of 10 or more. [] for fewer than 2 epochs or no finite loss."""
    series = {name: [row.get(name) for row in history] for name in MARKS
              if any(name in row for row in history)}
    values = [v for points in series.values() for v in points if v is not None and math.isfinite(v)]
    if len(history) < 2 or not values:
        return []
    log = min(values) > 0 and max(values) / min(values) >= 10
    scale = math.log10 if log else (lambda v: v)
    low, high = scale(min(values)), scale(max(values))
    span = (high - low) or 1.0
    columns = min(width, len(history))
    grid = [[" "] * columns for _ in range(height)]
    for name, points in series.items():
        for column in range(columns):
            bucket = [v for v in points[column * len(points) // columns:(column + 1) * len(points) // columns]
                      if v is not None and math.isfinite(v)]
            if not bucket:
                continue
            value = scale(sum(bucket) / len(bucket))
            row = height - 1 - round((value - low) / span * (height - 1))
            grid[row][column] = BOTH if grid[row][column] not in (" ", MARKS[name]) else MARKS[name]
    top, bottom = f"{max(values):.3g}", f"{min(values):.3g}"
    pad = max(len(top), len(bottom))
    legend = "  ".join(f"{mark} {name}" for name, mark in MARKS.items() if name in series)
    lines = [f"Losses ({legend}{', log scale' if log else ''})"]
    for i, cells in enumerate(grid):
        label = top if i == 0 else bottom if i == height - 1 else ""
        lines.append(f"{label:>{pad}} {'┤' if label else '│'}{''.join(cells)}".rstrip())
    first, last = str(history[0]["epoch"]), str(history[-1]["epoch"])
    lines.append(f"{'':>{pad}} └{'─' * columns}")
    lines.append(f"{'':>{pad}}  {first}{last:>{max(columns - len(first), len(last) + 1)}}  epoch")
    return lines
