"""`nncli resume`: exact continuation after a clean stop, Ctrl-C or kill -9; warm starts from plain
state_dicts; what may and may not change on resume.

Every run goes through the command line in a subprocess (`python -m nncli ...`), as a user runs it:
signals and exit statuses are real. Exactness means bit-identical weights (torch.equal on every
tensor of last.pt's model) and identical metrics.csv rows, time_s aside, on CPU.
"""
from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    DROPOUT_MLP,
    ENV,
    REPO,
    TINY_REGRESSION,
    Background,
    invoke,
    load,
    metrics_rows,
    nncli_argv,
    ok,
    run_nncli,
    snapshot,
    train_config,
    write_config,
)

# Short epochs: StepLR after an epoch-wise warmup; an MLP with Dropout; SGD with momentum and decay.
SHORT = """
seed: 1
data: {source: synthetic, n: 4000, features: 16, classes: 3, val_split: 0.1}
optimizer: {type: SGD, lr: 0.1, momentum: 0.9, weight_decay: 1.0e-4}
schedule: {type: StepLR, step_size: 2, gamma: 0.5, warmup: {epochs: 1}}
train: {epochs: 4, batch_size: 64, shuffle: true}
""" + DROPOUT_MLP

# Long epochs (900 batches), so that a signal sent after the first epoch's line lands inside the
# second; a cosine schedule stepped after every batch, after a warmup in steps.
LONG = """
seed: 3
data: {source: synthetic, n: 16000, features: 16, classes: 3, val_split: 0.1}
optimizer: {type: SGD, lr: 0.05, momentum: 0.9, weight_decay: 1.0e-4}
schedule: {type: CosineAnnealingLR, interval: step, warmup: {steps: 50}}
train: {epochs: 2, batch_size: 16, shuffle: true}
""" + DROPOUT_MLP
LONG_STEPS = 900  # 14,400 training samples / 16


# --- helpers -----------------------------------------------------------------------------------

def assert_same_weights(a: Path, b: Path) -> None:
    ma, mb = load(a)["model"], load(b)["model"]
    assert list(ma) == list(mb)
    different = [k for k in ma if not torch.equal(ma[k], mb[k])]
    assert not different, f"{a} and {b} differ in {different}"


def assert_same_run(run_dir: Path, reference: Path) -> None:
    assert_same_weights(run_dir / "last.pt", reference / "last.pt")
    rows, expected = metrics_rows(run_dir), metrics_rows(reference)
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in expected]  # none lost, none repeated
    assert rows == expected


def copy_run(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to)
    return to


# --- reference runs, trained once per module --------------------------------------------------

@pytest.fixture(scope="module")
def short(tmp_path_factory) -> dict:
    """SHORT trained for 4 epochs in one go."""
    config, run = train_config(tmp_path_factory.mktemp("short"), SHORT, "short")
    return {"config": config, "run": run}


@pytest.fixture(scope="module")
def long(tmp_path_factory) -> dict:
    """LONG trained for 2 epochs in one go."""
    config, run = train_config(tmp_path_factory.mktemp("long"), LONG, "long")
    return {"config": config, "run": run}


# --- exact continuation -----------------------------------------------------------------------

def test_stop_at_epoch_boundary_then_resume_is_exact(short, tmp_path):
    """A run of 2 epochs, finished, then extended to 4 with `resume --epochs 4`, is the run of 4."""
    run = tmp_path / "out" / "short"
    ok(run_nncli("train", short["config"], "--out", tmp_path / "out", "--epochs", "2", "-q", cwd=tmp_path))
    assert [r["epoch"] for r in metrics_rows(run)] == ["1", "2"]
    result = ok(run_nncli("resume", run, "--epochs", "4", cwd=tmp_path))
    assert "resuming" in result.stdout and "epoch 3 of 4" in result.stdout
    assert_same_run(run, short["run"])
    ckpt = load(run / "last.pt")
    assert (ckpt["epoch"], ckpt["position"]) == (4, 0)
    assert ckpt["config"]["train"]["epochs"] == 4


def _wait_for_mid_epoch_checkpoint(proc: Background, last: Path, timeout: float = 60) -> None:
    """Wait until `last` is a checkpoint from inside epoch 2 (the run is then inside epoch 2)."""
    deadline = time.monotonic() + timeout
    while True:
        inode = os.stat(last).st_ino
        if load(last)["position"] > 0:
            return
        while os.stat(last).st_ino == inode:
            assert proc.proc.poll() is None, "the run ended before a mid-epoch checkpoint"
            assert time.monotonic() < deadline, f"no mid-epoch checkpoint within {timeout} s"
            time.sleep(0.002)


def _signal_mid_epoch(tmp_path: Path, every_steps: int, signum: int) -> tuple[Path, int, str, str]:
    """Train LONG with checkpoint.every_steps and send `signum` right after the first checkpoint
    from inside epoch 2: the run directory, and the exit status, stdout and stderr."""
    config = write_config(tmp_path, LONG + f"checkpoint: {{every_steps: {every_steps}}}\n", "long.yaml")
    run = tmp_path / "out" / "long"
    proc = Background("train", config, "--out", tmp_path / "out", cwd=tmp_path)
    proc.wait_for_line("epoch 1/2")
    _wait_for_mid_epoch_checkpoint(proc, run / "last.pt")
    proc.proc.send_signal(signum)
    return (run, *proc.finish())


def test_sigint_mid_epoch_saves_and_resume_is_exact(long, tmp_path):
    # every_steps only tells when the run is inside epoch 2: SIGINT is sent right after the
    # checkpoint of step 1350 (batch 450 of epoch 2), and saves its own at the next step
    run, code, out, err = _signal_mid_epoch(tmp_path, 450, signal.SIGINT)
    assert code == 130, f"exit {code}\n{out}\n{err}"
    assert "Traceback" not in err
    assert f"nncli resume {run}" in err and str(run / "last.pt") in err, err
    ckpt = load(run / "last.pt")
    assert ckpt["epoch"] == 1 and 450 < ckpt["position"] < LONG_STEPS, ckpt["position"]
    assert ckpt["position"] % 450, "the checkpoint is every_steps', not the one SIGINT asked for"
    assert f"batch {ckpt['position']} of {LONG_STEPS}" in err
    assert ckpt["step"] == LONG_STEPS + ckpt["position"]
    assert len(ckpt["epoch_losses"]) == ckpt["position"]
    assert [r["epoch"] for r in metrics_rows(run)] == ["1"]

    result = ok(run_nncli("resume", run, cwd=tmp_path))
    assert f"batch {ckpt['position'] + 1} of {LONG_STEPS}" in result.stdout
    assert_same_run(run, long["run"])  # every_steps changes where it saves, not what it learns


def test_kill_9_after_mid_epoch_checkpoint_then_resume_is_exact(long, tmp_path):
    # right after a mid-epoch checkpoint
    run, code, out, err = _signal_mid_epoch(tmp_path, 300, signal.SIGKILL)
    assert code == -signal.SIGKILL, f"the run ended before the kill: exit {code}\n{out}\n{err}"
    ckpt = load(run / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["position"] > 0 and ckpt["step"] % 300 == 0

    ok(run_nncli("resume", run, cwd=tmp_path))
    assert_same_run(run, long["run"])
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_stop_signal_with_dataloader_workers_then_resume_in_memory_is_exact(long, tmp_path, signum):
    """`loader: dataloader` draws the batches `loader: memory` draws; its worker processes get the
    signal too (Ctrl-C, or a scheduler's SIGTERM to the job) and must not end the run before it
    saves; the loader may change on resume."""
    text = LONG.replace("val_split: 0.1}", "val_split: 0.1, loader: dataloader, workers: 2}")
    config = write_config(tmp_path, text + "checkpoint: {every_steps: 450}\n", "long.yaml")
    run = tmp_path / "out" / "long"
    proc = Background("train", config, "--out", tmp_path / "out", cwd=tmp_path)
    proc.wait_for_line("epoch 1/2")
    _wait_for_mid_epoch_checkpoint(proc, run / "last.pt")
    os.killpg(proc.proc.pid, signum)  # to the whole process group: nncli and its two loader workers
    code, out, err = proc.finish()
    assert code == 130 and "Traceback" not in err, f"exit {code}\n{out}\n{err}"
    ckpt = load(run / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["position"] > 0 and ckpt["config"]["data"]["workers"] == 2

    ok(run_nncli("resume", run, "--set", "data.loader=memory", "--set", "data.workers=0", cwd=tmp_path))
    assert_same_run(run, long["run"])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_stop_signal_before_training_starts_is_an_interrupt(tmp_path, signum):
    """A scheduler's SIGTERM (or a closed terminal's SIGHUP) while the config loads ends the
    command as Ctrl-C does: "interrupted", exit 130, nothing written."""
    (tmp_path / "slow.py").write_text("import time\nprint('plugin loading', flush=True)\ntime.sleep(60)\n")
    config = write_config(tmp_path, "plugins: [slow.py]\n" + TINY_REGRESSION, "slow.yaml")
    proc = Background("train", config, "--out", tmp_path / "out", cwd=tmp_path)
    proc.wait_for_line("plugin loading")
    proc.proc.send_signal(signum)
    code, out, err = proc.finish(timeout=30)
    assert (code, err) == (130, "interrupted\n"), f"exit {code}\n{out}\n{err}"
    assert not (tmp_path / "out").exists()


def test_sighup_under_nohup_does_not_stop_a_run(tmp_path):
    """`nohup nncli train ...`: a closed terminal's SIGHUP is ignored (here while the config loads)."""
    (tmp_path / "slow.py").write_text("import time\nprint('plugin loading', flush=True)\ntime.sleep(2)\n")
    config = write_config(tmp_path, "plugins: [slow.py]\n" + TINY_REGRESSION, "slow.yaml")
    proc = subprocess.Popen(["nohup", *nncli_argv("train", config, "--out", tmp_path / "out")], cwd=tmp_path,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "plugin loading\n"
    proc.send_signal(signal.SIGHUP)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err}"
    assert load(tmp_path / "out" / "slow" / "last.pt")["epoch"] == 3


COUNTED_LINEAR = """
import nncli
from torch import nn


@nncli.register_layer(infer={"in_features": -1})
class CountedLinear(nn.Linear):
    \"\"\"A Linear that counts its training calls in its state_dict (not a tensor: extra state).\"\"\"

    calls = 0

    def forward(self, x):
        self.calls += self.training
        return super().forward(x)

    def get_extra_state(self):
        return {"calls": self.calls}

    def set_extra_state(self, state):
        self.calls = state["calls"]
"""


def test_a_layer_with_extra_state_resumes(tmp_path):
    (tmp_path / "counted.py").write_text(COUNTED_LINEAR)
    text = "plugins: [counted.py]\n" + TINY_REGRESSION.replace("{type: Linear,", "{type: CountedLinear,")
    config, run = train_config(tmp_path, text.replace("epochs: 3", "epochs: 2"), "counted")
    assert load(run / "last.pt")["model"]["0._extra_state"] == {"calls": 6}  # 2 epochs of 3 steps
    ok(run_nncli("resume", run, "--epochs", "3", "--plugin", "counted.py", cwd=tmp_path))
    assert load(run / "last.pt")["model"]["0._extra_state"] == {"calls": 9}


# --- warm start from plain weights -------------------------------------------------------------

def _built_state_dict(config: Path) -> dict[str, torch.Tensor]:
    """The config's model, built through the nncli API, with weights that no seed would give."""
    from nncli.run.setup import build_model, load_config

    model = build_model(load_config(config), input_shape=(16,))
    g = torch.Generator().manual_seed(1234)
    return {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def test_warm_start_from_state_dict(short, tmp_path):
    state = _built_state_dict(short["config"])
    weights = tmp_path / "weights.pth"
    torch.save(state, weights)
    # lr 0: one epoch of training leaves the weights exactly as loaded
    result = ok(run_nncli("resume", weights, "--config", short["config"], "--epochs", "1",
                          "--set", "optimizer.lr=0", "--out", tmp_path / "out", cwd=tmp_path))
    assert f"loaded {len(state)} of {len(state)} tensors" in result.stdout
    run = tmp_path / "out" / "short"
    assert [r["epoch"] for r in metrics_rows(run)] == ["1"]  # a new run, from epoch 1
    ckpt = load(run / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["config"]["optimizer"]["lr"] == 0
    assert list(ckpt["model"]) == list(state)
    for key, value in state.items():
        assert torch.equal(ckpt["model"][key], value), key


def test_warm_start_from_one_modules_state_dict(tmp_path):
    """The tutorial's own Linear saved alone (keys W, b) warm-starts a model that has it as a layer:
    the keys get that layer's name (lin.W, lin.b)."""
    plugin = (REPO / "configs" / "plugins" / "seed_linear.py").resolve()
    config = write_config(tmp_path, f"""
        plugins: [{plugin}]
        data: {{source: synthetic, kind: regression, n: 32, features: 4}}
        loss: MSELoss
        optimizer: {{type: SGD, lr: 0}}
        train: {{epochs: 1}}
        model:
          layers:
            lin: {{type: SeedLinear, out_feature: 1}}
    """)
    state = {"W": torch.randn(4, 1), "b": torch.randn(1)}  # torch.save(linear.state_dict()) of the tutorial's
    torch.save(state, tmp_path / "linear.pth")
    result = ok(run_nncli("resume", tmp_path / "linear.pth", "--config", config, "--out", tmp_path / "out",
                          cwd=tmp_path))
    assert "the weights are one module's (2 tensors): loaded into layer lin" in result.stdout
    model = load(tmp_path / "out" / "config" / "last.pt")["model"]
    assert torch.equal(model["lin.W"], state["W"]) and torch.equal(model["lin.b"], state["b"])


def _mismatched(short, tmp_path, prefix: str = "") -> tuple[Path, dict]:
    """A state_dict with a key missing, one unexpected and one of the wrong shape."""
    state = _built_state_dict(short["config"])
    first, last = list(state)[0], list(state)[-1]  # "0.weight" ... "3.bias"
    bad = dict(state)
    del bad[first]
    bad["extra.weight"] = torch.zeros(2, 2)
    bad[last] = torch.zeros(5)
    weights = tmp_path / "mismatched.pth"
    torch.save({prefix + k: v for k, v in bad.items()}, weights)
    return weights, {"missing": first, "unexpected": "extra.weight", "misshaped": last, "state": state}


def test_warm_start_refuses_weights_that_do_not_fit(short, tmp_path):
    weights, keys = _mismatched(short, tmp_path)
    before = weights.read_bytes()
    result = run_nncli("resume", weights, "--config", short["config"], "--epochs", "1",
                       "--out", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    err = result.stderr
    assert "Traceback" not in err and str(weights) in err
    for word in ("missing", "unexpected", "wrong shape", keys["missing"], keys["unexpected"],
                 keys["misshaped"], "--no-strict"):
        assert word in err, f"{word!r} not in: {err}"
    assert weights.read_bytes() == before
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_warm_start_with_weights_of_another_model_is_refused_even_without_strict(short, tmp_path):
    torch.save({"encoder.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    for strict in ([], ["--no-strict"]):
        result = run_nncli("resume", tmp_path / "other.pth", "--config", short["config"], *strict,
                           "--out", tmp_path / "out", cwd=tmp_path)
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.startswith(f"error: {tmp_path / 'other.pth'}: none of the weights fit the "
                                        "config's model: missing: 0.weight, 0.bias, 3.weight, 3.bias; "
                                        "unexpected: encoder.weight.")
    assert not (tmp_path / "out").exists()


def test_resume_refusal_names_train_keys_and_unset_values(short, tmp_path):
    run = copy_run(short["run"], tmp_path / "run")
    result = run_nncli("resume", run, "--set", "train.batch_size=8", "--set", "train.grad_clip=1.0",
                       cwd=tmp_path)
    assert result.returncode == 2
    assert "cannot resume with a different train.batch_size: train.batch_size: 64 -> 8" in result.stderr
    changed = ok(run_nncli("resume", run, "--epochs", "5", "--set", "train.grad_clip=1.0", cwd=tmp_path))
    assert "changed on resume: train.epochs: 4 -> 5; train.grad_clip: (not set) -> 1.0\n" in changed.stdout


def test_warm_start_dataparallel_prefix_no_strict_loads_what_fits(short, tmp_path):
    """`module.`-prefixed keys (DataParallel, DDP) are matched without the prefix; --no-strict
    loads the tensors that fit, says which did not, and leaves those as the seed built them."""
    weights, keys = _mismatched(short, tmp_path, prefix="module.")
    state = keys["state"]
    result = ok(run_nncli("resume", weights, "--config", short["config"], "--epochs", "1", "--no-strict",
                          "-q", "--set", "optimizer.lr=0", "--out", tmp_path / "out", cwd=tmp_path))
    assert f"loaded {len(state) - 2} of {len(state)} tensors" not in result.stdout  # --quiet
    warning = [line for line in result.stderr.splitlines() if "not loaded" in line]  # shown all the same
    assert len(warning) == 1 and warning[0].startswith(f"warning: warm start from {weights}: not loaded: ")
    for word in (keys["missing"], keys["unexpected"], keys["misshaped"]):
        assert word in warning[0], word
    model = load(tmp_path / "out" / "short" / "last.pt")["model"]
    assert list(model) == list(state)  # saved without the prefix
    for key in state:
        if key in (keys["missing"], keys["misshaped"]):
            assert not torch.equal(model[key], state[key]), key
        else:
            assert torch.equal(model[key], state[key]), key


def test_warm_start_from_an_nncli_run_with_another_optimizer(short, tmp_path):
    """`--warm-start` takes only the weights of a run (its best.pt) into a new run of --config;
    without it, another optimizer type is refused, and the refusal names the command."""
    other = write_config(tmp_path, SHORT.replace("{type: SGD, lr: 0.1, momentum: 0.9, weight_decay: 1.0e-4}",
                                                 "{type: Adam, lr: 0.0}"), "other.yaml")
    refused = run_nncli("resume", short["run"], "--config", other, cwd=tmp_path)
    assert refused.returncode == 2
    assert "cannot resume with a different optimizer" in refused.stderr
    assert f"nncli resume {short['run'] / 'last.pt'} --config {other} --warm-start" in refused.stderr

    before = snapshot(short["run"])
    result = ok(run_nncli("resume", short["run"], "--config", other, "--warm-start", "--epochs", "1",
                          "--out", tmp_path / "out", cwd=tmp_path))
    source = load(short["run"] / "best.pt")["model"]
    assert f"warm start from {short['run'] / 'best.pt'}: loaded {len(source)} of {len(source)} tensors" \
        in result.stdout
    ckpt = load(tmp_path / "out" / "other" / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["config"]["optimizer"]["type"] == "Adam"
    for key, value in source.items():  # lr 0: the weights stay as loaded (BatchNorm has none here)
        assert torch.equal(ckpt["model"][key], value), key
    assert snapshot(short["run"]) == before  # the source run is untouched

    for nproc in ([], ["--nproc", "2"]):  # said once, before any process starts
        no_config = run_nncli("resume", short["run"], "--warm-start", *nproc, cwd=tmp_path)
        assert no_config.returncode == 2
        assert no_config.stderr == ("error: --warm-start: starts a new run: give its config with --config "
                                    "CONFIG\n")


# --- what may change on resume -----------------------------------------------------------------

def test_resume_extends_cosine_run_and_records_changes(long, tmp_path):
    run = copy_run(long["run"], tmp_path / "run")
    result = ok(run_nncli("resume", run, "--epochs", "3", "--set", "train.grad_clip=1.0", cwd=tmp_path))
    out = result.stdout
    assert "schedule re-planned" in out and "T_max" in out
    assert "changed on resume" in out and "train.grad_clip" in out and "train.epochs" in out
    rows = metrics_rows(run)
    assert rows[:2] == metrics_rows(long["run"])  # the finished epochs are kept as they were
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    # epoch 3 starts where a cosine over 3 epochs (after the 50-step warmup) stands after 2 epochs
    t_max, done = 3 * LONG_STEPS - 50, 2 * LONG_STEPS - 50
    expected = 0.05 * (1 + math.cos(math.pi * done / t_max)) / 2
    assert float(rows[2]["lr_0"]) == pytest.approx(expected, rel=1e-4)
    ckpt = load(run / "last.pt")
    assert ckpt["config"]["train"]["grad_clip"] == 1.0 and ckpt["config"]["train"]["epochs"] == 3
    assert "grad_clip: 1.0" in (run / "config.yaml").read_text()


def test_resume_refuses_a_different_architecture(long, tmp_path):
    run = copy_run(long["run"], tmp_path / "run")
    before = snapshot(run)
    result = run_nncli("resume", run, "--set", "model.layers.0.out_features=7", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "model.layers.0.out_features" in result.stderr and "32 -> 7" in result.stderr
    assert snapshot(run) == before


@pytest.mark.parametrize("setting, section", [
    ("optimizer.type=Adam", "optimizer"),  # the whole section is reported when its type changes
    ("schedule.type=ExponentialLR", "schedule"),
])
def test_resume_refuses_another_optimizer_or_schedule_type(short, tmp_path, setting, section):
    run = copy_run(short["run"], tmp_path / "run")
    before = snapshot(run)
    result = run_nncli("resume", run, "--set", setting, "--epochs", "5", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"cannot resume with a different {section}: {section}: " in result.stderr
    assert snapshot(run) == before


def test_resume_changes_a_groups_learning_rate_but_not_its_parameters(tmp_path):
    """The tutorial's `param_group['lr'] *= 0.1` on a saved run: a group's own lr may change on
    resume (and the schedule goes on from it); which parameters the group holds may not."""
    config, run = train_config(tmp_path, SHORT.replace("momentum: 0.9,", "momentum: 0.9, groups: "
                                                       "[{name: biases, params: '*.bias', lr: 0.02}],"),
                               "groups")
    run_two = copy_run(run, tmp_path / "two")
    ok(run_nncli("resume", run_two, "--epochs", "5", "--set", "optimizer.groups.0.lr=0.002", cwd=tmp_path))
    rows = metrics_rows(run_two)
    # the group's name
    assert [r["lr_biases"] for r in rows[:4]] == [r["lr_biases"] for r in metrics_rows(run)]
    # StepLR (step 2, gamma 0.5) after a 1-epoch warmup: epochs 4 and 5 at half the base rates
    assert float(rows[4]["lr_biases"]) == pytest.approx(0.002 * 0.5)
    assert float(rows[4]["lr_1"]) == pytest.approx(0.1 * 0.5)  # the default group: no name, its index

    before = snapshot(run)
    refused = run_nncli("resume", run, "--epochs", "5", "--set", "optimizer.groups.0.params='*.weight'",
                        cwd=tmp_path)
    assert refused.returncode == 2
    assert "optimizer.groups.0.params: '*.bias' -> '*.weight'" in refused.stderr
    assert snapshot(run) == before


def test_resume_says_the_rate_each_group_takes_next_and_set_lr_sets_the_base_rate(short, tmp_path):
    """`--set optimizer.lr` on resume gives the base rate; the schedule's factor where the run
    stands multiplies it, and resume says the rate that results."""
    run = copy_run(short["run"], tmp_path / "run")
    result = ok(run_nncli("resume", run, "--epochs", "5", "--set", "optimizer.lr=0.01", cwd=tmp_path))
    # SHORT's schedule by hand, from lr 0.01: a 1-epoch warmup, then StepLR; 4 epochs done
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=1)
    step = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, step], milestones=[1])
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    expected = optimizer.param_groups[0]["lr"]
    assert expected == pytest.approx(0.01 * 0.5)  # epochs 4 and 5 at half the base rate
    line = next(line for line in result.stdout.splitlines() if line.startswith("resuming"))
    assert line.endswith(f"at epoch 5 of 5; next learning rates: lr_0={expected:.3g} (0.01 x 0.5, the "
                         "schedule's factor)"), line
    assert float(metrics_rows(run)[4]["lr_0"]) == pytest.approx(expected)


def test_resume_with_another_metric_adds_its_column(short, tmp_path):
    """A metric added on resume gets a column of its own; the earlier rows leave it empty, in
    metrics.csv and in the table, and a later resume goes on from there."""
    run = copy_run(short["run"], tmp_path / "run")
    result = ok(run_nncli("resume", run, "--epochs", "5", "--set", "metrics=[accuracy, top2]", cwd=tmp_path))
    assert "val_top2" in result.stdout
    lines = (run / "metrics.csv").read_text().splitlines()
    assert lines[0] == "epoch,train_loss,val_loss,val_accuracy,val_top2,lr_0,time_s"
    assert [line.split(",")[4] for line in lines[1:5]] == ["", "", "", ""]
    assert 0 < float(lines[5].split(",")[4]) <= 1
    ok(run_nncli("resume", run, "--epochs", "6", "--set", "metrics=[accuracy, top2]", cwd=tmp_path))
    assert len((run / "metrics.csv").read_text().splitlines()) == 7


def test_resume_refuses_to_pick_the_best_epoch_by_another_metric(short, tmp_path):
    run = copy_run(short["run"], tmp_path / "run")
    before = snapshot(run)
    result = run_nncli("resume", run, "--epochs", "5", "--set", "train.early_stop.metric=val_accuracy",
                       cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "best epoch (best.pt, early stopping) is chosen by val_loss; it cannot change to val_accuracy" \
        in result.stderr
    assert snapshot(run) == before
    same = ok(run_nncli("resume", run, "--epochs", "5", "--set",
                        "train.early_stop={metric: val_loss, patience: 3}", cwd=tmp_path))
    assert "train.early_stop" in same.stdout  # early stopping by the same metric may be added


def test_resume_refuses_other_config_with_different_model(long, tmp_path):
    run = copy_run(long["run"], tmp_path / "run")
    other = write_config(tmp_path, LONG.replace("out_features: 32}", "out_features: 64}")
                         .replace("    - {type: Dropout, p: 0.2}\n", ""), "other.yaml")
    before = snapshot(run)
    result = run_nncli("resume", run, "--config", other, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    err = result.stderr
    assert "Traceback" not in err and str(other) in err
    assert "model.layers.0.out_features: 32 -> 64" in err
    assert "model.layers.2" in err  # the Dropout that went, and the layers that moved
    assert snapshot(run) == before


def test_resume_of_a_checkpoint_file_reads_it_once(short, tmp_path, monkeypatch):
    """`resume FILE` tells a checkpoint from a plain state_dict by its pickle alone, then loads it
    once (a large checkpoint is not read twice)."""
    import nncli.run.checkpoint

    loads = []
    real = nncli.run.checkpoint.load_file
    monkeypatch.setattr(nncli.run.checkpoint, "load_file", lambda path: loads.append(path) or real(path))
    run = copy_run(short["run"], tmp_path / "run")
    result = invoke("resume", run / "last.pt", "--epochs", "5", "-q")
    assert result.exit_code == 0, result.stderr
    assert loads == [run / "last.pt"]
    assert load(run / "last.pt")["epoch"] == 5


def test_resume_finished_run_says_so(short, tmp_path):
    """(Extending a finished run with a larger --epochs: test_stop_at_epoch_boundary_... and
    test_resume_extends_cosine_run_... .)"""
    run = copy_run(short["run"], tmp_path / "run")
    before = snapshot(run)
    result = ok(run_nncli("resume", run, cwd=tmp_path))
    assert result.stdout == ("the run finished at epoch 4 of 4; nothing to do. Extend it with: nncli resume "
                             f"{run} --epochs N\n")
    assert snapshot(run) == before


def test_resume_with_its_own_original_config_is_accepted(short, tmp_path):
    """`--config` with the very file the run was trained from differs only by defaults that the
    stored config has filled in: nothing to refuse."""
    run = copy_run(short["run"], tmp_path / "run")
    result = ok(run_nncli("resume", run, "--config", short["config"], "--epochs", "5", cwd=tmp_path))
    assert "cannot resume" not in result.stderr
    assert [r["epoch"] for r in metrics_rows(run)] == ["1", "2", "3", "4", "5"]


def test_resume_cannot_shorten_a_run_below_what_it_trained(short, tmp_path):
    run = copy_run(short["run"], tmp_path / "run")
    before = snapshot(run)
    result = run_nncli("resume", run, "--epochs", "2", cwd=tmp_path)
    assert result.returncode == 2
    assert "the run has already trained 4 epochs; --epochs 2 cannot take them back" in result.stderr
    assert snapshot(run) == before
