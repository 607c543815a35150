"""The model builder: configs become the same `nn.Sequential` a person would write by hand.

The reference networks are the tutorial's (/work/shared/seed): the three ways to write a
Sequential (net1 add_module, net2 positional, net3 OrderedDict) and its multilayer perceptron.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict

import numpy as np
import pytest
import torch
from helpers import CONFIGS, FROZEN_AND_HEAD, invoke, write_config
from torch import nn

import nncli
from nncli.config.yamlio import parse_yaml

# --- the tutorial's hand-written networks ------------------------------------------------------

def tutorial_net1() -> nn.Sequential:
    net1 = nn.Sequential()
    net1.add_module("conv", nn.Conv2d(3, 3, 3))
    net1.add_module("batchnorm", nn.BatchNorm2d(3))
    net1.add_module("active", nn.ReLU())
    return net1


def tutorial_net2() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3), nn.ReLU())


def tutorial_net3() -> nn.Sequential:
    return nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(3, 3, 3)),
        ("batchnorm", nn.BatchNorm2d(3)),
        ("active", nn.ReLU()),
    ]))


class TutorialLinear(nn.Module):
    """The tutorial's own fully connected layer: x.mm(W) + b."""

    def __init__(self, in_feature, out_feature):
        super().__init__()
        self.W = nn.Parameter(torch.randn(in_feature, out_feature))
        self.b = nn.Parameter(torch.randn(out_feature))

    def forward(self, x):
        x = x.mm(self.W)
        return x + self.b.expand_as(x)


class TutorialPerceptron(nn.Module):
    """The tutorial's Perceptron with its bug fixed: layer2 takes hidden_feature, not in_feature."""

    def __init__(self, in_feature, hidden_feature, out_feature):
        super().__init__()
        self.layer1 = TutorialLinear(in_feature, hidden_feature)
        self.layer2 = TutorialLinear(hidden_feature, out_feature)

    def forward(self, x):
        x = self.layer1(x)
        x = torch.sigmoid(x)
        return self.layer2(x)


def build(path, seed: int | None = 0, **kwargs) -> nn.Sequential:
    config = nncli.load_config(path)
    if seed is not None:
        torch.manual_seed(seed)
    return nncli.build_model(config, **kwargs)


def plan(tmp_path, text: str, batch_size: int = 1):
    return nncli.plan_model(nncli.load_config(write_config(tmp_path, text)), batch_size=batch_size)


def arguments(layer) -> dict:
    """The constructor arguments a planned layer will be built with, by name (inferred ones too)."""
    import inspect

    return dict(inspect.signature(layer.entry.factory).bind(*layer.args, **layer.kwargs).arguments)


# --- the three Sequential forms ------------------------------------------------------------------

SEED_FORMS = [("seed_add_module.yaml", tutorial_net1), ("seed_positional.yaml", tutorial_net2),
              ("seed_ordered_dict.yaml", tutorial_net3)]


@pytest.mark.parametrize("filename, reference", SEED_FORMS, ids=["net1", "net2", "net3"])
def test_seed_sequential_matches_tutorial(filename, reference):
    model = build(CONFIGS / filename, seed=1234)
    torch.manual_seed(1234)
    expected = reference()
    assert type(model) is nn.Sequential
    assert repr(model) == repr(expected)
    assert list(model.state_dict()) == list(expected.state_dict())
    for (name, got), want in zip(model.state_dict().items(), expected.state_dict().values()):
        assert torch.equal(got, want), name
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), expected(x))


def test_seed_forms_state_dict_keys():
    keys = {f: list(build(CONFIGS / f).state_dict()) for f, _ in SEED_FORMS}
    assert keys["seed_add_module.yaml"] == keys["seed_ordered_dict.yaml"] == [
        "conv.weight", "conv.bias", "batchnorm.weight", "batchnorm.bias", "batchnorm.running_mean",
        "batchnorm.running_var", "batchnorm.num_batches_tracked"]
    assert keys["seed_positional.yaml"][:2] == ["0.weight", "0.bias"]
    # named children are reachable by name, positional ones by index, as in the tutorial
    assert isinstance(build(CONFIGS / "seed_add_module.yaml").conv, nn.Conv2d)
    assert isinstance(build(CONFIGS / "seed_positional.yaml")[1], nn.BatchNorm2d)


def test_seed_module_list_registers_the_layers_as_the_tutorial_does():
    """MyModule's ModuleList as a nested block: the same state_dict keys, and with the same seed
    the same weights as an nn.ModuleList of the same layers; the block also runs them in turn."""
    class MyModule(nn.Module):
        def __init__(self):
            super().__init__()
            self.li = [nn.Linear(3, 4), nn.Conv2d(3, 3, (1, 2)), nn.ReLU()]  # not registered
            self.module_li = nn.ModuleList([nn.Linear(3, 4), nn.Conv2d(3, 3, (1, 2)), nn.ReLU()])

    model = build(CONFIGS / "seed_module_list.yaml", seed=5)
    assert list(model.state_dict()) == list(MyModule().state_dict()) == [
        "module_li.0.weight", "module_li.0.bias", "module_li.1.weight", "module_li.1.bias"]
    torch.manual_seed(5)
    expected = nn.ModuleList([nn.Linear(3, 4), nn.Conv2d(3, 3, (1, 2)), nn.ReLU()])
    for got, want in zip(model.module_li, expected):
        assert repr(got) == repr(want)
        for (name, a), b in zip(got.state_dict().items(), want.state_dict().values()):
            assert torch.equal(a, b), name
    x = torch.randn(2, 3, 5, 3)
    torch.testing.assert_close(model(x), expected[2](expected[1](expected[0](x))))


def test_different_seed_gives_different_weights():
    a = build(CONFIGS / "seed_positional.yaml", seed=0)
    b = build(CONFIGS / "seed_positional.yaml", seed=1)
    assert not torch.equal(a[0].weight, b[0].weight)


# --- the plugin: the tutorial's own Linear ---------------------------------------------------------

def test_seed_perceptron_matches_tutorial_with_bug_fixed():
    model = build(CONFIGS / "seed_perceptron.yaml", seed=7)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes == {"layer1.W": (3, 4), "layer1.b": (4,), "layer2.W": (4, 1), "layer2.b": (1,)}
    torch.manual_seed(7)
    reference = TutorialPerceptron(3, 4, 1)
    for (name, got), (ref_name, want) in zip(model.named_parameters(), reference.named_parameters()):
        assert name == ref_name
        assert torch.equal(got, want), name
    x = torch.randn(5, 3)
    out = model(x)
    assert out.shape == (5, 1)
    torch.testing.assert_close(out, reference(x))


HALF_SQUARED_NORM = '''
from torch import nn
import nncli


@nncli.register_loss
class HalfSquaredNorm(nn.Module):
    """0.5 * sum(output ** 2), whose gradient is the output: the tutorial's out.backward(out)."""

    def forward(self, output, target):
        return 0.5 * (output ** 2).sum()


@nncli.register_loss(class_indices=True)
class LabelSmoothed(nn.CrossEntropyLoss):
    def __init__(self, smoothing: float = 0.1):
        super().__init__(label_smoothing=smoothing)
'''


def test_plugin_loss_reproduces_the_tutorials_backward_step(tmp_path):
    """The tutorial's optimizer step: SGD(lr=1) on the perceptron, out.backward(out) on a batch of
    torch.rand(32, 3); through `nncli train` with a registered loss, the same weights."""
    torch.manual_seed(0)
    inputs = torch.rand(32, 3)
    np.savez(tmp_path / "batch.npz", x=inputs.numpy(), y=np.zeros((32, 1), dtype=np.float32))
    (tmp_path / "half_squared_norm.py").write_text(HALF_SQUARED_NORM)
    path = write_config(tmp_path, f"""
        seed: 7
        plugins: [{(CONFIGS / "plugins" / "seed_linear.py").resolve()}, half_squared_norm.py]
        data: {{source: npz, path: batch.npz, val_split: 0}}
        loss: HalfSquaredNorm
        optimizer: {{type: SGD, lr: 1}}
        train: {{epochs: 1, batch_size: 32, shuffle: false}}
        model:
          layers:
            layer1: {{type: SeedLinear, out_feature: 4}}
            sigmoid: Sigmoid
            layer2: {{type: SeedLinear, out_feature: 1}}
    """)
    result = invoke("train", path, "--out", tmp_path / "runs", "-q")
    assert result.exit_code == 0, result.stderr
    torch.manual_seed(7)
    perception = TutorialPerceptron(3, 4, 1)
    optimizer = torch.optim.SGD(params=perception.parameters(), lr=1)
    optimizer.zero_grad()
    out = perception(inputs)
    out.backward(out)
    optimizer.step()
    saved = torch.load(tmp_path / "runs" / "config" / "last.pt", weights_only=True)
    for name, value in perception.state_dict().items():
        assert torch.equal(saved["model"][name], value), name
    assert nncli.load_config(path)["metrics"] == []  # a loss not registered for class labels
    labels = nncli.load_config(path, ["loss={type: LabelSmoothed, smoothing: 0.2}"])
    assert labels["metrics"] == ["accuracy"]  # registered with class_indices=True
    from nncli.optim.losses import create_loss

    assert create_loss(labels).label_smoothing == 0.2


def test_a_plugin_layer_may_take_token_ids(tmp_path):
    """The input-dtype check covers torch's layers; a plugin layer says for itself what it takes."""
    (tmp_path / "tokens.py").write_text(
        "from torch import nn\nimport nncli\n\n\n@nncli.register_layer\nclass TokenEmbed(nn.Module):\n"
        "    def __init__(self, vocab: int, dim: int):\n        super().__init__()\n"
        "        self.embed = nn.Embedding(vocab, dim)\n\n"
        "    def forward(self, x):\n        return self.embed(x)\n")
    path = write_config(tmp_path, """
        plugins: [tokens.py]
        model:
          input_shape: [5]
          input_dtype: int64
          layers:
            - {type: TokenEmbed, vocab: 10, dim: 4}
            - Flatten
            - {type: Linear, out_features: 2}
    """)
    model = build(path)
    assert model(torch.tensor([[1, 2, 3, 4, 5]])).shape == (1, 2)


@pytest.mark.parametrize("status", ["0", "'done'"])
def test_a_plugin_that_exits_is_a_config_error_naming_it(cli, tmp_path, status):
    """sys.exit(0) in a plugin made `validate` end at once with exit 0, printing nothing."""
    (tmp_path / "script.py").write_text(f"import sys\nprint('imported')\nsys.exit({status})\n")
    path = write_config(tmp_path, """
        model:
          input_shape: [4]
          layers: [{type: Linear, out_features: 2}]
        plugins: [script.py]
    """)
    for command in ("validate", "train"):
        result = cli(command, path, "--out", tmp_path / "runs") if command == "train" else cli(command, path)
        assert result.exit_code == 2, (command, result.stdout, result.stderr)
        assert result.stderr == (f"error: {path}:4: plugins.0: plugin 'script.py' called sys.exit({status}) "
                                 "while being imported; a plugin defines and registers layers and losses. "
                                 "Remove the call, or put the script part of the file under "
                                 "if __name__ == '__main__':.\n")
    assert not (tmp_path / "runs").exists()


def test_a_registered_name_replaces_a_built_in_one():
    from nncli.registry import Registry

    registry = Registry("thing", lambda r: r.add("Linear", "torch's"))
    registry.add("Linear", "the user's")  # before the built-ins are loaded, as a plugin may
    assert registry.get("Linear") == "the user's"


def test_plugin_infers_in_feature(tmp_path):
    plugin = (CONFIGS / "plugins" / "seed_linear.py").resolve()
    path = write_config(tmp_path, f"""
        plugins: [{plugin}]
        model:
          input_shape: [6]
          layers:
            a: {{type: SeedLinear, out_feature: 5}}
            b: {{type: SeedLinear, out_feature: 2}}
    """)
    model = build(path)
    assert tuple(model.a.W.shape) == (6, 5) and tuple(model.b.W.shape) == (5, 2)


def test_register_layer_public_api(tmp_path):
    @nncli.register_layer(name="TestScale", infer={"width": -1})
    class Scale(nn.Module):
        def __init__(self, width: int, factor: float = 2.0):
            super().__init__()
            self.weight = nn.Parameter(torch.full((width,), float(factor)))

        def forward(self, x):
            return x * self.weight

    path = write_config(tmp_path, """
        model:
          input_shape: [3]
          layers: [{type: TestScale, factor: 3}]
    """)
    model = build(path)
    assert tuple(model[0].weight.shape) == (3,)
    torch.testing.assert_close(model(torch.ones(2, 3)), torch.full((2, 3), 3.0))


# --- shape inference ---------------------------------------------------------------------------------

def test_conv2d_pool_batchnorm_linear_inference(tmp_path):
    p = plan(tmp_path, """
        model:
          input_shape: [3, 32, 32]
          layers:
            - {type: Conv2d, out_channels: 16, kernel_size: 3, padding: 1}
            - BatchNorm2d
            - ReLU
            - {type: MaxPool2d, kernel_size: 2}
            - {type: Conv2d, out_channels: 8, kernel_size: 5, stride: 2}
            - {type: AvgPool2d, kernel_size: 2}
            - Flatten
            - {type: Linear, out_features: 10}
    """)
    leaves = {layer.path: layer for layer in p.walk()}
    assert arguments(leaves["0"])["in_channels"] == 3
    assert arguments(leaves["1"])["num_features"] == 16
    assert leaves["3"].output_shape == (1, 16, 16, 16)
    assert arguments(leaves["4"])["in_channels"] == 16
    assert leaves["4"].output_shape == (1, 8, 6, 6)  # (16 - 5) // 2 + 1
    assert leaves["5"].output_shape == (1, 8, 3, 3)
    assert arguments(leaves["7"])["in_features"] == 72
    assert p.output_shape == (1, 10)
    model = nncli.build_model(nncli.load_config(tmp_path / "config.yaml"))
    assert model(torch.randn(4, 3, 32, 32)).shape == (4, 10)


def test_conv1d_groupnorm_layernorm_inference(tmp_path):
    p = plan(tmp_path, """
        model:
          input_shape: [2, 32]
          layers:
            - {type: Conv1d, out_channels: 4, kernel_size: 3}
            - BatchNorm1d
            - {type: MaxPool1d, kernel_size: 2}
            - {type: GroupNorm, num_groups: 2}
            - LayerNorm
            - {type: LayerNorm, normalized_shape: [4, 15]}
    """)
    layers = list(p.walk())
    assert arguments(layers[0])["in_channels"] == 2
    assert arguments(layers[3])["num_channels"] == 4
    assert [layer.output_shape for layer in layers] == [(1, 4, 30), (1, 4, 30), (1, 4, 15),
                                                        (1, 4, 15), (1, 4, 15), (1, 4, 15)]
    model = nncli.build_model(nncli.load_config(tmp_path / "config.yaml"))
    assert (model[3].num_groups, model[3].num_channels) == (2, 4)
    assert model[4].normalized_shape == (15,)
    assert model[5].normalized_shape == (4, 15)
    assert model(torch.randn(3, 2, 32)).shape == (3, 4, 15)


def test_recurrent_last_step_and_sequence_output(tmp_path):
    p = plan(tmp_path, """
        model:
          input_shape: [7, 5]          # (time, features)
          layers:
            - {type: GRU, hidden_size: 6, num_layers: 2}
            - SequenceOutput
            - {type: LSTM, hidden_size: 4}
            - LastStep
            - {type: Linear, out_features: 3}
    """)
    layers = list(p.walk())
    assert arguments(layers[0])["batch_first"] is True  # nncli's default for recurrent layers
    assert layers[1].output_shape == (1, 7, 6)
    assert layers[3].output_shape == (1, 4)
    assert p.output_shape == (1, 3)
    model = nncli.build_model(nncli.load_config(tmp_path / "config.yaml"))
    assert (model[0].input_size, model[0].hidden_size, model[0].num_layers) == (5, 6, 2)
    assert model[2].input_size == 6
    x = torch.randn(2, 7, 5)
    out = model(x)
    assert out.shape == (2, 3)
    seq, _ = model[0](x)
    last, _ = model[2](seq)
    torch.testing.assert_close(out, model[4](last[:, -1]))


def test_nested_sequential_parameter_names(tmp_path):
    path = write_config(tmp_path, """
        model:
          input_shape: [8]
          layers:
            block:
              type: Sequential
              layers:
                - {type: Linear, out_features: 16}
                - ReLU
            head: {type: Linear, out_features: 2}
    """)
    model = build(path)
    assert [n for n, _ in model.named_parameters()] == ["block.0.weight", "block.0.bias",
                                                        "head.weight", "head.bias"]
    assert type(model.block) is nn.Sequential
    assert model.head.in_features == 16


def test_residual_adds_its_input(tmp_path):
    path = write_config(tmp_path, """
        model:
          input_shape: [6]
          layers:
            - {type: Linear, out_features: 4}
            - type: Residual
              layers:
                - {type: Linear, out_features: 4}
                - Tanh
    """)
    model = build(path)
    from nncli.model.blocks import Residual

    assert isinstance(model[1], Residual)
    x = torch.randn(3, 4)
    torch.testing.assert_close(model[1](x), x + torch.tanh(model[1][0](x)))


def test_repeat(tmp_path):
    path = write_config(tmp_path, """
        model:
          input_shape: [4]
          layers:
            - {type: Linear, out_features: 8}
            - {type: Linear, out_features: 8, repeat: 3}
            - {name: act, type: ReLU, repeat: 2}
    """)
    model = build(path)
    assert [name for name, _ in model.named_children()] == ["0", "1", "2", "3", "act_0", "act_1"]
    assert [m.in_features for m in list(model)[:4]] == [4, 8, 8, 8]
    # repeated layers are separate modules with their own weights
    assert not torch.equal(model[1].weight, model[2].weight)


@pytest.mark.parametrize("layers", [
    "[{type: ReLU, repeat: 100000000}]",
    "[{type: Sequential, repeat: 1000, layers: [{type: ReLU, repeat: 1000}]}]"])
def test_a_repeat_beyond_any_model_is_refused_at_once(cli, tmp_path, layers):
    """repeat: 100,000,000 (or repeats nested into a million layers) is bad input, said before the
    copies are made, not minutes of building modules."""
    path = write_config(tmp_path, f"model:\n  input_shape: [4]\n  layers: {layers}\n")
    start = time.monotonic()
    result = cli("validate", path)
    assert result.exit_code == 2, result.stdout + result.stderr
    assert "the model has more than 10,000 layers" in result.stderr and f"{path}:3:" in result.stderr
    assert time.monotonic() - start < 30


def test_trainable_counts_in_nested_blocks(tmp_path):
    """A block counts only what its layers leave trainable; a frozen block freezes all it holds."""
    p = plan(tmp_path, """
        model:
          input_shape: [4]
          layers:
            block:
              type: Sequential
              layers:
                a: {type: Linear, out_features: 4}
                b: {type: Linear, out_features: 4, trainable: false}
            frozen:
              type: Sequential
              trainable: false
              layers:
                c: {type: Linear, out_features: 4, trainable: true}
    """)
    counts = {layer.path: (layer.params, layer.trainable_params) for layer in p.walk()}
    assert counts == {"block": (40, 20), "block.a": (20, 20), "block.b": (20, 0), "frozen": (20, 0),
                      "frozen.c": (20, 0)}
    assert sum(t.numel() for t in p.model.parameters() if t.requires_grad) == 20


def test_trainable_false(tmp_path):
    path = write_config(tmp_path, FROZEN_AND_HEAD)
    model = build(path)
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    assert grads == {"frozen.weight": False, "frozen.bias": False, "head.weight": True, "head.bias": True}
    p = nncli.plan_model(nncli.load_config(path))
    assert [(layer.params, layer.trainable_params) for layer in p.layers] == [(15, 0), (8, 8)]


def test_build_model_with_input_shape_argument():
    model = build(CONFIGS / "seed_positional.yaml", input_shape=(3, 16, 16))
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 3, 14, 14)


def test_permute_and_reshape(tmp_path):
    path = write_config(tmp_path, """
        model:
          input_shape: [12]
          layers:
            - {type: Reshape, args: [3, 4]}
            - {type: Permute, args: [1, 0]}
            - Flatten
    """)
    p = nncli.plan_model(nncli.load_config(path))
    assert [layer.output_shape for layer in p.layers] == [(1, 3, 4), (1, 4, 3), (1, 12)]
    model = build(path)
    x = torch.arange(24.0).reshape(2, 12)
    torch.testing.assert_close(model(x), x.reshape(2, 3, 4).permute(0, 2, 1).reshape(2, 12))


def test_plan_allocates_no_weights():
    p = nncli.plan_model(nncli.load_config(CONFIGS / "digits_cnn.yaml"), input_shape=(1, 8, 8))
    assert all(param.is_meta for param in p.model.parameters())
    assert p.output_shape == (1, 10)


def _plan_facts(plan) -> list:
    return [(p.path, p.type, p.output_shape, p.params, p.macs, p.activation_bytes) for p in plan.walk()]


@pytest.mark.parametrize("name, shape", [("digits_cnn.yaml", (1, 8, 8)), ("resnet18.yaml", None)])
def test_the_check_plans_a_small_model_on_the_cpu_and_a_large_one_on_meta(name, shape):
    """validate and summary check shapes with plan_to_check: a model under its 4M-element budget
    on the CPU (faster than the meta device's first use), ResNet-18 (11.7M parameters) on meta;
    both give the plan the meta device gives, MACs included."""
    from nncli.model.plan import plan_to_check

    config = nncli.load_config(CONFIGS / name)
    checked = plan_to_check(config, shape, batch_size=2, count_macs=True)
    on_meta = nncli.plan_model(config, shape, batch_size=2, count_macs=True)
    assert _plan_facts(checked) == _plan_facts(on_meta)
    devices = {param.device.type for param in checked.model.parameters()}
    assert devices == ({"cpu"} if name == "digits_cnn.yaml" else {"meta"})


HUGE_LAYERS = {  # what each would take on the CPU
    "a 10-billion-parameter Linear (40 GB)": ("[100000]", "{type: Linear, out_features: 100000}"),
    "out_channels: 40960 on a 64x64 image (630 MB)": ("[1, 64, 64]",
                                                       "{type: Conv2d, out_channels: 40960, kernel_size: 3}"),
    "a 1024x1024 image (17 GB out)": ("[3, 1024, 1024]",
                                      "{type: Conv2d, out_channels: 4096, kernel_size: 3}"),
}


@pytest.mark.parametrize("shape, layer", HUGE_LAYERS.values(), ids=HUGE_LAYERS)
def test_a_huge_layer_is_checked_on_meta_without_allocating_it(tmp_path, shape, layer):
    """The CPU pass's budget refuses these before torch allocates or computes them (a large sample
    goes to meta at once), and they are planned on meta: validate answers at once."""
    from nncli.model.plan import plan_to_check

    path = write_config(tmp_path, f"""
        model:
          input_shape: {shape}
          layers:
            - {layer}
            - ReLU
        """)
    plan = plan_to_check(nncli.load_config(path))
    assert all(p.is_meta for p in plan.model.parameters())
    assert plan.layers[0].params == sum(p.numel() for p in plan.model.parameters())


# --- public API and YAML details ----------------------------------------------------------------

def test_public_api_names():
    for name in ("load_config", "build_model", "plan_model", "register_layer", "summarize",
                 "ConfigError", "RunError", "Config"):
        assert getattr(nncli, name) is not None
    with pytest.raises(AttributeError):
        nncli.no_such_name  # noqa: B018


def test_load_config_fills_defaults():
    config = nncli.load_config(CONFIGS / "seed_positional.yaml")
    assert isinstance(config, nncli.Config)
    assert config["name"] == "seed_positional"
    assert config["train"]["epochs"] == 10 and config["train"]["batch_size"] == 64
    assert config["optimizer"] == {"type": "Adam", "lr": 1e-3}
    assert config["metrics"] == ["accuracy"]  # CrossEntropyLoss by default
    assert config["model"]["input_shape"] == [3, 8, 8]


def test_load_config_error_is_config_error(tmp_path):
    path = write_config(tmp_path, "model: {layers: [ReLU]}\nseed: [1]\n")
    with pytest.raises(nncli.ConfigError) as info:
        nncli.load_config(path)
    assert info.value.exit_code == 2
    assert info.value.line == 2
    assert str(info.value).startswith(f"{path}:2: seed: expected an integer")


@pytest.mark.parametrize("text, value", [
    # numbers: exponents without a dot, explicit signs, underscores
    ("1e-4", 1e-4), ("3e5", 3e5), ("1.0E-3", 1e-3), ("-2.5e+2", -250.0), (".5", 0.5), ("1_000", 1000),
    # only true and false are booleans: off, on, yes and no stay strings
    ("off", "off"), ("on", "on"), ("yes", "yes"), ("no", "no"), ("true", True), ("False", False),
    ("null", None),
])
def test_yaml_scalars(text, value):
    loaded = parse_yaml(f"x: {text}")["x"]
    assert loaded == value
    assert type(loaded) is type(value)


def test_yaml_numbers_in_config(tmp_path):
    path = write_config(tmp_path, """
        optimizer: {type: SGD, lr: 1e-4, weight_decay: 3e5, momentum: 1.0E-3}
        model: {input_shape: [4], layers: [{type: Linear, out_features: 2}]}
    """)
    opt = nncli.load_config(path)["optimizer"]
    assert (opt["lr"], opt["weight_decay"], opt["momentum"]) == (1e-4, 3e5, 1e-3)
    assert all(isinstance(opt[k], float) for k in ("lr", "weight_decay", "momentum"))


def test_amp_off_stays_a_string(tmp_path):
    path = write_config(tmp_path, """
        amp: off
        model: {input_shape: [4], layers: [{type: Linear, out_features: 2}]}
    """)
    assert nncli.load_config(path)["amp"] == "off"


def test_yaml_keeps_lines():
    doc = parse_yaml("a: 1\nb:\n  - x\n  - {c: 2}\n")
    assert doc.line_of("a") == 1 and doc.line_of("b") == 2
    assert doc["b"].line_of(0) == 3 and doc["b"].line_of(1) == 4
    assert doc["b"][1].line_of("c") == 4


def test_inferred_argument_may_be_given_when_it_agrees(tmp_path):
    p = plan(tmp_path, """
        model:
          input_shape: [3, 8, 8]
          layers:
            - {type: Conv2d, in_channels: 3, out_channels: 4, kernel_size: [3, 3]}
            - {type: BatchNorm2d, num_features: 4}
    """)
    assert p.output_shape == (1, 4, 6, 6)
    model = nncli.build_model(nncli.load_config(tmp_path / "config.yaml"))
    assert model[0].kernel_size == (3, 3)
    assert math.prod(model[0].weight.shape) == 4 * 3 * 3 * 3
