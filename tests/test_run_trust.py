"""Nothing runs from a checkpoint, and nothing a checkpoint names is read: its config's plugins are
imported only when the user gives them with --plugin, its data paths read only under a --trust-data
path; a config's own plugins are said before they run."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import TINY_REGRESSION, load, ok, run_nncli, train_config

# A layer plugin that also leaves a marker file when imported: proof of what ran.
PLUGIN = """
import pathlib
import nncli
from torch import nn

pathlib.Path({marker!r}).write_text("imported")


@nncli.register_layer(infer={{"in_features": -1}})
class PluginLinear(nn.Linear):
    pass
"""


@pytest.fixture(scope="module")
def plugin_run(tmp_path_factory) -> dict:
    """A run whose model uses a plugin layer (plugins/layers.py), and the marker that file writes."""
    root = tmp_path_factory.mktemp("plugin")
    marker = root / "layers-imported"
    (root / "plugins").mkdir()
    (root / "plugins" / "layers.py").write_text(PLUGIN.format(marker=str(marker)))
    text = ("plugins: [plugins/layers.py]\n"
            + TINY_REGRESSION.replace("{type: Linear,", "{type: PluginLinear,"))
    config, run = train_config(root, text, "plugged")
    marker.unlink()
    return {"root": root, "config": config, "run": run, "marker": marker}


def _hostile_copy(run: Path, folder: Path, **config_changes) -> Path:
    """The run's best.pt with its stored config edited (as a downloaded file could be): plugins or
    data paths of an attacker's choice; its config_dir set to `folder`."""
    ckpt = load(run / "best.pt")
    ckpt["config"].update(config_changes)
    ckpt["config_dir"] = str(folder)
    path = folder / "model.pt"
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("command", ["eval", "predict", "resume"])
def test_a_checkpoints_plugins_never_run(plugin_run, tmp_path, command):
    """A checkpoint whose config names an evil file beside it, an absolute path and an installed
    module: every command refuses it (exit 2), naming the plugins and --plugin; nothing is imported."""
    evil_marker = tmp_path / "PWNED"
    evil = f"import pathlib\npathlib.Path({str(evil_marker)!r}).write_text('ran')\n"
    (tmp_path / "helper.py").write_text(evil)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "evil.py").write_text(evil)
    (tmp_path / "evil_module.py").write_text(evil)  # importable: the command runs in tmp_path
    plugins = ["helper.py", str(tmp_path / "elsewhere" / "evil.py"), "evil_module"]
    model = _hostile_copy(plugin_run["run"], tmp_path, plugins=plugins)
    args = {"eval": [], "predict": ["--input", "[[0.5, 0.5]]"], "resume": ["--epochs", "5"]}[command]
    result = run_nncli(command, model, *args, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    err = result.stderr
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert ("helper.py, " in err and "evil_module" in err
            and "nncli imports no code that a checkpoint names" in err)
    assert "--plugin" in err and "plugins" in err
    assert not evil_marker.exists(), "a plugin named by the checkpoint ran"
    assert not plugin_run["marker"].exists()


def test_plugins_given_on_the_command_line_are_imported(plugin_run, tmp_path):
    """The plugins a run needs come from the user: --plugin imports the user's file (wherever the
    checkpoint says it was) and eval, predict and resume then work."""
    run, root = plugin_run["run"], plugin_run["root"]
    refused = run_nncli("eval", run, cwd=root)
    assert refused.returncode == 2 and "--plugin plugins/layers.py" in refused.stderr, refused.stderr
    assert not plugin_run["marker"].exists()

    evaluated = ok(run_nncli("eval", run, "--plugin", "plugins/layers.py", "--json", cwd=root))
    assert plugin_run["marker"].exists()  # the user's file, imported because they named it
    assert set(json.loads(evaluated.stdout)) == {"loss", "mae"}
    predicted = ok(run_nncli("predict", run, "--plugin", plugin_run["root"] / "plugins" / "layers.py",
                             "--input", "[[0.5, 0.5]]", "--json", cwd=root))
    assert predicted.stdout.startswith('[{"output": [')


def test_a_config_says_which_plugins_it_imports(plugin_run, cli):
    for command in ("validate", "summary"):
        result = cli(command, plugin_run["config"])
        assert result.exit_code == 0, result.stdout + result.stderr
        assert result.stderr == f"plugins: imported {plugin_run['root'] / 'plugins' / 'layers.py'} " \
                                "(Python code that the config names)\n"


def test_a_checkpoints_data_paths_are_not_read(tmp_path):
    """A checkpoint whose data path is /etc/passwd, a secret beside it, or a FIFO (which would hang
    whoever opens it): eval refuses at once (exit 2) without reading it, and says how to allow it."""
    config, run = train_config(tmp_path, TINY_REGRESSION, "tiny")
    secret = tmp_path / "secret.csv"
    secret.write_text("password,target\nhunter2,1\n")
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    for path, must_not_show in (("/etc/passwd", "root:"), (str(secret), "hunter2"), (str(fifo), None)):
        model = _hostile_copy(run, tmp_path, data={"source": "csv", "path": path, "target": "target",
                                                   "val_split": 0.5})
        result = run_nncli("eval", model, cwd=tmp_path, timeout=60)
        assert result.returncode == 2, result.stdout + result.stderr
        err = result.stderr
        assert f"data.path: the checkpoint names {Path(path).resolve()}" in err, err
        assert "--trust-data" in err and len(err.strip().splitlines()) == 1, err
        if must_not_show:
            assert must_not_show not in err + result.stdout


CSV_CONFIG = """
seed: 0
data: {source: csv, path: data/scores.csv, target: score, val_split: 0.25}
loss: MSELoss
metrics: [mae]
optimizer: {type: SGD, lr: 0.05}
train: {epochs: 2, batch_size: 8}
model:
  layers:
    - {type: Linear, out_features: 1}
"""


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("csv")
    (root / "data").mkdir()
    rows = [f"{i % 7},{i % 5},{(i % 7) * 2 + (i % 5) / 2}" for i in range(40)]
    (root / "data" / "scores.csv").write_text("hours,sleep,score\n" + "\n".join(rows) + "\n")
    config, run = train_config(root, CSV_CONFIG, "scores")
    return {"root": root, "config": config, "run": run}


def test_the_users_own_run_reads_its_data_once_named(csv_run):
    """Evaluating and resuming a run trained on a CSV file: refused until the user names the
    data's folder, with the option to add; then as before."""
    root, run = csv_run["root"], csv_run["run"]
    refused = run_nncli("eval", run, cwd=root)
    assert (refused.returncode == 2
            and "If it is your data, add --trust-data data." in refused.stderr), refused.stderr
    ok(run_nncli("eval", run, "--trust-data", "data", cwd=root))
    ok(run_nncli("eval", run, "--trust-data", root / "data" / "scores.csv", cwd=root))  # the file itself
    finished = ok(run_nncli("resume", run, "--trust-data", "data", cwd=root))
    assert finished.stdout.endswith(f"Extend it with: nncli resume {run} --trust-data data --epochs N\n")
    assert run_nncli("resume", run, cwd=root).returncode == 2


def test_predict_reads_no_path_of_the_checkpoint(csv_run, tmp_path):
    """predict takes a CSV's feature columns by name without opening the run's own CSV file (moved
    away here): columns in another order give the same outputs."""
    root, run = csv_run["root"], csv_run["run"]
    inputs = tmp_path / "inputs.csv"
    inputs.write_text("hours,sleep\n1,2\n3,4\n")
    swapped = tmp_path / "swapped.csv"
    swapped.write_text("sleep,hours\n2,1\n4,3\n")
    (root / "data" / "scores.csv").rename(root / "data" / "moved.csv")
    try:
        first = ok(run_nncli("predict", run, "--input", inputs, "--json", cwd=tmp_path)).stdout
        assert ok(run_nncli("predict", run, "--input", swapped, "--json", cwd=tmp_path)).stdout == first
    finally:
        (root / "data" / "moved.csv").rename(root / "data" / "scores.csv")
    ckpt = load(run / "best.pt")
    weight, bias = ckpt["model"]["0.weight"][0], ckpt["model"]["0.bias"][0]
    by_hand = [float(torch.tensor([1.0, 2.0]) @ weight + bias),
               float(torch.tensor([3.0, 4.0]) @ weight + bias)]
    assert [row["output"][0] for row in json.loads(first)] == pytest.approx(by_hand, rel=1e-6)


def test_a_checkpoints_run_directory_is_not_where_resume_writes(tmp_path):
    """A checkpoint on its own whose stored checkpoint.dir is a folder of an attacker's choice:
    resume goes on beside the file, and creates nothing where the checkpoint says."""
    config, run = train_config(tmp_path, TINY_REGRESSION, "tiny")
    target = tmp_path / "chosen-by-the-checkpoint"
    (tmp_path / "downloads").mkdir()
    ckpt = load(run / "last.pt")
    ckpt["config"]["checkpoint"]["dir"] = str(target)
    torch.save(ckpt, tmp_path / "downloads" / "model.pt")
    result = ok(run_nncli("resume", tmp_path / "downloads" / "model.pt", "--epochs", "4", cwd=tmp_path))
    assert f"in a new run directory: {tmp_path / 'downloads' / 'tiny'}" in result.stdout, result.stdout
    assert not target.exists()
    assert load(tmp_path / "downloads" / "tiny" / "last.pt")["epoch"] == 4
