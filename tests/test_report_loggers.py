"""The loggers a config's `loggers:` names: metrics.csv (always), metrics.jsonl and TensorBoard event
files, read back here with the reader of the package that wrote them (tensorboardX's protocol
buffers); resume appends to them and never repeats an epoch or a step."""
from __future__ import annotations

import json
import shutil
import sys

import pytest
from helpers import ok, read_metrics, run_nncli, write_config

LOGGED = """
seed: 0
data: {source: synthetic, kind: regression, n: 64, features: 2, val_split: 0.25}
loss: MSELoss
metrics: [mae]
optimizer: {type: SGD, lr: 0.05}
schedule: {type: StepLR, step_size: 1, gamma: 0.5}
loggers: [csv, tensorboard, jsonl]
train: {epochs: 4, batch_size: 16, log_every_steps: 2}
checkpoint: {keep_last: 4}
model:
  layers:
    - {type: Linear, out_features: 8}
    - ReLU
    - {type: Linear, out_features: 1}
"""


def scalars(run_dir) -> dict[str, dict[int, float]]:
    """tag -> {step: value}, asserting that no tag has a step twice."""
    from nncli.report.tensorboard import read_scalars

    found: dict[str, dict[int, float]] = {}
    for tag, step, value, _ in read_scalars(run_dir / "tensorboard"):
        assert step not in found.setdefault(tag, {}), f"{tag} has step {step} twice"
        found[tag][step] = value
    return found


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A real process, which ends without the interpreter's teardown (nncli.process.end_process):
    whatever a logger left unwritten would be missing from its file."""
    pytest.importorskip("tensorboardX")
    folder = tmp_path_factory.mktemp("logged")
    config = write_config(folder, LOGGED, "logged.yaml")
    ok(run_nncli("train", config, "--out", folder / "runs", "-q"))
    return {"config": config, "run": folder / "runs" / "logged"}


def test_every_column_is_a_scalar_per_epoch_and_the_loss_per_step(logged):
    run = logged["run"]
    header, rows = read_metrics(run)
    found = scalars(run)
    assert set(found) == {*header[1:], "step/train_loss"}
    for row in rows:
        for column in header[1:]:
            assert found[column][int(row["epoch"])] == pytest.approx(row[column], rel=1e-6)  # float32 events
    # 48 training samples in batches of 16: 3 steps an epoch, 12 in all, every second one logged
    assert sorted(found["step/train_loss"]) == [2, 4, 6, 8, 10, 12]
    assert [found["lr_0"][epoch] for epoch in (1, 2, 3)] == pytest.approx([0.05, 0.025, 0.0125])
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows


def test_resume_after_a_crash_cuts_what_came_after_the_checkpoint(logged, tmp_path, cli):
    """A run whose last.pt is from epoch 2, but whose loggers have written epochs 3 and 4 (a kill
    between the writes): resumed in place, it trains 3 and 4 again, and every logger holds each
    epoch and step once, with the values of the run that never stopped."""
    run = tmp_path / "run"
    shutil.copytree(logged["run"], run)
    (run / ".lock").unlink(missing_ok=True)
    shutil.copy(run / "epoch_2.pt", run / "last.pt")
    result = cli("resume", run, "-q")
    assert result.exit_code == 0, result.stderr
    resumed, original = scalars(run), scalars(logged["run"])
    assert set(resumed["time_s"]) == {1, 2, 3, 4}  # the time of epochs 3 and 4 is the second run's
    del resumed["time_s"], original["time_s"]
    assert resumed == original  # on the CPU a resumed run repeats the uninterrupted one exactly
    jsonl = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in jsonl] == [1, 2, 3, 4]
    assert len(list((run / "tensorboard").iterdir())) == 1  # the files rewritten as one


def test_a_run_that_goes_on_in_a_new_directory_starts_with_the_checkpoints_epochs(logged, tmp_path, cli):
    result = cli("resume", logged["run"] / "epoch_2.pt", "--out", tmp_path / "forked", "-q")
    assert result.exit_code == 0, result.stderr
    forked = tmp_path / "forked" / "logged"
    found, original = scalars(forked), scalars(logged["run"])
    assert found["train_loss"] == original["train_loss"]
    assert sorted(found["step/train_loss"]) == [8, 10, 12]  # the steps it trained itself


def test_loggers_are_checked(cli, tmp_path):
    for loggers, expect in [("[tensorboard]", "must include csv"),
                            ("[csv, tensorbord]", "Did you mean 'tensorboard'?"),
                            ("[csv, csv]", "names a logger twice")]:
        path = write_config(tmp_path, LOGGED.replace("[csv, tensorboard, jsonl]", loggers))
        result = cli("validate", path)
        assert result.exit_code == 2, result.stderr
        assert f"{path}:7: loggers:" in result.stderr and expect in result.stderr


def test_tensorboard_without_its_extra_is_exit_2_naming_it(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import tensorboardX now fails
    path = write_config(tmp_path, LOGGED)
    for command in ("validate", "train"):
        result = cli(command, path, "--out", tmp_path / "runs") if command == "train" else cli(command, path)
        assert result.exit_code == 2
        assert "tensorboardX, which is not installed" in result.stderr
        assert "pip install 'nncli[tensorboard]'" in result.stderr
    assert not (tmp_path / "runs").exists()  # refused before a run directory is made
