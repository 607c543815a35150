"""`nncli export`: each format's file, loaded the way its users load it (torch.jit.load,
torch.export.load, onnxruntime, safetensors, torch.load), gives the outputs of the checkpoint's model
rebuilt here by hand in plain PyTorch, with the run's input and target normalization (folded in, or
written beside the file), for a batch size other than the one the export was checked on."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from helpers import CONFIGS, load, write_config
from torch import nn

TRAINED = """
seed: 0
data: {source: synthetic, kind: regression, n: 96, features: 3, val_split: 0.25, normalize: true,
       normalize_target: true}
loss: MSELoss
optimizer: {type: Adam, lr: 0.01}
train: {epochs: 2, batch_size: 16}
model:
  layers:
    - {type: Linear, out_features: 8}
    - {type: BatchNorm1d}
    - ReLU
    - {type: Residual, layers: [{type: Linear, out_features: 8}, Tanh, {type: Dropout, p: 0.5}]}
    - {type: Linear, out_features: 1}
"""


class Residual(nn.Sequential):
    def forward(self, x):
        return x + super().forward(x)


def by_hand(state: dict) -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(),
                          Residual(nn.Linear(8, 8), nn.Tanh(), nn.Dropout(0.5)), nn.Linear(8, 1))
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from helpers import invoke

    folder = tmp_path_factory.mktemp("export")
    result = invoke("train", write_config(folder, TRAINED, "net.yaml"), "--out", folder / "runs", "-q")
    assert result.exit_code == 0, result.stderr
    run = folder / "runs" / "net"
    ckpt = load(run / "best.pt")
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1)) * 3 + 1  # raw inputs, batch 5
    norm, targets = ckpt["normalization"], ckpt["target_normalization"]
    with torch.no_grad():  # the outputs in the targets' units, as predict gives them
        expected = by_hand(ckpt["model"])((x - norm["mean"]) / norm["std"]) * targets["std"] + targets["mean"]
    return {"run": run, "ckpt": ckpt, "x": x, "expected": expected}


def _load_and_run(format: str, file, x: torch.Tensor, state_of) -> torch.Tensor:
    if format == "torchscript":
        return torch.jit.load(str(file))(x)
    if format == "pt2":
        return torch.export.load(str(file)).module()(x)
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    norm = json.loads(file.with_name(file.name + ".normalization.json").read_text())
    x = (x - torch.tensor(norm["mean"])) / torch.tensor(norm["std"])
    return by_hand(state_of(file))(x) * torch.tensor(norm["target_std"]) + torch.tensor(norm["target_mean"])


def _state(format: str):
    if format == "safetensors":
        from safetensors.torch import load_file

        return lambda file: load_file(str(file))
    return lambda file: torch.load(file, weights_only=True)


NEEDS = {"onnx": ["onnx", "onnxruntime", "onnxscript"], "safetensors": ["safetensors"]}
SUFFIX = {"torchscript": ".torchscript.pt", "pt2": ".pt2", "onnx": ".onnx", "safetensors": ".safetensors",
          "state_dict": ".state_dict.pt"}


@pytest.mark.parametrize("format", list(SUFFIX))
def test_the_exported_model_gives_the_checkpoints_outputs(trained, cli, format):
    for module in NEEDS.get(format, []):
        pytest.importorskip(module)
    result = cli("export", trained["run"], "--format", format)
    assert result.exit_code == 0, result.stderr
    file = trained["run"] / f"best{SUFFIX[format]}"
    folded = format in ("torchscript", "pt2", "onnx")
    assert f"exported {trained['run'] / 'best.pt'} to {file} ({format}: " in result.stdout
    assert ("input normalization folded in" if folded else "input normalization in ") in result.stdout
    assert "checked: on a batch of 8, its outputs are the checkpoint model's within" in result.stdout
    with torch.no_grad():
        got = _load_and_run(format, file, trained["x"], _state(format))
    assert got.shape == trained["expected"].shape
    assert torch.allclose(got, trained["expected"], atol=1e-5, rtol=0)
    if not folded:  # the weights are the checkpoint's, bit for bit, under the model's own keys
        state = _state(format)(file)
        assert state.keys() == trained["ckpt"]["model"].keys()
        assert all(torch.equal(state[k], trained["ckpt"]["model"][k]) for k in state)


def test_the_check_is_relative_to_the_outputs_size(cli, tmp_path):
    """The limit is 1e-5 times the largest output where that is above 1 (float32 rounding grows
    with the outputs): for targets in the thousands, computed here from the same check batch; a
    difference beyond it writes nothing (exit 1)."""
    import re

    from helpers import invoke

    from nncli.run import export
    from nncli.run.export import sample_inputs

    xs = [[float(i)] for i in range(8)]
    config = write_config(tmp_path, f"""
        seed: 0
        data: {{source: tensors, x: {xs}, y: {[[1000.0 * (i + 1)] for i in range(8)]}, val_split: 0,
               normalize_target: true}}
        loss: MSELoss
        train: {{epochs: 1, batch_size: 4}}
        model: {{layers: [{{type: Linear, out_features: 1}}]}}
        """, "thousands.yaml")
    assert invoke("train", config, "--out", tmp_path / "runs", "-q").exit_code == 0
    run = tmp_path / "runs" / "thousands"
    result = cli("export", run, "--format", "state_dict", "--out", tmp_path / "w.pt")
    assert result.exit_code == 0, result.stderr
    limit = float(re.search(r"\(limit ([0-9.e+-]+)\)", result.stdout).group(1))
    ckpt = load(run / "best.pt")
    model = nn.Linear(1, 1)
    model.load_state_dict({k.removeprefix("0."): v for k, v in ckpt["model"].items()})
    x = sample_inputs(model, ckpt["input_shape"], torch.float32, 8, None, 0)
    targets = ckpt["target_normalization"]
    with torch.no_grad():
        largest = (model(x) * targets["std"] + targets["mean"]).abs().max().item()
    assert largest > 1000 and limit == pytest.approx(1e-5 * largest, rel=0.06)  # printed to 2 digits

    original = export.TOLERANCE
    try:
        export.TOLERANCE = -1.0  # nothing passes
        result = cli("export", run, "--format", "torchscript", "--out", tmp_path / "m.pt")
    finally:
        export.TOLERANCE = original
    assert result.exit_code == 1 and "nothing was written" in result.stderr
    assert not (tmp_path / "m.pt").exists()


def test_last_and_out(trained, cli, tmp_path):
    result = cli("export", trained["run"], "--format", "state_dict", "--checkpoint", "last",
                 "--out", tmp_path / "w" / "weights.pt")
    assert result.exit_code == 0, result.stderr
    state = torch.load(tmp_path / "w" / "weights.pt", weights_only=True)
    last = load(trained["run"] / "last.pt")["model"]
    assert all(torch.equal(state[k], last[k]) for k in last)


def test_export_never_replaces_a_checkpoint(trained, cli):
    before = (trained["run"] / "last.pt").read_bytes()
    result = cli("export", trained["run"], "--format", "state_dict", "--out", trained["run"] / "last.pt")
    assert result.exit_code == 2
    assert "is a checkpoint; export writes a new file and never replaces one" in result.stderr
    assert (trained["run"] / "last.pt").read_bytes() == before


@pytest.mark.parametrize("format, missing, extra", [("onnx", "onnxruntime", "onnx"),
                                                     ("safetensors", "safetensors", "safetensors")])
def test_a_missing_extra_is_exit_2_naming_it(trained, cli, monkeypatch, format, missing, extra):
    monkeypatch.setitem(sys.modules, missing, None)
    result = cli("export", trained["run"], "--format", format)
    assert result.exit_code == 2
    assert f"{format} export needs {missing}, which is not installed" in result.stderr
    assert f"pip install 'nncli[{extra}]'" in result.stderr


def test_an_unknown_format_is_refused(trained, cli):
    result = cli("export", trained["run"], "--format", "onx")
    assert result.exit_code == 2 and "Did you mean 'onnx'?" in result.stderr


def test_a_checkpoints_plugins_need_plugin_as_for_eval(cli, tmp_path):
    config = write_config(tmp_path, f"""
        seed: 0
        plugins: [{CONFIGS / "plugins" / "seed_linear.py"}]
        data: {{source: synthetic, kind: regression, n: 32, features: 3, val_split: 0}}
        loss: MSELoss
        train: {{epochs: 1, batch_size: 16}}
        model:
          layers: {{layer1: {{type: SeedLinear, out_feature: 1}}}}
    """, "plugged.yaml")
    assert cli("train", config, "--out", tmp_path / "runs", "-q").exit_code == 0
    run = tmp_path / "runs" / "plugged"
    result = cli("export", run, "--format", "torchscript")
    assert result.exit_code == 2 and "nncli imports no code that a checkpoint names" in result.stderr
    assert not (run / "best.torchscript.pt").exists()
    result = cli("export", run, "--format", "torchscript", "--plugin", CONFIGS / "plugins" / "seed_linear.py")
    assert result.exit_code == 0, result.stderr
    x = torch.randn(4, 3)
    ckpt = load(run / "best.pt")["model"]
    assert torch.allclose(torch.jit.load(str(run / "best.torchscript.pt"))(x),
                          x.mm(ckpt["layer1.W"]) + ckpt["layer1.b"], atol=1e-6)
