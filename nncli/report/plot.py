"""`nncli plot`: runs' metrics.csv drawn per epoch, several runs overlaid, as one PNG.

Three panels side by side: the losses (train solid, validation dashed), the validation metrics
(one line style per metric), and the learning rates (each parameter group's, on a log scale).
A run keeps its colour in every panel. matplotlib (the `plot` extra) draws it off-screen (Agg).
"""
from __future__ import annotations

import io
from pathlib import Path

from nncli.errors import ConfigError
from nncli.files import write_atomic
from nncli.report.loggers import MetricsCsv, read_history

LINE_STYLES = ["-", "--", ":", "-."]


def run_histories(paths: list[Path]) -> dict[str, list[dict]]:
    """Each run's metrics.csv rows by the run's name (a run directory, or its metrics.csv); the
    parent folder is added to names that two runs share."""
    found: dict[Path, list[dict]] = {}
    for path in paths:
        csv_path = path / MetricsCsv.FILE if path.is_dir() else path
        if not csv_path.is_file():
            raise ConfigError(f"has no {MetricsCsv.FILE}: expected a run directory or a metrics.csv",
                              file=str(path), key="RUN")
        rows = read_history(csv_path, rows=10**12)
        if not rows:
            raise ConfigError("is not a metrics.csv with rows that nncli wrote", file=str(csv_path),
                              key="RUN")
        found[csv_path.parent.resolve()] = rows
    names = [folder.name for folder in found]
    return {(f"{folder.parent.name}/{folder.name}" if names.count(folder.name) > 1 else folder.name): rows
            for folder, rows in found.items()}


def plot_runs(paths: list[Path], out: Path) -> list[str]:
    """Draw the runs into the PNG `out` (written atomically); the panels drawn, by title."""
    if out.suffix.lower() != ".png":
        raise ConfigError("must be a .png file", file=str(out), key="--out")
    histories = run_histories(paths)
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("nncli plot needs matplotlib", key="plot",
                          hint="Install the extra: pip install 'nncli[plot]'.") from None
    matplotlib.use("Agg")  # no display: a file
    from matplotlib import pyplot as plt

    panels = {"losses": lambda key: key in ("train_loss", "val_loss"),
              "validation metrics": lambda key: key.startswith("val_") and key != "val_loss",
              "learning rate": lambda key: key.startswith("lr_")}
    shown = [title for title, wanted in panels.items()
             if any(wanted(key) for rows in histories.values() for row in rows for key in row)]
    figure, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, title in zip(axes[0], shown):
        for i, (name, rows) in enumerate(histories.items()):
            keys = list(dict.fromkeys(key for row in rows for key in row if panels[title](key)))
            for style, key in zip(LINE_STYLES * len(keys), keys):
                points = [(row["epoch"], row[key]) for row in rows if key in row]
                label = name if len(keys) == 1 and len(histories) > 1 else f"{name} {key}"
                ax.plot(*zip(*points), linestyle=style, color=colours[i % len(colours)], label=label,
                        marker="." if len(points) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        values = [line.get_ydata() for line in ax.get_lines()]
        low, high = min(min(v) for v in values), max(max(v) for v in values)
        if title == "learning rate" or (title == "losses" and low > 0 and high / low >= 10):
            ax.set_yscale("log")  # rates and losses that span orders of magnitude
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    write_atomic(buffer.getvalue(), out)
    return shown
