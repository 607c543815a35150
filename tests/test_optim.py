"""Losses, the optimizer and its parameter groups, LR schedules with warmup, clipping and
gradient accumulation: read back from the optimizer and from metrics.csv."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import CONFIGS, TINY_REGRESSION, invoke, load, read_metrics, write_config

GROUPS = """
seed: 0
data: {source: synthetic, kind: regression, n: 64, features: 3, val_split: 0.25}
loss: MSELoss
optimizer:
  type: SGD
  lr: 0.1
  momentum: 0.5
  groups:
    - name: biases
      params: "*.bias"
      lr: 0.5
    - name: head
      params: ["fc2.*"]
      lr: 0.05
      momentum: 0.9
train: {epochs: 2, batch_size: 16}
model:
  layers:
    fc1: {type: Linear, out_features: 4}
    act: ReLU
    fc2: {type: Linear, out_features: 1}
"""


def prepare(path, **kwargs):
    from nncli.run.setup import load_config, prepare_run

    return prepare_run(load_config(path), **kwargs)


def schedule_config(tmp_path, schedule: str, *, train: str = "train: {epochs: 5, batch_size: 16}",
                    data: str = "val_split: 0.25", name: str = "sched.yaml"):
    text = (TINY_REGRESSION.replace("train: {epochs: 3, batch_size: 16}", train)
            .replace("val_split: 0.25", data) + f"schedule: {schedule}\n")
    return write_config(tmp_path, text, name)


def lr_column(tmp_path, config, *args) -> list[float]:
    result = invoke("train", config, "--out", tmp_path / "runs", "--quiet", *args)
    assert result.exit_code == 0, result.stderr
    runs = sorted((tmp_path / "runs").iterdir())
    return [row["lr_0"] for row in read_metrics(runs[-1])[1]]


# --- parameter groups ---------------------------------------------------------------------

def test_each_tensor_gets_its_groups_lr_and_the_default_group_is_last(tmp_path):
    run = prepare(write_config(tmp_path, GROUPS, "groups.yaml"), run_dir=tmp_path / "run")
    params = dict(run.model.named_parameters())
    groups = run.optimizer.param_groups
    assert [g.name for g in run.groups] == ["biases", "head", "default"]
    assert [g.param_names for g in run.groups] == [["fc1.bias", "fc2.bias"], ["fc2.weight"], ["fc1.weight"]]
    expected = [(["fc1.bias", "fc2.bias"], 0.5, 0.5),   # first match wins: fc2.bias is a bias
                (["fc2.weight"], 0.05, 0.9),
                (["fc1.weight"], 0.1, 0.5)]             # the rest: the optimizer's own settings
    assert len(groups) == len(expected)
    for group, (names, lr, momentum) in zip(groups, expected):
        assert [id(p) for p in group["params"]] == [id(params[n]) for n in names]
        assert group["lr"] == lr and group["momentum"] == momentum
    assert run.groups[-1].patterns == ["(rest)"]
    assert isinstance(run.optimizer, torch.optim.SGD)


def test_shipped_lr_groups_config_gives_the_tutorials_groups(tmp_path):
    run = prepare(CONFIGS / "perceptron_lr_groups.yaml", run_dir=tmp_path / "run")
    params = dict(run.model.named_parameters())
    by_name = [(g.name, [n for n, p in params.items() if any(p is q for q in group["params"])], group["lr"])
               for g, group in zip(run.groups, run.optimizer.param_groups)]
    # every parameter matched a pattern: no default group
    assert by_name == [("bias", ["layer1.b", "layer2.b"], 0.1), ("weight", ["layer1.W", "layer2.W"], 1e-4)]


def test_without_groups_one_default_group_holds_everything(tmp_path):
    run = prepare(write_config(tmp_path, TINY_REGRESSION, "tiny.yaml"), run_dir=tmp_path / "run")
    assert [(g.name, g.patterns) for g in run.groups] == [("default", ["*"])]
    assert len(run.optimizer.param_groups) == 1
    assert len(run.optimizer.param_groups[0]["params"]) == 2


def test_group_lrs_reach_metrics_csv_and_the_table_comes_before_epoch_1(tmp_path):
    config = write_config(tmp_path, GROUPS, "groups.yaml")
    result = invoke("train", config, "--out", tmp_path / "runs")
    assert result.exit_code == 0, result.stderr
    header, rows = read_metrics(tmp_path / "runs" / "groups")
    # named by the groups' names; the default group, which the config does not name, by its index
    assert [h for h in header if h.startswith("lr_")] == ["lr_biases", "lr_head", "lr_2"]
    assert all((r["lr_biases"], r["lr_head"], r["lr_2"]) == (0.5, 0.05, 0.1) for r in rows)
    out = result.stdout
    table = out.index("Optimizer groups")
    assert table < out.index("epoch 1/2")
    table_text = out[table:out.index("epoch 1/2")]
    for text in ("biases", "*.bias", "head", "fc2.*", "default", "(rest)", "lr=0.5", "lr=0.05", "lr=0.1"):
        assert text in table_text, text
    table_lines = table_text.splitlines()
    biases = next(line for line in table_lines if "biases" in line)
    assert "│ 2 " in biases and "│ 5 " in biases  # fc1.bias (4) + fc2.bias (1): 2 tensors, 5 numbers


def test_unnamed_groups_keep_their_index_as_column(tmp_path):
    config = write_config(tmp_path, GROUPS.replace("    - name: biases\n      params", "    - params"),
                          "groups.yaml")
    result = invoke("train", config, "--out", tmp_path / "runs", "--quiet", "--epochs", 1)
    assert result.exit_code == 0, result.stderr
    header, rows = read_metrics(tmp_path / "runs" / "groups")
    assert [h for h in header if h.startswith("lr_")] == ["lr_0", "lr_head", "lr_2"]


@pytest.mark.parametrize("first, second, column", [("head", "head", "lr_head"), ("null", "'0'", "lr_0")])
def test_two_groups_cannot_share_a_learning_rate_column(tmp_path, first, second, column):
    text = GROUPS.replace("name: biases", f"name: {first}").replace("name: head", f"name: {second}")
    config = write_config(tmp_path, text, "groups.yaml")
    result = invoke("validate", config)
    assert result.exit_code == 2
    assert result.stderr == (f"error: {config}:12: optimizer.groups.1.name: two groups' learning rates "
                             f"would share the column {column} of metrics.csv; give each group a name of its "
                             "own\n")


def test_a_pattern_matching_nothing_exits_2_with_file_and_line(tmp_path):
    config = write_config(tmp_path, GROUPS.replace('["fc2.*"]', '["fc2.*", "*.gamma"]'), "groups.yaml")
    result = invoke("train", config, "--out", tmp_path / "runs")
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {config}:13: optimizer.groups.1.params: pattern '*.gamma' matches no trainable "
        "parameter (they are named like: fc1.weight, fc1.bias, fc2.weight, fc2.bias). "
        "Run `nncli summary --params` to list them.\n")
    assert not (tmp_path / "runs").exists()


def test_a_group_that_earlier_groups_leave_empty_is_a_warning(tmp_path):
    """A warning, not an error: runs saved before this check must resume, and their groups may not
    change."""
    config = write_config(tmp_path, GROUPS.replace('params: "*.bias"', 'params: "*"'), "groups.yaml")
    result = invoke("validate", config)
    assert result.exit_code == 0
    assert result.stderr == (
        f"warning: {config}:13: optimizer.groups.1.params: every parameter that fc2.* matches is taken by an "
        "earlier group, so this group's settings apply to nothing. Put the more specific group first.\n")


def test_a_groups_settings_are_type_checked(tmp_path):
    config = write_config(tmp_path, GROUPS.replace("lr: 0.05", "lr: fast"), "groups.yaml")
    result = invoke("validate", config)
    assert result.exit_code == 2
    assert result.stderr == (f"error: {config}:14: optimizer.groups.1.lr: SGD's lr expects a number or a "
                             "tensor (a list of numbers), got 'fast'\n")


def test_a_zero_warmup_is_no_warmup(tmp_path):
    """warmup: {epochs: 0} switches warmup off (and a run saved with it resumes)."""
    config = write_config(tmp_path, GROUPS + "schedule: {type: StepLR, step_size: 1, warmup: {epochs: 0}}\n",
                          "zero.yaml")
    run = prepare(config, run_dir=tmp_path / "r")
    assert run.schedule.scheduler.__class__.__name__ == "StepLR"  # no LinearLR ramp in front


@pytest.mark.parametrize("change, message", [
    (('params: "*.bias"', 'weight_decay: 0.5'), "optimizer.groups.0: each group needs 'params:'"),
    (('params: "*.bias"', "params: []"),
     "optimizer.groups.0.params: params must be a glob string or a list of them"),
    (("lr: 0.05", "lrr: 0.05"), "optimizer.groups.1.lrr: SGD has no setting 'lrr'; a group may set: lr, "
                                "momentum, dampening, weight_decay, nesterov"),
    (("lr: 0.1", "lr: -1"),
     "optimizer: SGD cannot be built with lr=-1, momentum=0.5: Invalid learning rate: -1"),
    (("type: SGD", "type: SDG"), "optimizer.type: unknown optimizer 'SDG'. Did you mean 'SGD'?"),
    (("momentum: 0.5", "momentun: 0.5"), "optimizer.momentun: SGD has no argument 'momentun'"),
])
def test_bad_optimizer_sections_exit_2(tmp_path, change, message):
    config = write_config(tmp_path, GROUPS.replace(*change, 1), "groups.yaml")
    result = invoke("train", config, "--out", tmp_path / "runs")
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr
    assert result.stderr.startswith(f"error: {config}:")


def test_an_optimizer_refused_for_a_set_value_says_so(tmp_path):
    """The optimizer as a whole cannot be built: the file's line is named, and the --set value."""
    result = invoke("validate", CONFIGS / "digits_mlp.yaml", "--set", "optimizer.lr=-1")
    assert result.exit_code == 2
    assert result.stderr == (f"error: {CONFIGS / 'digits_mlp.yaml'}:11: optimizer: Adam cannot be built with "
                             "lr=-1: Invalid learning rate: -1. (--set changed optimizer.lr.)\n")


# --- losses --------------------------------------------------------------------------------

def test_loss_with_arguments_and_loss_errors(tmp_path):
    from nncli.optim.losses import create_loss
    from nncli.run.setup import load_config

    config = write_config(tmp_path, TINY_REGRESSION.replace("loss: MSELoss",
                                                            "loss: {type: HuberLoss, delta: 0.25}"),
                          "tiny.yaml")
    loss = create_loss(load_config(config))
    assert isinstance(loss, torch.nn.HuberLoss) and loss.delta == 0.25
    assert invoke("train", config, "--out", tmp_path / "runs", "-q", "--epochs", 1).exit_code == 0

    typo = write_config(tmp_path, TINY_REGRESSION.replace("loss: MSELoss", "loss: MSELos"), "typo.yaml")
    result = invoke("train", typo, "--out", tmp_path / "runs")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {typo}:3: loss: unknown loss 'MSELos'")
    assert "Did you mean 'MSELoss'?" in result.stderr

    bad_arg = write_config(tmp_path, TINY_REGRESSION.replace("loss: MSELoss",
                                                             "loss: {type: HuberLoss, delt: 1}"),
                           "arg.yaml")
    result = invoke("train", bad_arg, "--out", tmp_path / "runs")
    assert result.exit_code == 2
    assert ("loss.delt: HuberLoss has no argument 'delt'" in result.stderr
            and "Did you mean 'delta'?" in result.stderr)


CLASSES = """
seed: 0
data: {source: synthetic, n: 96, features: 4, classes: 3, val_split: 0}
train: {epochs: 1, batch_size: 96, shuffle: false}
model:
  layers:
    - {type: Linear, out_features: 3}
"""


def test_class_weights_are_given_as_a_list(tmp_path):
    """loss.weight (CrossEntropyLoss's class weights) as a YAML list becomes the tensor torch takes:
    the first epoch's loss is the weighted one of the initial model."""
    config = write_config(tmp_path, CLASSES + "loss: {type: CrossEntropyLoss, weight: [1, 1, 3]}\n", "w.yaml")
    assert invoke("train", config, "--out", tmp_path / "runs", "-q").exit_code == 0
    run = prepare(config, run_dir=tmp_path / "x")
    with torch.no_grad():  # one batch of everything: the initial model's loss
        out = run.model(run.data.train.x)
    expected = torch.nn.functional.cross_entropy(out, run.data.train.y, weight=torch.tensor([1.0, 1.0, 3.0]))
    assert (read_metrics(tmp_path / "runs" / "w")[1][0]["train_loss"]
            == pytest.approx(float(expected), rel=1e-6))
    # a float64 model gets float64 weights
    f64 = write_config(tmp_path, config.read_text().replace("model:\n", "model:\n  input_dtype: float64\n"),
                       "w64.yaml")
    assert invoke("train", f64, "--out", tmp_path / "runs", "-q").exit_code == 0


COMPUTED = (":7: loss: CrossEntropyLoss fails when computed (on zeros shaped as the model's output, [3], "
            "and two targets): ")


@pytest.mark.parametrize("loss, message", [
    ("{type: CrossEntropyLoss, weight: [1, 2]}",
     COMPUTED + "weight tensor should be defined either for all 3 classes or no classes"),
    ("{type: CrossEntropyLoss, weight: [1, a, 2]}",
     ":7: loss.weight: expected a number or a list of numbers, got [1, 'a', 2]"),
    ("{type: CrossEntropyLoss, reduction: avg}", COMPUTED + "avg is not a valid value for reduction"),
    ("{type: CrossEntropyLoss, label_smoothing: 2}",
     COMPUTED + "label_smoothing must be between 0.0 and 1.0. Got: 2"),
])
def test_a_loss_that_fails_when_computed_is_refused_before_training(tmp_path, loss, message):
    config = write_config(tmp_path, CLASSES + f"loss: {loss}\n", "bad.yaml")
    for command in ("validate", "train"):
        result = invoke(command, config, "--out", tmp_path / "runs") if command == "train" else \
            invoke(command, config)
        assert result.exit_code == 2, result.stdout
        assert result.stderr.startswith(f"error: {config}{message}"), result.stderr
    assert not (tmp_path / "runs").exists()


def test_sum_reduction_is_passed_to_the_loss(tmp_path):
    """The tutorial's MSELoss(size_average=False): the epoch loss is a sum over the batch."""
    result = invoke("train", CONFIGS / "linear_regression.yaml", "--epochs", 1, "--out", tmp_path, "-q")
    assert result.exit_code == 0
    run = prepare(CONFIGS / "linear_regression.yaml", run_dir=tmp_path / "x")
    with torch.no_grad():  # the initial model on the three points, before the first step
        out = run.model(run.data.train.x)
    expected = float(((out - run.data.train.y) ** 2).sum())
    assert (read_metrics(tmp_path / "linear_regression")[1][0]["train_loss"]
            == pytest.approx(expected, rel=1e-6))


# --- schedules -----------------------------------------------------------------------------

def test_epoch_schedule_with_warmup(tmp_path):
    """LinearLR from 0.1 x lr over 2 epochs, then StepLR halving every 2 epochs."""
    config = schedule_config(tmp_path, "{type: StepLR, step_size: 2, gamma: 0.5, "
                                       "warmup: {epochs: 2, start_factor: 0.1}}",
                             train="train: {epochs: 7, batch_size: 48}")
    assert lr_column(tmp_path, config) == pytest.approx([0.01, 0.055, 0.1, 0.1, 0.05, 0.05, 0.025])


def test_step_schedule_with_warmup_in_steps(tmp_path):
    """4 optimizer steps per epoch; warmup over 3 steps, then StepLR halving every 4 steps.
    lr_0 is the learning rate at the start of each epoch (after 0, 4, 8, ... steps)."""
    config = schedule_config(tmp_path, "{type: StepLR, step_size: 4, gamma: 0.5, interval: step, "
                                       "warmup: {steps: 3, start_factor: 0.1}}", data="val_split: 0")
    expected = []
    for epoch in range(5):
        step = 4 * epoch
        expected.append(0.1 * (0.1 + 0.9 * step / 3) if step < 3 else 0.1 * 0.5 ** ((step - 3) // 4))
    assert expected == pytest.approx([0.01, 0.1, 0.05, 0.025, 0.0125])
    assert lr_column(tmp_path, config) == pytest.approx(expected)


def test_step_schedule_matches_torch_step_by_step(tmp_path):
    """A per-step LinearLR-then-CosineAnnealingLR, replayed with torch's own schedulers."""
    config = schedule_config(tmp_path, "{type: CosineAnnealingLR, interval: step, warmup: {steps: 5}}",
                             data="val_split: 0", train="train: {epochs: 4, batch_size: 16}")
    got = lr_column(tmp_path, config)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=5)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4 * 4 - 5)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cosine], milestones=[5])
    expected = []
    for step in range(16):
        if step % 4 == 0:
            expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert got == pytest.approx(expected, rel=1e-9)


def test_warmup_in_steps_needs_a_step_interval(tmp_path):
    config = schedule_config(tmp_path, "\n  type: StepLR\n  step_size: 2\n  warmup:\n    steps: 3")
    result = invoke("train", config, "--out", tmp_path / "runs")
    assert result.exit_code == 2
    assert f"{config}:14: schedule.warmup.steps: warmup in steps needs interval: step" in result.stderr


def test_cosine_gets_t_max_from_the_run_length(tmp_path):
    config = schedule_config(tmp_path, "{type: CosineAnnealingLR}",
                             train="train: {epochs: 5, batch_size: 48}")
    run = prepare(config, run_dir=tmp_path / "r")
    assert run.schedule.scheduler.T_max == 5
    assert prepare(config, run_dir=tmp_path / "r", epochs=8).schedule.scheduler.T_max == 8
    result = invoke("train", config, "--out", tmp_path / "runs")
    assert result.exit_code == 0
    assert "schedule: CosineAnnealingLR: T_max=5 (epochs)" in result.stdout
    lrs = [row["lr_0"] for row in read_metrics(tmp_path / "runs" / "sched")[1]]
    assert lrs == pytest.approx([0.05 * (1 + math.cos(math.pi * t / 5)) for t in range(5)])

    explicit = schedule_config(tmp_path, "{type: CosineAnnealingLR, T_max: 3}", name="explicit.yaml")
    assert prepare(explicit, run_dir=tmp_path / "r").schedule.scheduler.T_max == 3


def test_cosine_after_warmup_and_onecycle_total_steps():
    run = prepare(CONFIGS / "csv_regression.yaml")  # 60 epochs, 2 of warmup
    assert run.schedule.note == "CosineAnnealingLR: T_max=58 (epochs after warmup)"
    assert run.schedule.scheduler._schedulers[1].T_max == 58
    cnn = prepare(CONFIGS / "digits_cnn.yaml")  # 15 epochs of 23 steps (1438 samples, batch 64)
    assert cnn.schedule.interval == "step"
    assert cnn.schedule.scheduler.total_steps == 15 * 23
    assert cnn.schedule.note == "OneCycleLR: total_steps=345 (steps)"


def test_reduce_on_plateau_follows_its_monitor(tmp_path):
    """mode: max on a falling train_loss: no epoch improves on the first, so with patience 0
    the lr halves after every epoch from the second on."""
    config = schedule_config(tmp_path, "{type: ReduceLROnPlateau, mode: max, factor: 0.5, patience: 0, "
                                       "monitor: train_loss}")
    lrs = lr_column(tmp_path, config)
    rows = read_metrics(sorted((tmp_path / "runs").iterdir())[-1])[1]
    assert all(a["train_loss"] > b["train_loss"] for a, b in zip(rows, rows[1:]))
    assert lrs == pytest.approx([0.1, 0.1, 0.05, 0.025, 0.0125])


def test_reduce_on_plateau_on_val_loss_by_default(tmp_path):
    config = schedule_config(tmp_path, "{type: ReduceLROnPlateau, factor: 0.5, patience: 0}")
    run = prepare(config, run_dir=tmp_path / "r")
    assert run.schedule.monitor == "val_loss"
    lrs = lr_column(tmp_path, config)
    rows = read_metrics(sorted((tmp_path / "runs").iterdir())[-1])[1]
    lr, best, expected = 0.1, math.inf, []
    for row in rows:  # torch's rule: better than best * (1 - 1e-4), else halve (patience 0)
        expected.append(lr)
        if row["val_loss"] < best * (1 - 1e-4):
            best = row["val_loss"]
        else:
            lr *= 0.5
    assert lrs == pytest.approx(expected)


@pytest.mark.parametrize("schedule, data, message", [
    ("{type: ReduceLROnPlateau, monitor: val_acc}", "val_split: 0.25",
     ":10: schedule.monitor: monitor 'val_acc' is not recorded; expected one of: train_loss, val_loss, "
     "val_mae. Did you mean 'val_mae'?"),
    ("{type: ReduceLROnPlateau}", "val_split: 0",
     ":10: schedule: monitor 'val_loss' is not recorded; expected one of: train_loss."),
    ("{type: ReduceLROnPlateau, warmup: {epochs: 1}}", "val_split: 0.25",
     ":10: schedule.warmup: warmup does not combine with ReduceLROnPlateau"),
    ("{type: StepLR}", "val_split: 0.25",
     ":10: schedule: StepLR needs step_size. e.g. {type: StepLR, step_size: ...}"),
    ("{type: StepLR, step_size: 1, interval: batch}", "val_split: 0.25",
     ":10: schedule.interval: interval must be one of epoch, step"),
    ("{type: CosineAnealingLR}", "val_split: 0.25",
     ":10: schedule.type: unknown schedule 'CosineAnealingLR'. Did you mean 'CosineAnnealingLR'?"),
    ("{type: StepLR, step_size: 1, interval: step, warmup: {steps: -3}}", "val_split: 0.25",
     ":10: schedule.warmup.steps: must be 0 or more, got -3"),
    ("{type: StepLR, step_size: 1, warmup: {epochs: 1, start_factor: 0}}", "val_split: 0.25",
     ":10: schedule.warmup.start_factor: must lie in (0, 1], got 0"),
    ("{type: StepLR, step_size: 1, interval: step, warmup: {epochs: 1, steps: 5}}", "val_split: 0.25",
     ":10: schedule.warmup.steps: give the warmup's length once: epochs or steps"),
])
def test_bad_schedules_exit_2_before_training(tmp_path, schedule, data, message):
    config = schedule_config(tmp_path, schedule, data=data)
    result = invoke("train", config, "--out", tmp_path / "runs")
    assert result.exit_code == 2, result.stdout
    assert result.stderr.startswith(f"error: {config}{message}"), result.stderr
    assert not (tmp_path / "runs").exists()


# --- the optimizer step: accumulation and clipping -----------------------------------------

def _one_batch_and_accumulated(tmp_path, base: str, one_batch: str, accumulated: str) -> tuple[dict, dict]:
    """`base` trained with the train: section `one_batch`, and again with `accumulated`; both
    last.pt checkpoints, whose weights must agree."""
    configs = [write_config(tmp_path, base.replace("train: {epochs: 3, batch_size: 16}", train), name)
               for train, name in ((one_batch, "one.yaml"), (accumulated, "acc.yaml"))]
    for config in configs:
        assert invoke("train", config, "--out", tmp_path / "runs", "-q").exit_code == 0
    a, b = load(tmp_path / "runs" / "one" / "last.pt"), load(tmp_path / "runs" / "acc" / "last.pt")
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6)
    return a, b


def test_gradient_accumulation_equals_a_larger_batch(tmp_path):
    base = TINY_REGRESSION.replace("val_split: 0.25", "val_split: 0")
    a, b = _one_batch_and_accumulated(tmp_path, base, "train: {epochs: 3, batch_size: 32, shuffle: false}",
                                      "train: {epochs: 3, batch_size: 16, accumulate: 2, shuffle: false}")
    assert a["step"] == b["step"] == 6  # 2 optimizer steps per epoch either way
    rows_a, rows_b = read_metrics(tmp_path / "runs" / "one")[1], read_metrics(tmp_path / "runs" / "acc")[1]
    assert [r["train_loss"] for r in rows_a] == pytest.approx([r["train_loss"] for r in rows_b], rel=1e-5)


@pytest.mark.parametrize("samples", [48, 50])  # 3 batches of 16 for 4 to accumulate; 16, 16, 16 and 2
@pytest.mark.parametrize("loss", ["MSELoss", "{type: MSELoss, reduction: sum}"])
def test_accumulating_a_short_step_equals_one_batch_of_it(tmp_path, samples, loss):
    """An optimizer step of fewer batches than `accumulate`, or with a short last batch, gives the
    gradient of one batch of the samples it holds: their mean, or their sum."""
    base = TINY_REGRESSION.replace("n: 64, features: 2, val_split: 0.25",
                                   f"n: {samples}, features: 2, val_split: 0")
    base = base.replace("loss: MSELoss", f"loss: {loss}").replace("lr: 0.1", "lr: 0.002")
    a, b = _one_batch_and_accumulated(tmp_path, base, "train: {epochs: 3, batch_size: 64, shuffle: false}",
                                      "train: {epochs: 3, batch_size: 16, accumulate: 4, shuffle: false}")
    assert a["step"] == b["step"] == 3


def test_grad_clip_bounds_each_step(tmp_path):
    config = write_config(tmp_path, TINY_REGRESSION.replace("lr: 0.1", "lr: 1.0").replace(
        "train: {epochs: 3, batch_size: 16}", "train: {epochs: 2, batch_size: 16, grad_clip: 0.001}"),
        "clip.yaml")
    start = prepare(config, run_dir=tmp_path / "r").model.state_dict()
    assert invoke("train", config, "--out", tmp_path / "runs", "-q").exit_code == 0
    end = load(tmp_path / "runs" / "clip" / "last.pt")
    assert end["step"] == 6  # 48 training samples, batch 16, 2 epochs
    moved = torch.cat([(end["model"][k] - start[k]).flatten() for k in start])
    assert 0 < float(moved.norm()) <= 6 * 0.001 * 1.0 + 1e-6  # steps x clip x lr
