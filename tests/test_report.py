"""`nncli summary`, `validate`, `layers` and `--help`: the numbers they print are the model's own."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    CONFIGS,
    DATA,
    ENV,
    FROZEN_AND_HEAD,
    REPO,
    nncli_argv,
    ok,
    run_nncli,
    run_python,
    shipped_options,
    write_config,
)
from torch.utils.flop_counter import FlopCounterMode

import nncli
from nncli.report.summary import human_count, summarize

ALEXNET = DATA / "alexnet.yaml"

CNN = """
    model:
      input_shape: [3, 16, 16]
      layers:
        - {type: Conv2d, out_channels: 8, kernel_size: 3, padding: 1}
        - ReLU
        - {type: MaxPool2d, kernel_size: 2}
        - {type: Conv2d, out_channels: 4, kernel_size: 3, stride: 2, groups: 2, bias: false}
        - Flatten
        - {type: Linear, out_features: 10}
"""


def summary_json(cli, path, *args) -> dict:
    result = cli("summary", path, "--json", *args)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def real_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one real forward pass, as torch's own flop counter sees them."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


# --- parameters and MACs ------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")) + [ALEXNET], ids=lambda p: p.stem)
def test_total_params_equal_built_model(cli, path, tmp_path):
    options = shipped_options(path, tmp_path)
    data = summary_json(cli, path, *options)
    config = nncli.load_config(path, options[1:])
    model = nncli.build_model(config, input_shape=tuple(data["input_shape"]))
    assert data["total_params"] == sum(p.numel() for p in model.parameters())
    assert data["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert data["non_trainable_params"] == data["total_params"] - data["trainable_params"]
    # every top-level row's params add up to the total
    assert sum(row["params"] for row in data["layers"] if row["depth"] == 0) == data["total_params"]


def test_conv_linear_macs_by_hand(cli, tmp_path):
    data = summary_json(cli, write_config(tmp_path, CNN))
    rows = {row["name"]: row for row in data["layers"]}
    conv1 = 8 * 16 * 16 * (3 * 3 * 3)         # output elements x (in_channels x kernel)
    conv2 = 4 * 3 * 3 * ((8 // 2) * 3 * 3)    # stride 2 on 8x8 -> 3x3; groups=2 halves the inputs
    linear = 36 * 10
    assert rows["0"]["macs"] == conv1
    assert rows["3"]["macs"] == conv2
    assert rows["5"]["macs"] == linear
    assert rows["3"]["output_shape"] == [1, 4, 3, 3]
    assert rows["3"]["params"] == 4 * 4 * 3 * 3  # no bias
    assert data["macs"] == conv1 + conv2 + linear
    # ... and torch's flop counter on a real forward pass agrees
    model = nncli.build_model(nncli.load_config(tmp_path / "config.yaml"))
    assert real_macs(model, torch.randn(1, 3, 16, 16)) == data["macs"]


def test_macs_count_multiply_adds_only_as_the_footer_says(cli, tmp_path):
    """The MACs convention, stated in the footer: the multiply-adds of convolutions, linear layers
    and matrix products; a bias, a BatchNorm, an activation or a pooling adds none."""
    path = write_config(tmp_path, """
        model:
          input_shape: [3, 6, 6]
          layers:
            - {type: Conv2d, out_channels: 4, kernel_size: 3}
            - BatchNorm2d
            - ReLU
            - {type: MaxPool2d, kernel_size: 2}
            - Flatten
            - {type: Linear, out_features: 5}
            - {type: LayerNorm}
            - Sigmoid
    """)
    data = summary_json(cli, path)
    conv, linear = 4 * 4 * 4 * (3 * 3 * 3), 16 * 5  # no bias terms
    assert [row["macs"] for row in data["layers"]] == [conv, 0, 0, 0, 0, linear, 0, 0]
    assert data["macs"] == conv + linear
    result = cli("summary", path)
    assert result.exit_code == 0
    footer = result.stdout.strip().splitlines()[-1]
    assert footer == (f"MACs (one sample): {human_count(conv + linear)} ({conv + linear:,}): multiply-adds "
                      "of convolutions, linear layers and matrix products (attention's too); biases, "
                      "normalization, activations and pooling are not counted")


def test_macs_of_recurrent_model_by_hand(cli, tmp_path):
    """An LSTM does 4 gates x hidden x (input + hidden) MACs per time step. (torch's flop counter
    cannot check this one: on the CPU the LSTM runs as one fused kernel that it does not count.)"""
    path = write_config(tmp_path, """
        model:
          input_shape: [6, 5]
          layers:
            - {type: LSTM, hidden_size: 8}
            - LastStep
            - {type: Linear, out_features: 3}
    """)
    data = summary_json(cli, path)
    assert data["layers"][0]["macs"] == 6 * 4 * 8 * (5 + 8)
    assert data["layers"][2]["macs"] == 8 * 3
    assert data["macs"] == 6 * 4 * 8 * (5 + 8) + 8 * 3
    assert data["layers"][0]["params"] == 4 * 8 * (5 + 8) + 2 * 4 * 8
    assert data["layers"][0]["output_shape"] == [[1, 6, 8], [[1, 1, 8], [1, 1, 8]]]


def test_alexnet(cli):
    data = summary_json(cli, ALEXNET)
    assert data["total_params"] == 61_100_840
    assert data["trainable_params"] == 61_100_840
    assert abs(data["macs"] - 714e6) / 714e6 < 0.01
    assert data["input_shape"] == [3, 224, 224]
    assert data["output_shape"] == [1000]
    rows = {row["name"]: row for row in data["layers"]}
    assert rows["features"]["output_shape"] == [1, 256, 6, 6]
    assert rows["classifier.1"]["params"] == 9216 * 4096 + 4096
    assert rows["features.0"]["macs"] == 64 * 55 * 55 * 3 * 11 * 11
    assert data["param_bytes"] == 4 * 61_100_840


def test_alexnet_state_dict_matches_torchvision_names():
    """The config keeps torchvision's names, so its state_dict keys are torchvision's."""
    with torch.device("meta"):
        model = nncli.build_model(nncli.load_config(ALEXNET))
    assert [name for name, _ in model.named_parameters()] == [
        "features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias",
        "features.6.weight", "features.6.bias", "features.8.weight", "features.8.bias",
        "features.10.weight", "features.10.bias", "classifier.1.weight", "classifier.1.bias",
        "classifier.4.weight", "classifier.4.bias", "classifier.6.weight", "classifier.6.bias"]


def test_two_trillion_parameters_are_counted_not_allocated(tmp_path):
    path = write_config(tmp_path, """
        model:
          input_shape: [1000000]
          layers:
            - {type: Linear, out_features: 2000000}
    """)
    result = run_nncli("summary", path, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["total_params"] == 1_000_000 * 2_000_000 + 2_000_000
    assert data["macs"] == 1_000_000 * 2_000_000
    assert data["output_shape"] == [2_000_000]


# --- the JSON and the options ---------------------------------------------------------------------

def test_json_keys(cli):
    data = summary_json(cli, CONFIGS / "digits_cnn.yaml")
    for key in ("input_shape", "output_shape", "total_params", "trainable_params", "macs", "layers"):
        assert key in data
    assert data["input_shape"] == [1, 8, 8]  # from the data section
    assert data["output_shape"] == [10]
    for row in data["layers"]:
        assert {"name", "type", "output_shape", "params", "macs"} <= set(row)
    assert [row["name"] for row in data["layers"]][:3] == ["features", "features.0", "features.1"]
    assert data["layers"][1]["type"] == "Conv2d"
    assert data["layers"][1]["output_shape"] == [1, 32, 8, 8]
    assert data["layers"][1]["params"] == 32 * 1 * 9 + 32


def test_depth_zero_collapses_blocks(cli):
    full = summary_json(cli, ALEXNET)
    top = summary_json(cli, ALEXNET, "--depth", "0")
    assert [row["name"] for row in top["layers"]] == ["features", "avgpool", "flatten", "classifier"]
    by_name = {row["name"]: row for row in full["layers"]}
    for row in top["layers"]:
        assert row == by_name[row["name"]]
        children = [r for r in full["layers"] if r["name"].startswith(row["name"] + ".")]
        if children:
            assert row["params"] == sum(c["params"] for c in children)
            assert row["macs"] == sum(c["macs"] for c in children)
    assert top["total_params"] == full["total_params"] and top["macs"] == full["macs"]
    assert len(full["layers"]) == 4 + 13 + 7


def test_depth_zero_table(cli):
    result = cli("summary", ALEXNET, "--depth", "0")
    assert result.exit_code == 0
    assert "classifier" in result.stdout and "features" in result.stdout
    assert "Dropout" not in result.stdout  # inside classifier: collapsed
    assert "61,100,840" in result.stdout


def test_batch_size_in_shapes(cli):
    data = summary_json(cli, CONFIGS / "seed_positional.yaml", "--batch-size", "4")
    assert data["batch_size"] == 4
    assert [row["output_shape"] for row in data["layers"]] == [[4, 3, 6, 6]] * 3
    one = summary_json(cli, CONFIGS / "seed_positional.yaml")
    assert [row["output_shape"] for row in one["layers"]] == [[1, 3, 6, 6]] * 3
    # per-sample totals do not depend on the batch
    assert data["macs"] == one["macs"] == 3 * 6 * 6 * 3 * 3 * 3
    assert data["activation_bytes"] == 4 * one["activation_bytes"]
    table = cli("summary", CONFIGS / "seed_positional.yaml", "--batch-size", "4")
    assert "[4, 3, 6, 6]" in table.stdout and "a batch of 4" in table.stdout


def test_table(cli):
    result = cli("summary", CONFIGS / "seed_add_module.yaml")
    assert result.exit_code == 0 and result.stderr == ""
    out = result.stdout
    for text in ("conv", "Conv2d", "batchnorm", "BatchNorm2d", "active", "ReLU", "[1, 3, 6, 6]",
                 "Total params: 90", "Input shape: [3, 8, 8]", "Output shape: [3, 6, 6]",
                 f"({3 * 6 * 6 * 27:,})"):
        assert text in out, text


def test_params_lists_named_parameters(cli, tmp_path):
    path = write_config(tmp_path, FROZEN_AND_HEAD)
    result = cli("summary", path, "--params")
    assert result.exit_code == 0, result.stderr
    lines = {line.split("│")[1].strip(): line for line in result.stdout.splitlines()
             if line.count("│") >= 4 and "." in line.split("│")[1]}
    assert set(lines) == {"frozen.weight", "frozen.bias", "head.weight", "head.bias"}
    assert "False" in lines["frozen.weight"] and "[3, 4]" in lines["frozen.weight"]
    assert "True" in lines["head.weight"] and "[2, 3]" in lines["head.weight"]
    assert "Non-trainable: 15" in result.stdout
    assert "frozen.weight" not in cli("summary", path).stdout


def test_summarize_api():
    plan = nncli.plan_model(nncli.load_config(CONFIGS / "seed_ordered_dict.yaml"))
    data = summarize(plan)
    assert data["total_params"] == 3 * 3 * 9 + 3 + 3 + 3
    assert [row["name"] for row in data["layers"]] == ["conv", "batchnorm", "active"]


@pytest.mark.parametrize("n, text", [(0, "0"), (999, "999"), (1500, "1.50K"), (714_188_480, "714.19M"),
                                     (2e12, "2.00T")])
def test_human_count(n, text):
    assert human_count(n) == text


def test_summary_bad_options(cli):
    assert cli("summary", ALEXNET, "--depth", "-1").exit_code == 2
    assert cli("summary", ALEXNET, "--batch-size", "0").exit_code == 2


# --- validate -------------------------------------------------------------------------------------

MODEL_ONLY = "ok (model only: train needs a data: section)"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_validate_every_shipped_config(cli, path, tmp_path):
    result = cli("validate", path, *shipped_options(path, tmp_path))
    assert result.exit_code == 0, result.stderr
    verdict = "ok" if yaml.safe_load(path.read_text()).get("data") else MODEL_ONLY  # the seed_* models
    assert result.stdout.startswith(f"{verdict}: {path}: ")
    plugins = yaml.safe_load(path.read_text()).get("plugins", [])
    assert result.stderr == "".join("plugins: imported "
                                    f"{(path.parent / p).resolve().relative_to(Path.cwd())} "
                                    "(Python code that the config names)\n" for p in plugins)


MODEL_WITHOUT_DATA = """
model:
  input_shape: [4]
  layers:
    - {type: Linear, out_features: 2}
"""


@pytest.mark.parametrize("section, message", [
    ("optimizer: {type: SGDD, lr: 0.1}", "5: optimizer.type: unknown optimizer 'SGDD'. Did you mean 'SGD'?"),
    ("optimizer: {type: SGD, lr: -0.1}", "5: optimizer: SGD cannot be built with lr=-0.1"),
    ("optimizer: {type: SGD, lr: 0.1, groups: [{params: '*.bais', lr: 0.01}]}",
     "5: optimizer.groups.0.params: pattern '*.bais' matches no trainable parameter (they are named like: "
     "0.weight, 0.bias)"),
    ("schedule: {type: StepLRR}", "5: schedule.type: unknown schedule 'StepLRR'. Did you mean 'StepLR'?"),
    ("schedule: {type: StepLR, step_size: 0}", "5: schedule: the schedule fails when stepped"),
    ("loss: {type: MSELos}", "5: loss.type: unknown loss 'MSELos'. Did you mean 'MSELoss'?"),
    ("loss: {type: MSELoss, reductio: sum}", "5: loss.reductio: MSELoss has no argument 'reductio'"),
    ("loss: MSELoss\nmetrics: [accuracy]",
     "6: metrics.0: metric 'accuracy' does not apply to regression targets"),
])
def test_validate_without_data_checks_every_section_it_has(cli, tmp_path, section, message):
    """A model without data is checked for all the config has: loss, metrics, optimizer and its
    groups against the model's parameters, schedule; summary checks the same."""
    path = write_config(tmp_path, MODEL_WITHOUT_DATA + section + "\n")
    for command in ("validate", "summary"):
        result = cli(command, path)
        assert result.exit_code == 2, (command, result.stdout, result.stderr)
        assert result.stderr.startswith(f"error: {path}:{message}"), result.stderr


def test_validate_without_data_says_what_it_checked(cli, tmp_path):
    """Without data, `ok` says that only the model (and the sections beside it) could be checked;
    a schedule whose warmup in steps depends on the data's size is not refused."""
    path = write_config(tmp_path, MODEL_WITHOUT_DATA + (
        "optimizer: {type: SGD, lr: 0.1, groups: [{name: bias, params: '*.bias', lr: 0.01}]}\n"
        "schedule: {type: CosineAnnealingLR, interval: step, warmup: {steps: 500}}\n"))
    result = cli("validate", path)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{MODEL_ONLY}: {path}: 1 layer, 10 parameters, input [4] -> output [2]\n"


def test_validate_one_line_summary(cli):
    result = cli("validate", ALEXNET)
    assert result.stdout.strip() == (f"{MODEL_ONLY}: {ALEXNET}: 24 layers, 61,100,840 parameters, "
                                     "input [3, 224, 224] -> output [1000]")


# --- layers ---------------------------------------------------------------------------------------

def test_layers_lists_categories(cli):
    result = cli("layers")
    assert result.exit_code == 0
    out = result.stdout
    positions = []
    for category in ("convolution", "pooling", "normalization", "activation", "linear", "dropout",
                     "recurrent", "blocks"):
        assert category in out
        positions.append(out.index(category))
    assert positions == sorted(positions)  # in CATEGORY_ORDER
    for name in ("Conv2d", "MaxPool2d", "BatchNorm2d", "ReLU", "Linear", "Dropout", "LSTM",
                 "Residual", "LastStep", "SequenceOutput"):
        assert name in out
    assert "ModuleList" not in out and "DataParallel" not in out and "MSELoss" not in out


def test_layers_one_layer(cli):
    result = cli("layers", "Conv2d")
    assert result.exit_code == 0
    lines = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") >= 3}
    assert "from the input" in lines["in_channels"]
    assert "required" in lines["in_channels"]
    assert "required" in lines["out_channels"] and "from the input" not in lines["out_channels"]
    assert "'zeros'" in lines["padding_mode"]


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN", "TransformerEncoderLayer", "TransformerDecoderLayer",
                                  "Transformer", "MultiheadAttention"])
def test_layers_batch_first_default(cli, name):
    """nncli's data is batch-first: every layer with a batch_first argument defaults to true."""
    result = cli("layers", name)
    assert result.exit_code == 0
    line = next(line for line in result.stdout.splitlines() if "batch_first" in line)
    assert "True (nncli; torch: False)" in line
    assert "__init__(" not in result.stdout


def test_layers_block(cli):
    result = cli("layers", "Residual")
    assert result.exit_code == 0 and "layers:" in result.stdout


@pytest.mark.parametrize("name, suggestion", [("Conv2D", "Conv2d"), ("relu", "ReLU"), ("Linaer", "Linear")])
def test_layers_unknown_suggests(cli, name, suggestion):
    result = cli("layers", name)
    assert result.exit_code == 2
    assert f"unknown layer '{name}'" in result.stderr
    assert f"Did you mean '{suggestion}'?" in result.stderr
    assert "Traceback" not in result.stderr


def test_layers_lists_and_describes_plugin_layers(tmp_path):
    plugin = CONFIGS / "plugins" / "seed_linear.py"
    listing = ok(run_nncli("layers", "--plugin", plugin, cwd=tmp_path)).stdout
    row = next(line for line in listing.splitlines() if line.startswith("│ plugins"))
    assert "SeedLinear" in row
    one = ok(run_nncli("layers", "SeedLinear", "--plugin", plugin, cwd=tmp_path)).stdout
    assert one.startswith("SeedLinear (plugins, from plugin)")
    assert "Base class for all neural network modules" not in one  # its own doc, not nn.Module's
    rows = {line.split("│")[1].strip(): line for line in one.splitlines() if line.count("│") >= 3}
    assert "from the input (dimension -1 of the input)" in rows["in_feature"]
    assert "required" in rows["out_feature"] and "from the input" not in rows["out_feature"]
    assert "SeedLinear" not in ok(run_nncli("layers", cwd=tmp_path)).stdout  # only when asked for


@pytest.mark.parametrize("plugin, message", [
    ("missing.py", "error: --plugin: plugin file missing.py not found in {cwd}"),
    ("no_such_module", "error: --plugin: cannot import plugin 'no_such_module': No module named"),
])
def test_layers_bad_plugin_exits_2(tmp_path, plugin, message):
    done = run_nncli("layers", "--plugin", plugin, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith(message.format(cwd=tmp_path))
    assert "Traceback" not in done.stderr


# --- help and import cost -------------------------------------------------------------------------

def test_help(cli):
    result = cli("--help")
    assert result.exit_code == 0
    for command in ("summary", "validate", "layers", "train"):
        assert command in result.stdout


def test_help_subprocess_without_torch():
    result = run_nncli("--help")
    assert result.returncode == 0 and "summary" in result.stdout
    probe = ("import sys, runpy; sys.argv = ['nncli', '--help']\n"
             "try:\n    runpy.run_module('nncli', run_name='__main__')\n"
             "except SystemExit as e:\n    assert e.code == 0, e.code\n"
             "assert 'torch' not in sys.modules, 'nncli --help imported torch'\n")
    check = run_python("-c", probe, timeout=60)
    assert check.returncode == 0, check.stderr


def test_version_is_the_packages():
    result = run_nncli("--version")
    assert result.returncode == 0, result.stderr
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert result.stdout == f"nncli {version}\n"
    assert version == nncli.__version__


def test_shell_completion_completes_commands_and_installs(tmp_path):
    """--install-completion writes a script that asks `nncli` itself (click's _NNCLI_COMPLETE
    protocol), whatever name the program was started by; asked, nncli completes a command. (The
    shell is named: a test has no interactive shell for typer to detect.)"""
    env = {**ENV, "HOME": str(tmp_path), "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    installed = subprocess.run(nncli_argv("--install-completion", "bash"), env=env, capture_output=True,
                               text=True, timeout=60)
    assert installed.returncode == 0, installed.stderr
    script = (tmp_path / ".bash_completions" / "nncli.sh").read_text()
    assert "_nncli_completion()" in script and "_NNCLI_COMPLETE=complete_bash" in script
    assert "nncli.sh" in (tmp_path / ".bashrc").read_text()
    env = {**ENV, "_NNCLI_COMPLETE": "complete_bash", "COMP_WORDS": "nncli ex", "COMP_CWORD": "1"}
    completed = subprocess.run(nncli_argv(), env=env, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == ["export"]
    assert "--install-completion" in run_nncli("--help").stdout


def test_import_does_not_import_torch():
    check = run_python("-c", "import nncli, sys; assert 'torch' not in sys.modules; print(nncli.__version__)",
                       timeout=60)
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == nncli.__version__
