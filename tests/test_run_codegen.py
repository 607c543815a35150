"""`nncli codegen`: the script it writes imports no nncli, runs in an empty folder, and trains the
same weights as `nncli train`, bit for bit on the CPU (last.pt's model against the script's model.pt)."""
from __future__ import annotations

import ast
from importlib import resources

import numpy as np
import pytest
import torch
from helpers import CONFIGS, load, ok, run_nncli, run_python, write_config

# Run the script with nncli made unimportable: it must not need it.
WITHOUT_NNCLI = ("import sys, runpy; sys.modules['nncli'] = None; "
                 "runpy.run_path('train.py', run_name='__main__')")
ALLOWED_IMPORTS = {"__future__", "math", "random", "collections", "numpy", "torch", "csv", "importlib", "sys",
                   "types"}


def same_weights_as_nncli(cli, tmp_path, config, *overrides):
    """Train `config` with nncli, write its script, run the script in an empty folder; the two sets
    of weights must be equal. Both train in a subprocess with the same environment (one thread:
    torch's CPU kernels may sum in another order with another number of threads). The script's
    text."""
    sets = [arg for override in overrides for arg in ("--set", override)]
    ok(run_nncli("train", config, "--out", tmp_path / "runs", "-q", *sets, cwd=tmp_path))
    nncli_weights = load(next((tmp_path / "runs").iterdir()) / "last.pt")["model"]
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("codegen", config, "--out", empty / "train.py", *sets)
    assert result.exit_code == 0, result.stderr
    script_path = empty / "train.py"
    assert result.stdout == f"wrote {script_path}: python {script_path} trains the config's model " \
                            "and saves model.pt\n"
    script = (empty / "train.py").read_text()
    imported = {(node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
                for node in ast.walk(ast.parse(script)) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names}
    assert imported <= ALLOWED_IMPORTS, imported
    run = ok(run_python("-c", WITHOUT_NNCLI, cwd=empty))
    assert run.stdout.rstrip().endswith("saved: model.pt")
    script_weights = torch.load(empty / "model.pt", weights_only=True)
    assert script_weights.keys() == nncli_weights.keys()
    for key in nncli_weights:
        assert torch.equal(script_weights[key], nncli_weights[key]), key
    return script


def test_the_linear_regression(cli, tmp_path):
    script = same_weights_as_nncli(cli, tmp_path, CONFIGS / "linear_regression.yaml", "train.epochs=100")
    assert "loss_fn = nn.MSELoss(reduction='sum')" in script
    assert "torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)" in script


def test_the_digits_mlp_from_an_npz_normalized(cli, tmp_path):
    with resources.files("nncli").joinpath("datasets", "digits.npz").open("rb") as f:
        digits = np.load(f)
        np.savez(tmp_path / "digits.npz", images=digits["images"], labels=digits["labels"])
    config = write_config(tmp_path, """
        seed: 3
        data: {source: npz, path: digits.npz, x: images, y: labels, val_split: 0.2, normalize: true}
        loss: CrossEntropyLoss
        metrics: [accuracy, top3]
        optimizer: {type: Adam, lr: 1.0e-3}
        train: {epochs: 2, batch_size: 64, early_stop: {metric: val_accuracy, patience: 1}}
        model:
          layers:
            - Flatten
            - {type: Linear, out_features: 128}
            - ReLU
            - {type: Linear, out_features: 10}
    """, "digits_mlp.yaml")
    script = same_weights_as_nncli(cli, tmp_path, config)
    assert str(tmp_path / "digits.npz") in script  # the data path, resolved


def test_a_cnn_with_groups_a_schedule_and_blocks(cli, tmp_path):
    """Parameter groups by glob, a frozen layer, a Residual block (nncli's own source in the
    script), accumulation with a short last batch, clipping, a warmup into a cosine schedule
    stepped per optimizer step."""
    config = write_config(tmp_path, """
        seed: 1
        data: {source: synthetic, kind: images, n: 90, shape: [2, 6, 6], classes: 3, val_split: 0.2}
        loss: {type: CrossEntropyLoss, label_smoothing: 0.1}
        optimizer:
          type: SGD
          lr: 0.05
          momentum: 0.9
          groups:
            - {params: "*.bias", weight_decay: 0}
            - {name: conv, params: "conv.*", lr: 0.02}
        schedule: {type: CosineAnnealingLR, interval: step, warmup: {steps: 3}}
        train: {epochs: 2, batch_size: 16, accumulate: 2, grad_clip: 0.5}
        model:
          layers:
            conv: {type: Conv2d, out_channels: 4, kernel_size: 3, padding: 1, groups: 2}
            norm: BatchNorm2d
            act: ReLU
            block:
              type: Residual
              layers:
                - {type: Conv2d, out_channels: 4, kernel_size: 3, padding: 1}
                - {type: Dropout, p: 0.3}
            frozen: {type: Conv2d, out_channels: 4, kernel_size: 1, trainable: false}
            flat: Flatten
            head: {type: Linear, out_features: 3}
    """, "cnn.yaml")
    script = same_weights_as_nncli(cli, tmp_path, config)
    assert "class Residual(nn.Sequential):" in script
    assert "torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[3])" in script
    assert "model.get_submodule('frozen').requires_grad_(False)" in script


def test_branches_and_a_residual_with_shortcut_and_post(cli, tmp_path):
    """The Inception + squeeze-and-excitation config (Branches merged by concat and by mul), and a
    Residual with a named projection shortcut and a post layer: the blocks' keywords and the
    helpers of their module reach the script."""
    for folder in ("inception", "projection"):
        (tmp_path / folder).mkdir()
    same_weights_as_nncli(cli, tmp_path / "inception", CONFIGS / "digits_inception_se.yaml", "train.epochs=1")
    config = write_config(tmp_path, """
        seed: 0
        data: {source: digits, val_split: 0.2}
        train: {epochs: 2, batch_size: 64}
        model:
          layers:
            - {type: Conv2d, out_channels: 8, kernel_size: 3, padding: 1}
            - type: Residual
              layers: [{type: Conv2d, out_channels: 16, kernel_size: 3, stride: 2, padding: 1}, ReLU]
              shortcut:
                name: downsample
                layers: [{type: Conv2d, out_channels: 16, kernel_size: 1, stride: 2}]
              post: ReLU
            - Flatten
            - {type: Linear, out_features: 10}
        """, "projection.yaml")
    script = same_weights_as_nncli(cli, tmp_path / "projection", config)
    assert "shortcut_name='downsample'" in script and "post=nn.ReLU()" in script


def test_a_plugin_layer_and_a_step_schedule(cli, tmp_path):
    """The tutorial's own Linear (configs/plugins/seed_linear.py, which calls nncli.register_layer):
    the script imports the plugin file, with a stand-in for register_layer."""
    script = same_weights_as_nncli(cli, tmp_path, CONFIGS / "perceptron_lr_groups.yaml", "train.epochs=3")
    assert "LAYERS['SeedLinear']" in script and "seed_linear.py" in script


def test_a_csv_with_normalization_warmup_and_r2(cli, tmp_path):
    same_weights_as_nncli(cli, tmp_path, CONFIGS / "csv_regression.yaml", "train.epochs=4")


@pytest.mark.parametrize("override, key", [("amp=bf16", "amp"), ("parallel=dp", "parallel")])
def test_what_the_script_cannot_do_is_refused_naming_the_key(cli, tmp_path, override, key):
    result = cli("codegen", CONFIGS / "digits_mlp.yaml", "--set", override)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: --set {key}: {override.replace('=', ': ')} is not written out")


@pytest.mark.parametrize("override, key, shown", [
    ("data.augment=[RandomHorizontalFlip]", "data.augment", "['RandomHorizontalFlip']"),
    ("data.normalize=channel", "data.normalize", "'channel'"),
    ("train.ema.decay=0.99", "train.ema", "{'decay': 0.99, 'warmup': True}"),
])
def test_what_codegen_leaves_out_is_refused_naming_the_key(cli, override, key, shown):
    result = cli("codegen", CONFIGS / "digits_cnn.yaml", "--set", override)
    assert result.exit_code == 2
    assert f"{key}: {shown} is not written out by codegen. Leave it out (--set {key}=null)" in result.stderr


def test_it_prints_without_out_and_never_writes_over_another_file(cli, tmp_path):
    result = cli("codegen", CONFIGS / "linear_regression.yaml")
    assert result.exit_code == 0 and result.stdout.startswith("# Generated by `nncli codegen`")
    compile(result.stdout, "train.py", "exec")
    mine = tmp_path / "train.py"
    mine.write_text("print('my own script')\n")
    result = cli("codegen", CONFIGS / "linear_regression.yaml", "--out", mine)
    assert result.exit_code == 2 and "is not a script that nncli codegen wrote" in result.stderr
    assert mine.read_text() == "print('my own script')\n"
