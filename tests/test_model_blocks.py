"""nncli's blocks: Residual with a shortcut and a post layer, Branches (concat, add, mul), sizes
that name the input's (`groups: in_channels`), `repeat` with per-copy `copies:`, and TorchScript
and torch.export of every block.

The shipped architectures are compared with the same networks written by hand below in plain
PyTorch (torchvision's ResNet-18 and MobileNetV2 as torchvision builds them, a U-Net, an
Inception block with a squeeze-and-excitation gate): parameters, output shapes, state_dict keys in
order, and outputs for the same weights.
"""
from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from helpers import BROKEN, CONFIGS, ok, read_metrics, write_config
from torch import nn

import nncli
from nncli.model.blocks import Branches, LastStep, Permute, Reshape, Residual, SequenceOutput

# --- the reference networks, by hand -------------------------------------------------------------

class BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions, ReLU after the sum; a 1x1 projection (`downsample`) when the
    shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(64, 64), BasicBlock(64, 64))
        self.layer2 = nn.Sequential(BasicBlock(64, 128, 2), BasicBlock(128, 128))
        self.layer3 = nn.Sequential(BasicBlock(128, 256, 2), BasicBlock(256, 256))
        self.layer4 = nn.Sequential(BasicBlock(256, 512, 2), BasicBlock(512, 512))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, 1000)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def conv_bn_relu6(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: expand (1x1), depthwise 3x3, project (1x1); the input added when the
    shape stays."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers = [conv_bn_relu6(cin, hidden, kernel=1)] if expand != 1 else []
        layers += [conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        features, cin = [conv_bn_relu6(3, 32, stride=2)], 32
        for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                           (6, 160, 3, 2), (6, 320, 1, 1)]:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        features.append(conv_bn_relu6(cin, 1280, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


class Concat(nn.Module):
    """Named paths over the same input, concatenated along the channels."""

    def __init__(self, **paths: nn.Module) -> None:
        super().__init__()
        for name, path in paths.items():
            self.add_module(name, path)

    def forward(self, x):
        return torch.cat([path(x) for path in self.children()], 1)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.identity = nn.Identity()
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, squeezed, 1), nn.ReLU(),
                                  nn.Conv2d(squeezed, channels, 1), nn.Sigmoid())

    def forward(self, x):
        return self.identity(x) * self.gate(x)


def inception_se() -> nn.Sequential:
    """configs/digits_inception_se.yaml by hand."""
    return nn.Sequential(OrderedDict([
        ("stem", nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())),
        ("inception", Concat(
            b1x1=nn.Sequential(nn.Conv2d(16, 8, 1), nn.ReLU()),
            b3x3=nn.Sequential(nn.Conv2d(16, 8, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()),
            pool=nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(16, 8, 1), nn.ReLU()))),
        ("se", SqueezeExcitation(32, 8)),
        ("head", nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.2), nn.Linear(512, 10))),
    ]))


def unet() -> nn.Sequential:
    """configs/unet.yaml by hand: each level concatenates its input with the path down and up."""
    def cbr(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    level2 = Concat(skip=nn.Identity(), down=nn.Sequential(nn.MaxPool2d(2), *cbr(32, 64),
                                                           nn.ConvTranspose2d(64, 32, 2, 2)))
    level1 = Concat(skip=nn.Identity(), down=nn.Sequential(nn.MaxPool2d(2), *cbr(16, 32), level2,
                                                           *cbr(64, 32), nn.ConvTranspose2d(32, 16, 2, 2)))
    return nn.Sequential(OrderedDict([("encoder", nn.Sequential(*cbr(1, 16))), ("level1", level1),
                                      ("decoder", nn.Sequential(*cbr(32, 16))),
                                      ("head", nn.Conv2d(16, 1, 1))]))


def randomized(model: nn.Module) -> nn.Module:
    """Weights and BatchNorm statistics all different from their initial values (ones, zeros)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def build(path, text: str | None = None, **kwargs) -> nn.Sequential:
    """The model of a config file, or of `text` written to `path` (a folder) first."""
    if text is not None:
        path = write_config(path, text)
    return nncli.build_model(nncli.load_config(path), **kwargs)


# --- the shipped architectures against the hand-written ones ---------------------------------------

ARCHITECTURES = [  # config, the network by hand, a small input for the forward pass, parameters
    ("resnet18.yaml", ResNet18, (3, 64, 64), 11_689_512),
    ("mobilenet_v2.yaml", MobileNetV2, (3, 64, 64), 3_504_872),
    ("digits_inception_se.yaml", inception_se, (1, 8, 8), 7_450),
    ("unet.yaml", unet, (1, 8, 8), 57_009),
]


@pytest.mark.parametrize("name, by_hand, shape, params", ARCHITECTURES, ids=[a[0] for a in ARCHITECTURES])
def test_architecture_is_the_hand_written_network(name, by_hand, shape, params):
    """Same parameters, output shape and state_dict keys (in order); the hand-written network's
    weights load with strict=True and give the same outputs."""
    reference = randomized(by_hand())
    config = nncli.load_config(CONFIGS / name)
    plan = nncli.plan_model(config, input_shape=shape)
    model = nncli.build_model(config, input_shape=shape).eval()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        expected = reference(x)
    assert sum(p.numel() for p in reference.parameters()) == params
    assert sum(p.numel() for p in model.parameters()) == params
    assert sum(layer.params for layer in plan.layers) == params
    assert plan.output_shape[1:] == expected.shape[1:]
    assert list(model.state_dict()) == list(reference.state_dict())
    model.load_state_dict(reference.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


@pytest.mark.parametrize("name, params, macs", [("resnet18.yaml", "11,689,512", "1.81G (1,814,073,344)"),
                                                ("mobilenet_v2.yaml", "3,504,872", "300.77M (300,774,272)")])
def test_summary_of_imagenet_networks(cli, name, params, macs):
    """`nncli summary` at 3x224x224 counts torchvision's parameters and MACs."""
    result = ok(cli("summary", CONFIGS / name))
    assert f"Total params: {params}   Trainable: {params}" in result.stdout
    assert f"MACs (one sample): {macs}" in result.stdout
    assert "Input shape: [3, 224, 224]   Output shape: [1000]" in result.stdout


def test_resnet18_summary_rows_and_plan_without_weights(cli):
    """Each copy of a repeated block is its own rows (copy 0 with its projection shortcut, copy 1
    without); the plan of a 224x224 ResNet-18 allocates no weights."""
    summary = json.loads(ok(cli("summary", CONFIGS / "resnet18.yaml", "--json")).stdout)
    rows = {row["name"]: row for row in summary["layers"]}
    assert rows["layer2.0"]["type"] == "Residual" and rows["layer2.0"]["params"] == 230_144
    assert rows["layer2.0.downsample"]["params"] == 8_448
    assert rows["layer2.0.downsample.0"]["type"] == "Conv2d"
    assert rows["layer2.0.post"]["type"] == "ReLU"
    assert "layer2.1.downsample" not in rows and rows["layer2.1"]["params"] == 295_424
    assert rows["layer2.0.conv1"]["output_shape"] == [1, 128, 28, 28]
    assert "layer1.0.downsample" not in rows  # layer1 keeps the shape: no copy changes
    plan = nncli.plan_model(nncli.load_config(CONFIGS / "resnet18.yaml"))
    assert all(p.is_meta for p in plan.model.parameters())
    assert plan.output_shape == (1, 1000)


def test_inception_se_trains_on_the_digits(cli, tmp_path):
    result = cli("train", CONFIGS / "digits_inception_se.yaml", "--out", tmp_path, "--epochs", "3", "-q")
    ok(result)
    _, rows = read_metrics(tmp_path / "digits_inception_se")
    assert len(rows) == 3 and rows[-1]["val_accuracy"] > 0.9


def test_unet_denoises_the_digits(cli, tmp_path):
    """The U-Net maps noisy digits to clean ones: its validation error ends well below the noise's."""
    images = np.load(CONFIGS.parent / "nncli" / "datasets" / "digits.npz")["images"]
    noisy = (images + 0.3 * np.random.default_rng(0).standard_normal(images.shape)).astype(np.float32)
    np.savez(tmp_path / "noisy.npz", x=noisy, y=images)
    noise_mae = float(np.abs(noisy - images).mean())  # predicting the input itself
    result = cli("train", CONFIGS / "unet.yaml", "--out", tmp_path, "--epochs", "4", "-q",
                 "--set", f"data={{source: npz, path: {tmp_path / 'noisy.npz'}}}", "--set", "loss=MSELoss",
                 "--set", "metrics=[mae]")
    ok(result)
    _, rows = read_metrics(tmp_path / "unet")
    assert rows[-1]["val_mae"] < 0.6 * noise_mae


# --- Residual --------------------------------------------------------------------------------------

RESIDUAL_WITH_SHORTCUT = """
    model:
      input_shape: [4, 8, 8]
      layers:
        block:
          type: Residual
          layers:
            conv1: {type: Conv2d, out_channels: 8, kernel_size: 3, stride: 2, padding: 1, bias: false}
            bn1: BatchNorm2d
          shortcut:
            name: downsample
            layers: [{type: Conv2d, out_channels: 8, kernel_size: 1, stride: 2, bias: false}, BatchNorm2d]
          post: ReLU
"""


def test_residual_with_shortcut_and_post(tmp_path):
    """post(body(x) + shortcut(x)); keys: the body's, then the shortcut's under its name."""
    model = randomized(build(tmp_path, RESIDUAL_WITH_SHORTCUT))
    block = model.block
    assert isinstance(block, Residual)
    assert list(model.state_dict())[:2] == ["block.conv1.weight", "block.bn1.weight"]
    assert [k for k in model.state_dict() if k.endswith("weight")] == [
        "block.conv1.weight", "block.bn1.weight", "block.downsample.0.weight", "block.downsample.1.weight"]
    assert [name for name, _ in block.named_children()] == ["conv1", "bn1", "downsample", "post"]
    x = torch.randn(3, 4, 8, 8)
    expected = torch.relu(block.bn1(block.conv1(x)) + block.downsample(x))
    assert torch.equal(model(x), expected)


def test_residual_shortcut_default_name_and_a_single_layer(tmp_path):
    model = build(tmp_path, """
        model:
          input_shape: [6]
          layers:
            - type: Residual
              layers: [{type: Linear, out_features: 3}]
              shortcut: {type: Linear, out_features: 3, bias: false}
              post: {name: act, type: Tanh}
    """)
    assert list(model.state_dict()) == ["0.0.weight", "0.0.bias", "0.shortcut.weight"]
    x = torch.randn(2, 6)
    block = model[0]
    torch.testing.assert_close(model(x), torch.tanh(block[0](x) + block.shortcut(x)))
    assert isinstance(block.act, nn.Tanh)


def test_residual_without_shortcut_keeps_its_keys(tmp_path):
    """A Residual of layers alone is what it was: x + body(x), keys block.0.weight, ..."""
    model = build(tmp_path, """
        model:
          input_shape: [4]
          layers:
            block: {type: Residual, layers: [{type: Linear, out_features: 4}, ReLU]}
    """)
    assert list(model.state_dict()) == ["block.0.weight", "block.0.bias"]
    x = torch.randn(2, 4)
    assert torch.equal(model(x), x + torch.relu(model.block[0](x)))


def test_shortcut_shape_error_names_the_path_the_line_and_both_shapes(cli, tmp_path):
    text = RESIDUAL_WITH_SHORTCUT.replace("kernel_size: 1, stride: 2", "kernel_size: 1")
    path = write_config(tmp_path, text)
    result = cli("validate", path)
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {path}:9: block (Residual): its body gives [1, 8, 4, 4] but its shortcut block.downsample "
        "gives [1, 8, 8, 8] (from the input [1, 4, 8, 8]); a Residual adds them, so they must match. A "
        "shortcut from the input to the body's shape: [{type: Conv2d, out_channels: 8, kernel_size: 1, "
        "stride: 2, bias: false}, BatchNorm2d]\n")


def test_residual_that_changes_the_shape_suggests_a_shortcut(cli, tmp_path):
    path = write_config(tmp_path, """
        model:
          input_shape: [64, 56, 56]
          layers:
            - type: Residual
              layers:
                - {type: Conv2d, out_channels: 128, kernel_size: 3, stride: 2, padding: 1}
    """)
    result = cli("validate", path)
    assert result.exit_code == 2
    assert f"{path}:4: 0 (Residual): the block changes the shape from [1, 64, 56, 56] to [1, 128, 28, 28]" \
        in result.stderr
    assert ("shortcut: [{type: Conv2d, out_channels: 128, kernel_size: 1, stride: 2, bias: false}, "
            "BatchNorm2d]") in result.stderr
    fixed = path.read_text() + ("      shortcut: [{type: Conv2d, out_channels: 128, kernel_size: 1, "
                                "stride: 2, bias: false}, BatchNorm2d]\n")
    path.write_text(fixed)
    ok(cli("validate", path))  # the suggestion, as written, fits


@pytest.mark.parametrize("extra, message", [
    ("shotcut: Identity", "a Residual block takes 'layers', 'shortcut', 'post' (and name, repeat, copies, "
                          "trainable), not 'shotcut'. Did you mean 'shortcut'?"),
    ("shortcut: {name: 0, type: Identity}", "layer name '0' is used twice"),
    ("post: {name: a.b, type: ReLU}", "layer name 'a.b' must be non-empty and contain no '.'"),
    ("shortcut: {type: Identity, repeat: 2}", "shortcut: repeat and copies belong to an item of a list"),
])
def test_residual_keys_checked(cli, tmp_path, extra, message):
    path = write_config(tmp_path, f"""
        model:
          input_shape: [4]
          layers:
            - type: Residual
              layers: [{{type: Linear, out_features: 4}}]
              {extra}
    """)
    result = cli("validate", path)
    assert result.exit_code == 2 and f"{path}:6: 0 (Residual): " in result.stderr
    assert message in result.stderr


# --- Branches --------------------------------------------------------------------------------------

def test_branches_concat_keys_and_outputs(tmp_path):
    model = randomized(build(tmp_path, """
        model:
          input_shape: [4, 8, 8]
          layers:
            block:
              type: Branches
              branches:
                b1: [{type: Conv2d, out_channels: 6, kernel_size: 1}, BatchNorm2d]
                b2: {type: Conv2d, out_channels: 2, kernel_size: 3, padding: 1}
                skip: Identity
    """))
    assert isinstance(model.block, Branches)
    assert [k for k in model.state_dict() if "running" not in k and "batches" not in k] == [
        "block.b1.0.weight", "block.b1.0.bias", "block.b1.1.weight", "block.b1.1.bias", "block.b2.weight",
        "block.b2.bias"]
    x = torch.randn(2, 4, 8, 8)
    b = model.block
    assert torch.equal(model(x), torch.cat([b.b1(x), b.b2(x), x], 1))
    assert model(x).shape == (2, 12, 8, 8)


@pytest.mark.parametrize("merge, dim, combine", [
    ("add", None, lambda a, b: a + b),
    ("concat", -1, lambda a, b: torch.cat([a, b], -1)),
    ("concat", 1, lambda a, b: torch.cat([a, b], 2)),
])
def test_branches_add_and_concat_along_a_dim(tmp_path, merge, dim, combine):
    model = build(tmp_path, f"""
        model:
          input_shape: [3, 5]
          layers:
            block:
              type: Branches
              merge: {merge}
              {f'dim: {dim}' if dim is not None else ''}
              branches:
                - {{type: Linear, out_features: 5}}
                - Identity
    """)
    x = torch.randn(2, 3, 5)
    assert torch.equal(model(x), combine(model.block[0](x), x))
    assert list(model.state_dict()) == ["block.0.weight", "block.0.bias"]


def test_branches_mul_broadcasts_a_gate(tmp_path):
    """Squeeze-and-excitation: x * sigmoid(conv(pool(x))), the gate [C, 1, 1] over every position."""
    model = build(tmp_path, """
        model:
          input_shape: [4, 6, 6]
          layers:
            se:
              type: Branches
              merge: mul
              branches:
                identity: Identity
                gate: [{type: AdaptiveAvgPool2d, output_size: 1},
                       {type: Conv2d, out_channels: 4, kernel_size: 1}, Sigmoid]
    """)
    x = torch.randn(2, 4, 6, 6)
    gate = model.se.gate
    assert gate(x).shape == (2, 4, 1, 1)
    assert torch.equal(model(x), x * gate(x))


def test_branches_plan_shapes_every_path(tmp_path):
    plan = nncli.plan_model(nncli.load_config(write_config(tmp_path, """
        model:
          input_shape: [4, 8, 8]
          layers:
            block:
              type: Branches
              branches:
                a: [{type: Conv2d, out_channels: 6, kernel_size: 1}, ReLU]
                b: Identity
    """)))
    shapes = {layer.path: layer.output_shape for layer in plan.walk()}
    assert shapes == {"block": (1, 10, 8, 8), "block.a": (1, 6, 8, 8), "block.a.0": (1, 6, 8, 8),
                      "block.a.1": (1, 6, 8, 8), "block.b": (1, 4, 8, 8)}
    assert plan.layers[0].params == 30


@pytest.mark.parametrize("options, branches, line, message", [
    (["merge: concat"], ["a: {type: Conv2d, out_channels: 8, kernel_size: 3}", "b: Identity"], 9,
     "branch block.a gives [1, 8, 2, 2] and branch block.b gives [1, 4, 4, 4], which cannot be concatenated "
     "along dim 0 (the channels): every other dimension must match"),
    (["merge: add"], ["a: {type: Conv2d, out_channels: 8, kernel_size: 1}", "b: Identity"], 9,
     "branch block.a gives [1, 8, 4, 4] and branch block.b gives [1, 4, 4, 4], which cannot be added: add "
     "takes equal shapes"),
    (["merge: mul"], ["a: Identity", "b: {type: AdaptiveAvgPool2d, output_size: 2}"], 9,
     "branch block.a gives [1, 4, 4, 4] and branch block.b gives [1, 4, 2, 2], which cannot be multiplied"),
    (["merge: cat"], ["a: Identity"], 6,
     "merge must be one of concat, add, mul, got 'cat'. Did you mean 'concat'?"),
    (["dim: 3"], ["a: Identity"], 6,
     "dim 3 is not a dimension of the samples [4, 4, 4] that the branches give; use 0 to 2, or -1 to -3"),
    (["merge: add", "dim: 1"], ["a: Identity"], 7, "dim is for merge: concat; a merge by add takes none"),
    (["dim: channels"], ["a: Identity"], 6,
     "dim must be an integer (0: the channels, -1: the last dimension)"),
    ([], ["a: {type: Flatten, start_dim: 0}", "b: Identity"], 8,
     "branch block.a gives [64] and branch block.b gives [1, 4, 4, 4], which cannot be concatenated"),
    ([], ["a: [Flatten, {type: Unflatten, dim: 1, unflattened_size: [4, 16]}, {type: GRU, hidden_size: 3}]"],
     7,
     "branch block.a gives a tuple (output, hidden state), not a tensor. End the branch with SequenceOutput"),
    ([], [], 6, "has no branches; add at least one"),
])
def test_branches_errors(cli, tmp_path, options, branches, line, message):
    text = "model:\n  input_shape: [4, 4, 4]\n  layers:\n    block:\n      type: Branches\n"
    text += "".join(f"      {option}\n" for option in options)
    listed = "".join(f"\n        {branch}" for branch in branches) if branches else " {}"
    text += f"      branches:{listed}\n"
    path = write_config(tmp_path, text)
    result = cli("validate", path)
    assert result.exit_code == 2, result.stdout
    assert result.stderr.startswith(f"error: {path}:{line}: block (Branches): "), result.stderr
    assert message in result.stderr, result.stderr


# --- sizes that name the input's ------------------------------------------------------------------

def test_depthwise_convolution_by_name(tmp_path):
    """`groups: in_channels` and `out_channels: in_channels`: a depthwise convolution without arithmetic."""
    model = build(tmp_path, """
        model:
          input_shape: [12, 8, 8]
          layers:
            - {type: Conv2d, out_channels: in_channels, kernel_size: 3, padding: 1, groups: in_channels}
            - {type: Conv2d, out_channels: 24, kernel_size: 1}
            - {type: Conv2d, out_channels: in_channels, kernel_size: 3, groups: in_channels, bias: false}
            - Flatten
            - {type: Linear, out_features: in_features}
    """)
    assert (model[0].in_channels, model[0].out_channels, model[0].groups) == (12, 12, 12)
    assert model[0].weight.shape == (12, 1, 3, 3)
    assert (model[2].in_channels, model[2].out_channels, model[2].groups) == (24, 24, 24)
    assert model[4].weight.shape == (864, 864)


def test_misspelt_input_size_name_suggests_it(cli, tmp_path):
    path = write_config(tmp_path, """
        model:
          input_shape: [4, 8, 8]
          layers:
            - {type: Conv2d, out_channels: 4, kernel_size: 3,
               groups: in_channel}
    """)
    result = cli("validate", path)
    assert result.exit_code == 2
    assert result.stderr == (f"error: {path}:5: 0 (Conv2d): argument 'groups' expects an integer, got "
                             "'in_channel'. Did you mean 'in_channels'?\n")


# --- repeat with copies -----------------------------------------------------------------------------

STAGE = """
    model:
      input_shape: [4, 8, 8]
      layers:
        stage:
          type: Sequential
          layers:
            - type: Residual
              repeat: 3
              copies:
                0:
                  layers.conv1.stride: 2
                  shortcut:
                    name: downsample
                    layers: [{type: Conv2d, out_channels: 8, kernel_size: 1, stride: 2}]
                2: {layers.conv1.kernel_size: 1, layers.conv1.padding: 0, post: Tanh}
              layers:
                conv1: {type: Conv2d, out_channels: 8, kernel_size: 3, padding: 1}
                act: ReLU
"""


def test_copies_change_one_copy_each(tmp_path):
    """Copy 0 strides and has a shortcut, copy 2 a 1x1 convolution and a post layer; copy 1 is the
    spec as written; in list form the copies are named 0, 1, 2."""
    model = build(tmp_path, STAGE.replace("input_shape: [4, 8, 8]", "input_shape: [8, 8, 8]"))
    stage = model.stage
    assert [name for name, _ in stage.named_children()] == ["0", "1", "2"]
    assert [name for name, _ in stage[0].named_children()] == ["conv1", "act", "downsample"]
    assert [name for name, _ in stage[1].named_children()] == ["conv1", "act"]
    assert [name for name, _ in stage[2].named_children()] == ["conv1", "act", "post"]
    assert [(b.conv1.stride, b.conv1.kernel_size) for b in stage] == [((2, 2), (3, 3)), ((1, 1), (3, 3)),
                                                                      ((1, 1), (1, 1))]
    x = torch.randn(2, 8, 8, 8)
    assert model(x).shape == (2, 8, 4, 4)


def test_copies_with_names_and_a_type_change(tmp_path):
    """A named repeat's copies are name_0, name_1; copy 0 may be another type (MobileNetV2's first
    block of a stage is not residual)."""
    model = build(tmp_path, """
        model:
          input_shape: [4]
          layers:
            block:
              type: Residual
              repeat: 2
              copies: {0: {type: Sequential, layers.0.out_features: 6}}
              layers: [{type: Linear, out_features: 6}, ReLU]
    """)
    assert [name for name, _ in model.named_children()] == ["block_0", "block_1"]
    assert type(model.block_0) is nn.Sequential and isinstance(model.block_1, Residual)
    x = torch.randn(2, 4)
    h = model.block_0(x)
    assert torch.equal(h, torch.relu(model.block_0[0](x)))
    assert torch.equal(model(x), h + torch.relu(model.block_1[0](h)))


def test_copies_of_yaml_aliases_stay_apart(tmp_path):
    """A spec used twice through a YAML alias: one copy's change reaches neither the other copies
    nor the other use."""
    model = build(tmp_path, """
        model:
          input_shape: [4, 16, 16]
          layers:
            a:
              type: Sequential
              repeat: 2
              copies: {0: {layers.0.stride: 2}}
              layers: &conv [{type: Conv2d, out_channels: 4, kernel_size: 1}]
            b: {type: Sequential, layers: *conv}
    """)
    assert [m[0].stride for m in (model.a_0, model.a_1, model.b)] == [(2, 2), (1, 1), (1, 1)]


@pytest.mark.parametrize("copies, message", [
    ("{3: {layers.conv1.stride: 2}}", "0 (Residual): copies: 3 is not a copy: repeat: 3 makes copies 0 to 2"),
    ("{0: {layers.conv2.stride: 2}}", "0 (Residual): copies: 0: 'layers.conv2.stride': layers has no key "
                                      "'conv2' (it has: conv1, act). Did you mean 'conv1'?"),
    ("{1: {repeat: 2}}", "1 (Residual): copies: 1: 'repeat' is the same for every copy"),
    ("[2]", "0 (Residual): copies must be a mapping from a copy's number to its changes"),
    ("{0: stride}", "0 (Residual): copies: 0: expected a mapping from dotted keys"),
    ("{0: {layers.act.inplace.x: 1}}", "copies: 0: 'layers.act.inplace.x': layers.act has no key 'inplace'"),
    ("{0: {layers.5.x: 1}}", "copies: 0: 'layers.5.x': layers has no key '5'"),
])
def test_copies_errors(cli, tmp_path, copies, message):
    path = write_config(tmp_path, f"""
        model:
          input_shape: [8, 8, 8]
          layers:
            - type: Residual
              repeat: 3
              layers:
                conv1: {{type: Conv2d, out_channels: 8, kernel_size: 3, padding: 1}}
                act: ReLU
              copies: {copies}
    """)
    result = cli("validate", path)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {path}:9: "), result.stderr
    assert message in result.stderr, result.stderr


def test_a_copys_change_is_blamed_on_its_own_line(cli, tmp_path):
    path = write_config(tmp_path, """
        model:
          input_shape: [8, 8, 8]
          layers:
            - type: Sequential
              repeat: 2
              copies:
                1:
                  layers.0.kernel_size: 3
                  layers.0.stride: 0
              layers:
                - {type: Conv2d, out_channels: 8, kernel_size: 1}
    """)
    result = cli("validate", path)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {path}:9: 1.0 (Conv2d): argument 'stride' is a size and must be "
                                    "positive, got 0"), result.stderr


# --- TorchScript and torch.export ---------------------------------------------------------------

BLOCKS = {  # a config's layers (input [4, 8, 8]) that end with the block, and the input
    "Residual": "- {type: Residual, layers: [{type: Conv2d, out_channels: 4, kernel_size: 3, padding: 1}, "
                "ReLU]}",
    "Residual with shortcut and post": """
      - type: Residual
        layers: [{type: Conv2d, out_channels: 8, kernel_size: 3, stride: 2, padding: 1}, BatchNorm2d]
        shortcut: {name: downsample, layers: [{type: Conv2d, out_channels: 8, kernel_size: 1, stride: 2}]}
        post: ReLU""",
    "Branches concat": "- {type: Branches, branches: {a: {type: Conv2d, out_channels: 2, kernel_size: 1}, "
                       "b: Identity}}",
    "Branches add": "- {type: Branches, merge: add, branches: [{type: Conv2d, out_channels: 4, "
                    "kernel_size: 1}, Identity]}",
    "Branches mul": "- {type: Branches, merge: mul, branches: {x: Identity, gate: [{type: AdaptiveAvgPool2d, "
                    "output_size: 1}, Sigmoid]}}",
    "Reshape": "- {type: Reshape, args: [16, 16]}",
    "Permute": "- {type: Permute, args: [-1, 0, 1]}",
    "SequenceOutput": "- {type: Reshape, args: [4, 64]}\n- {type: GRU, hidden_size: 5}\n- SequenceOutput",
    "LastStep": "- {type: Reshape, args: [4, 64]}\n- {type: LSTM, hidden_size: 5}\n- LastStep",
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_every_block_scripts_and_exports(tmp_path, name):
    """Each nncli block, as nncli builds it, compiles with torch.jit.script and torch.export.export,
    and computes what it computes in eager mode; so does the whole model."""
    layers = "\n".join("    " + line for line in BLOCKS[name].strip("\n").splitlines())
    model = build(tmp_path, f"model:\n  input_shape: [4, 8, 8]\n  layers:\n{layers}\n").eval()
    block = model[len(model) - 1]
    assert type(block).__name__ == name.split()[0]
    x = torch.randn(2, 4, 8, 8)
    block_in = model[:-1](x) if len(model) > 1 else x
    expected = block(block_in)
    assert torch.equal(torch.jit.script(block)(block_in), expected)
    assert torch.equal(torch.export.export(block, (block_in,)).module()(block_in), expected)
    assert torch.equal(torch.jit.script(model)(x), model(x))


def test_resnet18_scripts_and_exports():
    model = nncli.build_model(nncli.load_config(CONFIGS / "resnet18.yaml"), input_shape=(3, 32, 32)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(torch.jit.script(model)(x), expected)
        torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), expected)


def test_blocks_are_plain_modules():
    """Built by hand in Python, as a user of the library would."""
    res = Residual(OrderedDict(fc=nn.Linear(3, 3)), shortcut=nn.Linear(3, 3), shortcut_name="proj",
                   post=nn.ReLU())
    assert [name for name, _ in res.named_children()] == ["fc", "proj", "post"]
    x = torch.randn(2, 3)
    assert torch.equal(res(x), torch.relu(res.fc(x) + res.proj(x)))
    assert torch.equal(Branches(nn.Identity(), nn.Identity(), merge="mul")(x), x * x)
    assert "merge=mul" in repr(Branches(nn.Identity(), merge="mul"))
    with pytest.raises(ValueError, match="merge must be one of concat, add, mul"):
        Branches(nn.Identity(), merge="sum")
    assert Permute(-1, 0)(torch.randn(2, 3, 5)).shape == (2, 5, 3)
    assert Reshape(5, -1)(torch.randn(2, 10)).shape == (2, 5, 2)
    state = (torch.randn(2, 4, 5), torch.randn(1, 2, 5))
    assert torch.equal(SequenceOutput()(state), state[0]) and torch.equal(LastStep()(state), state[0][:, -1])


# --- the broken configs and `nncli layers` -------------------------------------------------------------

def test_broken_corpus_has_the_block_errors():
    names = {p.stem for p in BROKEN.glob("*.yaml")}
    assert {"81_residual_shortcut_shape", "82_branches_cannot_concatenate",
            "83_copies_beyond_repeat"} <= names


def test_layers_describes_a_blocks_keys(cli):
    result = ok(cli("layers", "Branches"))
    for key in ("branches:", "merge:", "dim:"):
        assert key in result.stdout
    assert "concat (the default), add, or mul" in result.stdout
    assert "shortcut:" in ok(cli("layers", "Residual")).stdout
