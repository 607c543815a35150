"""`nncli plot` (several runs' metrics.csv as one PNG) and the text chart of the losses that
`nncli train` prints at the end on a terminal."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import ENV, nncli_argv, train_config

from nncli.report.chart import MARKS, loss_chart

RUN = """
    seed: {seed}
    data: {{source: synthetic, kind: classification, n: 80, features: 4, classes: 3}}
    optimizer: {{type: SGD, lr: 0.1, groups: [{{name: bias, params: "*.bias", lr: 0.05}}]}}
    schedule: {{type: StepLR, step_size: 1, gamma: 0.5}}
    train: {{epochs: 4, batch_size: 16}}
    model: {{layers: [{{type: Linear, out_features: 8}}, ReLU, {{type: Linear, out_features: 3}}]}}
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    return [train_config(folder, RUN.format(seed=seed), f"run{seed}")[1] for seed in (0, 1)]


def test_plot_overlays_runs_into_a_png(cli, tmp_path, runs):
    image = pytest.importorskip("matplotlib.image")
    out = tmp_path / "curves.png"
    result = cli("plot", *runs, "--out", out)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"wrote {out}: losses, validation metrics, learning rate of 2 runs\n"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    pixels = image.imread(out)
    assert pixels.shape[:2] == (400, 1500)  # three 5x4-inch panels at 100 dpi
    assert pixels.reshape(-1, pixels.shape[-1]).std(0).max() > 0.05  # lines drawn, not a blank page


def test_plot_refuses_what_is_not_a_run(cli, tmp_path, runs):
    result = cli("plot", runs[0], tmp_path, "--out", tmp_path / "p.png")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {tmp_path}: RUN: has no metrics.csv")
    result = cli("plot", runs[0], "--out", tmp_path / "p.jpg")
    assert result.exit_code == 2 and "must be a .png file" in result.stderr
    assert not (tmp_path / "p.png").exists()


def test_plot_without_matplotlib_names_the_extra(cli, tmp_path, runs, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    result = cli("plot", runs[0], "--out", tmp_path / "p.png")
    assert result.exit_code == 2
    assert "nncli plot needs matplotlib" in result.stderr and "pip install 'nncli[plot]'" in result.stderr


def _column_of_marks(lines: list[str], mark: str) -> list[int]:
    """The row (0: top) of `mark` in each column of the chart's grid."""
    grid = [line.split("┤" if "┤" in line else "│", 1)[1] for line in lines[1:-2]]
    return [next(row for row, cells in enumerate(grid) if len(cells) > c and cells[c] in (mark, "◉"))
            for c in range(max(len(cells) for cells in grid))]


def test_the_text_chart_follows_the_losses():
    history = [{"epoch": e, "train_loss": 1.0 - 0.1 * e, "val_loss": 0.5} for e in range(1, 9)]
    lines = loss_chart(history, height=8)
    assert lines[0] == f"Losses ({MARKS['train_loss']} train_loss  {MARKS['val_loss']} val_loss)"
    assert len(lines) == 1 + 8 + 2
    rows = _column_of_marks(lines, MARKS["train_loss"])
    assert rows[0] == 0 and rows[-1] == 7 and rows == sorted(rows)  # down from the top to the bottom
    assert lines[1].startswith("0.9 ┤") and lines[8].startswith("0.2 ┤")
    assert lines[-1].split() == ["1", "8", "epoch"]


def test_the_text_chart_fits_long_runs_and_spans_on_a_log_scale():
    history = [{"epoch": e, "train_loss": 10.0 ** -(e / 100)} for e in range(1, 501)]
    lines = loss_chart(history, width=50)
    assert lines[0].endswith(", log scale)") and "val_loss" not in lines[0]
    assert max(len(line.split("┤" if "┤" in line else "│", 1)[1]) for line in lines[1:-2]) == 50
    assert loss_chart(history[:1]) == [] and loss_chart([{"epoch": 1}, {"epoch": 2}]) == []


def _on_a_terminal(*args, cwd) -> str:
    """`python -m nncli ARGS` with a pseudo-terminal as its output; what it printed."""
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen(nncli_argv(*args), cwd=cwd, env=ENV, stdin=follower, stdout=follower,
                            stderr=follower)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the process closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert proc.wait(timeout=240) == 0, out.decode(errors="replace")
    return out.decode()


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_train_prints_the_chart_on_a_terminal_only(tmp_path, runs):
    config = runs[0].parent.parent / "run0.yaml"
    plain = subprocess.run(nncli_argv("train", config, "--out", tmp_path / "again"), env=ENV, cwd=tmp_path,
                           capture_output=True, text=True, timeout=240)
    assert plain.returncode == 0 and "Metrics (* best)" in plain.stdout and "Losses (" not in plain.stdout
    shown = _on_a_terminal("train", config, "--out", tmp_path / "tty", cwd=tmp_path)
    assert "Metrics (* best)" in shown
    assert f"Losses ({MARKS['train_loss']} train_loss  {MARKS['val_loss']} val_loss)" in shown
