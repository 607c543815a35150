"""`data.augment` in training (training batches only, checked before training, resumed exactly)
and `train.ema` (the weight average, against one written by hand in plain PyTorch)."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import CONFIGS, invoke, load, metrics_rows, ok, read_metrics, run_nncli, write_config

from nncli.data.augment import Pipeline
from nncli.run import loop

AUGMENT = """  augment:
    - {type: RandomCrop, size: 8, padding: 1}
    - {type: RandomHorizontalFlip, p: 0.5}
    - {type: RandomErasing, p: 0.5}
"""
# Tiny synthetic images; 205 training samples in 7 batches per epoch; every kind of draw: crop
# offsets, flips, erased boxes.
AUGMENTED = """
seed: 0
data:
  source: synthetic
  kind: images
  shape: [1, 8, 8]
  classes: 3
  n: 256
  val_split: 0.2
""" + AUGMENT + """optimizer: {type: SGD, lr: 0.05, momentum: 0.9}
schedule: {type: StepLR, step_size: 2, gamma: 0.5}  # a cosine's length would be the run's: --epochs 2
train: {epochs: 4, batch_size: 32}
model:
  layers:
    - {type: Conv2d, out_channels: 4, kernel_size: 3, padding: 1}
    - BatchNorm2d
    - ReLU
    - {type: Dropout, p: 0.1}
    - Flatten
    - {type: Linear, out_features: 3}
"""
STEPS = 7  # ceil(205 / 32)


def assert_same_run(run, reference) -> None:
    a, b = load(run / "last.pt"), load(reference / "last.pt")
    for key in ("model", *(["training_model"] if "training_model" in b else [])):
        assert list(a[key]) == list(b[key])
        assert all(torch.equal(a[key][k], b[key][k]) for k in b[key]), f"{key} differs"
    assert metrics_rows(run) == metrics_rows(reference)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """AUGMENTED trained for 4 epochs in one go, counting the augmented batches."""
    tmp = tmp_path_factory.mktemp("augmented")
    config = write_config(tmp, AUGMENTED, "aug.yaml")
    calls = []
    original = Pipeline.__call__
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Pipeline, "__call__",
                      lambda self, *args: calls.append(len(args[0])) or original(self, *args))
        ok(invoke("train", config, "--out", tmp / "runs", "--quiet"))
    return {"config": config, "run": tmp / "runs" / "aug", "tmp": tmp, "calls": calls}


def test_every_training_batch_is_augmented_and_nothing_else(reference, monkeypatch):
    assert len(reference["calls"]) == 4 * STEPS  # training batches only: no validation batch
    assert sum(reference["calls"]) == 4 * 205
    calls = []
    monkeypatch.setattr(Pipeline, "__call__", lambda self, *args: calls.append(1))
    run = reference["run"]
    results = json.loads(ok(invoke("eval", run, "--json")).stdout)
    ok(invoke("predict", run, "--input", json.dumps(torch.zeros(2, 1, 8, 8).tolist())))
    assert calls == []
    best = load(run / "best.pt")["epoch"]  # validation scored the inputs as eval does: unaugmented
    assert results["loss"] == pytest.approx(read_metrics(run)[1][best - 1]["val_loss"], rel=1e-6)


def test_augmentation_changes_what_is_learnt(reference, tmp_path):
    config = write_config(tmp_path, AUGMENTED.replace(AUGMENT, ""), "plain.yaml")
    assert "augment" not in config.read_text()
    ok(invoke("train", config, "--out", tmp_path / "runs", "--quiet"))
    plain, augmented = load(tmp_path / "runs" / "plain" / "last.pt"), load(reference["run"] / "last.pt")
    assert not torch.equal(plain["model"]["0.weight"], augmented["model"]["0.weight"])


def test_resume_with_augmentation_2_plus_2_epochs_equals_4(reference, tmp_path):
    ok(invoke("train", reference["config"], "--epochs", 2, "--out", tmp_path, "--quiet"))
    ok(invoke("resume", tmp_path / "aug", "--epochs", 4, "--quiet"))
    assert_same_run(tmp_path / "aug", reference["run"])


def test_resume_with_augmentation_after_a_stop_inside_an_epoch_is_exact(reference, tmp_path, monkeypatch):
    """A stop asked for at step 10 (epoch 2, batch 3), as Ctrl-C does: the mid-epoch checkpoint,
    exit 130; resumed, the run is the uninterrupted one."""
    config = write_config(tmp_path, AUGMENTED + "checkpoint: {every_steps: 10}\n", "aug.yaml")
    save = loop.save_mid_epoch
    monkeypatch.setattr(loop, "save_mid_epoch", lambda run, position, losses, epoch, stopping:
                        save(run, position, losses, epoch, True))
    stopped = invoke("train", config, "--out", tmp_path, "--quiet")
    assert stopped.exit_code == 130, stopped.stderr
    ckpt = load(tmp_path / "aug" / "last.pt")
    assert (ckpt["epoch"], ckpt["position"]) == (1, 3)
    monkeypatch.undo()
    ok(invoke("resume", tmp_path / "aug", "--quiet"))
    assert_same_run(tmp_path / "aug", reference["run"])  # every_steps changes where it saves only


def test_each_ddp_process_augments_with_draws_of_its_own():
    from types import SimpleNamespace

    def first_draws(rank: int, epoch: int = 1, batch: int = 0) -> torch.Tensor:
        run = SimpleNamespace(config={"seed": 0}, process=SimpleNamespace(rank=rank))
        return torch.rand(4, generator=loop.augmentation_generator(run, epoch, batch))

    assert torch.equal(first_draws(0), first_draws(0))  # nothing to save to draw them again
    assert not torch.equal(first_draws(0), first_draws(1))
    assert not torch.equal(first_draws(0), first_draws(0, batch=1))
    assert not torch.equal(first_draws(0), first_draws(0, epoch=2))


def test_ddp_with_augmentation_2_plus_2_epochs_equals_4(tmp_path):
    """Two processes (gloo), each augmenting its share of the batches: resumed after 2 epochs,
    the job is the job trained for 4 in one go, bit for bit."""
    config = write_config(tmp_path, AUGMENTED, "aug.yaml")
    ok(run_nncli("train", config, "--nproc", "2", "--out", "whole", "-q", cwd=tmp_path))
    ok(run_nncli("train", config, "--nproc", "2", "--epochs", "2", "--out", "split", "-q", cwd=tmp_path))
    ok(run_nncli("resume", tmp_path / "split" / "aug", "--nproc", "2", "--epochs", "4", "-q", cwd=tmp_path))
    assert load(tmp_path / "whole" / "aug" / "last.pt")["world_size"] == 2
    assert_same_run(tmp_path / "split" / "aug", tmp_path / "whole" / "aug")


def test_mixup_trains_on_soft_targets_and_validates_on_labels(tmp_path):
    text = AUGMENTED.replace("{type: RandomErasing, p: 0.5}", "{type: MixUp, alpha: 0.4}")
    ok(invoke("train", write_config(tmp_path, text, "mix.yaml"), "--epochs", 2, "--out", tmp_path, "--quiet"))
    header, rows = read_metrics(tmp_path / "mix")
    assert "val_accuracy" in header and all(0 < row["train_loss"] < 5 for row in rows)


@pytest.mark.parametrize("transform, message", [
    ("{type: RandomFlip, p: 0.5}", ":11: data.augment.1.type: unknown transform 'RandomFlip'. Did you mean"),
    ("{type: RandomHorizontalFlip, prob: 0.5}",
     ":11: data.augment.1.prob: RandomHorizontalFlip has no argument 'prob'; it takes: p"),
    ("{type: RandomCrop, size: 12}",
     ":11: data.augment.1.size: RandomCrop's size 12x12 is larger than the image"),
    ("{type: Normalize, mean: [0.5], std: [0.2]}", "Normalize draws nothing at random"),
])
def test_bad_transforms_exit_2_before_training(tmp_path, transform, message):
    text = AUGMENTED.replace("{type: RandomHorizontalFlip, p: 0.5}", transform)
    config = write_config(tmp_path, text, "bad.yaml")
    for command in ("validate", "train"):
        result = invoke(command, config, "--out", tmp_path / "runs") if command == "train" else \
            invoke(command, config)
        assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists()


def test_an_image_transform_on_tabular_data_exits_2(tmp_path, cli):
    config = write_config(tmp_path, """
        data:
          source: synthetic
          n: 64
          features: 4
          augment:
            - {type: RandomHorizontalFlip}
        model: {layers: [{type: Linear, out_features: 2}]}
        """, "tab.yaml")
    result = cli("validate", config)
    assert result.exit_code == 2 and ":6: data.augment.0: RandomHorizontalFlip needs images" in result.stderr


def test_mixup_with_a_loss_that_takes_no_probabilities_exits_2(tmp_path, cli):
    text = AUGMENTED.replace("{type: RandomErasing, p: 0.5}", "{type: MixUp}") + "loss: NLLLoss\n"
    result = cli("validate", write_config(tmp_path, text, "mix.yaml"))
    assert result.exit_code == 2 and "MixUp gives soft targets" in result.stderr


# --- train.ema -----------------------------------------------------------------------------------

@pytest.mark.parametrize("warmup", [True, False])
def test_ema_equals_an_average_written_by_hand(tmp_path, warmup):
    """The tutorial's linear regression (one step per epoch, bit-exact with its own code) with
    train.ema: last.pt's model is the average computed here, training_model the live weights."""
    epochs, decay = 30, 0.8
    result = invoke("train", CONFIGS / "linear_regression.yaml", "--epochs", epochs, "--out", tmp_path,
                    "--quiet", "--set", f"train.ema={{decay: {decay}, warmup: {str(warmup).lower()}}}")
    assert result.exit_code == 0, result.stderr
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    average = [p.detach().clone() for p in model.parameters()]
    x = torch.tensor([[1.0], [2.0], [3.0]])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for t in range(1, epochs + 1):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), 2 * x, reduction="sum").backward()
        optimizer.step()
        d = min(decay, (1 + t) / (10 + t)) if warmup else decay
        average = [d * a + (1 - d) * p.detach() for a, p in zip(average, model.parameters())]
    ckpt = load(tmp_path / "linear_regression" / "last.pt")
    assert torch.equal(ckpt["training_model"]["linear.weight"], model.weight.detach())
    assert ckpt["ema_updates"] == epochs
    torch.testing.assert_close(ckpt["model"]["linear.weight"], average[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ckpt["model"]["linear.bias"], average[1], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(ckpt["model"]["linear.weight"], model.weight.detach())


def test_ema_is_what_validation_scores_and_best_pt_holds(tmp_path):
    text = AUGMENTED.replace("train: {epochs: 4, batch_size: 32}",
                             "train: {epochs: 3, batch_size: 32, ema: {decay: 0.9}}")
    ok(invoke("train", write_config(tmp_path, text, "ema.yaml"), "--out", tmp_path, "--quiet"))
    run = tmp_path / "ema"
    best = load(run / "best.pt")
    row = read_metrics(run)[1][best["epoch"] - 1]
    results = json.loads(ok(invoke("eval", run, "--json")).stdout)
    assert results["loss"] == pytest.approx(row["val_loss"], rel=1e-6)  # best.pt's model: the average
    assert "training_model" in best and not torch.equal(best["model"]["5.weight"],
                                                        best["training_model"]["5.weight"])
    # BatchNorm's running statistics are averaged too; its counter is the live model's
    counter = "1.num_batches_tracked"
    assert torch.equal(best["model"][counter], best["training_model"][counter])


def test_resume_with_ema_and_augmentation_is_exact(tmp_path):
    text = AUGMENTED.replace("train: {epochs: 4, batch_size: 32}",
                             "train: {epochs: 4, batch_size: 32, ema: {decay: 0.9}}")
    config = write_config(tmp_path, text, "ema.yaml")
    ok(invoke("train", config, "--out", tmp_path / "whole", "--quiet"))
    ok(invoke("train", config, "--epochs", 2, "--out", tmp_path / "parts", "--quiet"))
    ok(invoke("resume", tmp_path / "parts" / "ema", "--epochs", 4, "--quiet"))
    assert_same_run(tmp_path / "parts" / "ema", tmp_path / "whole" / "ema")
    assert load(tmp_path / "parts" / "ema" / "last.pt")["ema_updates"] == 4 * STEPS
    changed = invoke("resume", tmp_path / "parts" / "ema", "--epochs", 5, "--set", "train.ema.decay=0.5")
    assert changed.exit_code == 2 and "train.ema" in changed.stderr
