"""Checkpoints: what they hold, that a crash at any instant leaves a loadable one, that loading a
bad or hostile file fails cleanly (exit 2, the file named, no traceback, nothing overwritten, no
code run), and that an unwritable destination is a clear error.

Every command runs through the command line in a subprocess (`python -m nncli ...`).
"""
from __future__ import annotations

import io
import os
import pickle
import random
import re
import shutil
import struct
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    DROPOUT_MLP,
    ENV,
    TINY_REGRESSION,
    invoke,
    load,
    metrics_rows,
    nncli_argv,
    ok,
    run_nncli,
    run_python,
    snapshot,
    train_config,
    write_config,
)

SMALL = """
seed: 2
data: {source: synthetic, n: 2000, features: 16, classes: 3, val_split: 0.1}
optimizer: {type: SGD, lr: 0.1, momentum: 0.9, weight_decay: 1.0e-4}
schedule: {type: StepLR, step_size: 2, gamma: 0.5, warmup: {epochs: 1}}
train: {epochs: 3, batch_size: 64, shuffle: true}
checkpoint: {keep_last: 2}
""" + DROPOUT_MLP
SMALL_STEPS = 29  # 1,800 training samples / 64, rounded up

# A checkpoint of ~4.4 MB (weights and momentum) written after every optimizer step, so that
# most of the run's time is spent writing checkpoints.
BIG = """
seed: 5
data: {source: synthetic, n: 1200, features: 16, classes: 3, val_split: 0.1}
model:
  layers:
    - {type: Linear, out_features: 1024}
    - ReLU
    - {type: Dropout, p: 0.1}
    - {type: Linear, out_features: 512}
    - ReLU
    - {type: Linear, out_features: 3}
optimizer: {type: SGD, lr: 0.01, momentum: 0.9, weight_decay: 1.0e-4}
schedule: {type: StepLR, step_size: 2, gamma: 0.5, warmup: {epochs: 1}}
train: {epochs: 6, batch_size: 100, shuffle: true}
checkpoint: {every_steps: 1, keep_last: 2}
"""
TEMPORARY = re.compile(r"^\..+\.\d+\.tmp$")  # how write_atomic names its temporary files


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """SMALL trained for 3 epochs: its run directory."""
    return train_config(tmp_path_factory.mktemp("small"), SMALL, "small")[1]


# --- contents ----------------------------------------------------------------------------------

def test_checkpoint_contents(trained):
    ckpt = load(trained / "last.pt")  # weights_only: plain containers and tensors only
    for key in ("format", "model", "optimizer", "scheduler", "epoch", "step", "position", "best",
                "rng", "config", "metrics_rows", "versions"):
        assert key in ckpt, key
    assert ckpt["format"] == "nncli-checkpoint-1"
    assert list(ckpt["model"]) == ["0.weight", "0.bias", "3.weight", "3.bias"]
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert all(isinstance(v, torch.Tensor) for v in ckpt["model"].values())
    optimizer = ckpt["optimizer"]
    assert set(optimizer) == {"state", "param_groups"}
    assert optimizer["param_groups"][0]["momentum"] == 0.9
    assert optimizer["param_groups"][0]["weight_decay"] == 1.0e-4
    assert all("momentum_buffer" in s for s in optimizer["state"].values()) and len(optimizer["state"]) == 4
    assert ckpt["scheduler"] is not None and "_milestones" in ckpt["scheduler"]  # warmup + StepLR
    assert (ckpt["epoch"], ckpt["step"], ckpt["position"]) == (3, 3 * SMALL_STEPS, 0)
    assert (ckpt["epoch_losses"], ckpt["bad_epochs"], ckpt["stopped_early"]) == ([], 0, False)
    assert len(ckpt["epoch_lrs"]) == 1 and "train_state" not in ckpt  # each value once
    assert ckpt["best"]["metric"] == "val_loss" and ckpt["best"]["epoch"] in (1, 2, 3)
    assert set(ckpt["rng"]) >= {"python", "torch", "numpy", "data"}
    assert isinstance(ckpt["rng"]["torch"], torch.Tensor) and isinstance(ckpt["rng"]["data"], torch.Tensor)
    assert ckpt["config"] == yaml.safe_load((trained / "config.yaml").read_text())
    assert ckpt["config"]["checkpoint"]["keep_last"] == 2
    assert ckpt["metrics_rows"] == 3 and "metrics" not in ckpt  # the rows are metrics.csv's
    assert [int(r["epoch"]) for r in metrics_rows(trained)] == [1, 2, 3]
    assert ckpt["versions"]["torch"] == str(torch.__version__) and ckpt["versions"]["nncli"]

    best = load(trained / "best.pt")
    assert best["epoch"] == ckpt["best"]["epoch"]
    # keep_last: 2 keeps the last two epoch checkpoints only
    assert sorted(p.name for p in trained.glob("epoch_*.pt")) == ["epoch_2.pt", "epoch_3.pt"]
    assert load(trained / "epoch_2.pt")["epoch"] == 2
    assert torch.equal(load(trained / "epoch_3.pt")["model"]["0.weight"], ckpt["model"]["0.weight"])
    assert not [p.name for p in trained.iterdir() if p.name.endswith(".tmp")]


# --- crash safety ------------------------------------------------------------------------------

def _check_run_dir(run: Path) -> list[str]:
    """Every finished file loads; temporary files (allowed after kill -9) never take a real name."""
    temporaries = []
    for path in run.iterdir():
        if path.name.endswith(".tmp"):
            assert TEMPORARY.match(path.name), path.name
            temporaries.append(path.name)
        elif path.suffix == ".pt":
            ckpt = load(path)
            assert ckpt["format"] == "nncli-checkpoint-1" and "model" in ckpt, path
        elif path.name == "metrics.csv":
            metrics_rows(run)
    assert (run / "last.pt").is_file()
    return temporaries


def _start(*args, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(nncli_argv(*args), cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)


def test_kill_9_during_checkpoint_writes(tmp_path):
    config = write_config(tmp_path, BIG, "big.yaml")
    run = tmp_path / "runs" / "big"
    reference = _start("train", config, "--out", tmp_path / "reference", "-q", cwd=tmp_path)
    rng = random.Random(20240611)
    caught_writing = 0
    for attempt in range(5):
        if attempt == 0:
            proc = _start("train", config, "--out", tmp_path / "runs", "-q", cwd=tmp_path)
            deadline = time.monotonic() + 120
            while not (run / "last.pt").exists() and proc.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.005)
        else:
            proc = _start("resume", run, cwd=tmp_path)
            for line in proc.stdout:  # training starts after this line
                if line.startswith(("resuming", "the run finished")):
                    break
        time.sleep(rng.uniform(0.0, 0.3))
        proc.kill()
        proc.wait()
        proc.stdout.close()
        temporaries = _check_run_dir(run)
        caught_writing += bool(temporaries)

    result = ok(run_nncli("resume", run, cwd=tmp_path))
    assert reference.wait(timeout=180) == 0
    reference.stdout.close()
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")], "leftover temporary files"
    _check_run_dir(run)
    rows = metrics_rows(run)
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4", "5", "6"], result.stdout
    assert rows == metrics_rows(tmp_path / "reference" / "big")
    final, expected = (load(run / "last.pt")["model"],
                       load(tmp_path / "reference" / "big" / "last.pt")["model"])
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert sorted(p.name for p in run.glob("epoch_*.pt")) == ["epoch_5.pt", "epoch_6.pt"]
    print(f"{caught_writing} of 5 kills left a temporary file behind")


KILL_AT_BEST = """
import os, sys
import nncli.run.save
from nncli.cli import main

write_atomic = nncli.run.save.write_atomic
best_writes = 0

def write_then_die(data, path):  # kill -9 at one exact instant: as epoch 2's best.pt is written
    global best_writes
    if path.name == "best.pt":
        best_writes += 1
        if best_writes == 2:
            os._exit(137)
    write_atomic(data, path)

nncli.run.save.write_atomic = write_then_die
sys.argv = ["nncli", *sys.argv[1:]]
main()
"""


def test_kill_between_last_and_best_keeps_best_consistent(tmp_path):
    config = write_config(tmp_path, SMALL, "small.yaml")
    run = tmp_path / "runs" / "small"
    killed = run_python("-c", KILL_AT_BEST, "train", config, "--out", tmp_path / "runs", "--epochs", "2",
                        "-q", cwd=tmp_path)
    assert killed.returncode == 137, killed.stdout + killed.stderr
    ok(run_nncli("resume", run, cwd=tmp_path))
    last, best = load(run / "last.pt"), load(run / "best.pt")
    assert last["epoch"] == 2 and last["best"]["epoch"] == 2  # epoch 2 improved on epoch 1
    assert best["epoch"] == last["best"]["epoch"], "best.pt is not the best epoch that the run reports"


# --- bad checkpoints ---------------------------------------------------------------------------

class WritesFile:
    """Unpickling this would create a file: open(path, "w")."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class RunsCommand:
    """Unpickling this would run a shell command: os.system("touch path")."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _make_bad(kind: str, good: bytes, path: Path, marker: Path) -> None:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "corrupted":  # 16 bytes flipped in the middle of the largest tensor's data
        with zipfile.ZipFile(io.BytesIO(good)) as archive:
            info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        name_length, extra_length = struct.unpack("<HH",
                                                  good[info.header_offset + 26:info.header_offset + 30])
        middle = info.header_offset + 30 + name_length + extra_length + info.file_size // 2
        data = bytearray(good)
        data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
        path.write_bytes(bytes(data))
    elif kind == "text":
        path.write_text("epoch: 3\nthese are notes, not a checkpoint\n")
    elif kind == "list":
        torch.save([torch.zeros(3), 1, 2], path)
    elif kind == "pickle_os_system":  # in torch's zip format, next to a plausible format key
        torch.save({"format": "nncli-checkpoint-1", "model": RunsCommand(str(marker))}, path)
    elif kind == "pickle_open":  # a bare pickle, as torch's legacy format reads it
        with open(path, "wb") as f:
            pickle.dump(WritesFile(str(marker)), f, protocol=2)
    elif kind in EDITS:  # a well-formed file whose contents were edited by hand
        ckpt = torch.load(io.BytesIO(good), weights_only=True)
        EDITS[kind](ckpt)
        torch.save(ckpt, path)
    else:
        raise ValueError(kind)


EDITS = {
    "weights_of_another_shape": lambda ckpt: ckpt["model"].update({"0.weight": torch.zeros(2, 2)}),
    "epoch_as_text": lambda ckpt: ckpt.update(epoch="three"),
    "no_optimizer": lambda ckpt: ckpt.pop("optimizer"),
    # of the right type, but no run writes them: each crashed later, or resumed at epoch -4
    "input_shape_negative": lambda ckpt: ckpt.update(input_shape=[-1]),
    "best_value_as_text": lambda ckpt: ckpt["best"].update(value="abc"),
    "epoch_negative": lambda ckpt: ckpt.update(epoch=-5),
    "normalization_of_another_shape": lambda ckpt: ckpt.update(normalization={"mean": torch.zeros(3),
                                                                              "std": torch.ones(3)}),
}
BAD_KINDS = ["missing", "empty", "truncated", "corrupted", "text", "list", "pickle_os_system",
             "pickle_open", *EDITS]
EXPECTED_WORDS = {"missing": "not found", "empty": "empty", "truncated": "truncated",
                  "corrupted": "corrupted", "text": "not a PyTorch checkpoint",
                  "list": "not an nncli checkpoint", "pickle_os_system": "refused",
                  "pickle_open": "refused",
                  "weights_of_another_shape": "does not fit the run its own config describes (Error(s) in "
                                              "loading state_dict for Sequential: size mismatch for 0.weight",
                  "epoch_as_text": "the checkpoint holds str as 'epoch'", "no_optimizer": "lacks 'optimizer'",
                  "input_shape_negative": "the checkpoint has 'input_shape': [-1]; expected one sample's "
                                          "shape",
                  "best_value_as_text": "the checkpoint has a 'best' value of 'abc', not a number",
                  "epoch_negative": "the checkpoint has 'epoch': -5, below 0",
                  "normalization_of_another_shape": "the checkpoint has a 'normalization' of shape [3] "
                                                    "(mean) and [3] (std), but the model's input is [16]"}


@pytest.fixture(scope="module")
def bad_results(trained, tmp_path_factory) -> dict:
    """Every bad kind through `nncli resume RUN_DIR` (last.pt bad, best.pt fine) and through
    `nncli eval FILE`, in-process (the CLI as typer runs it)."""
    root = tmp_path_factory.mktemp("bad")
    good = (trained / "last.pt").read_bytes()
    jobs = {}
    for kind in BAD_KINDS:
        for command in ("resume", "eval"):
            folder = root / f"{command}-{kind}"
            marker = root / f"{command}-{kind}-PWNED"
            if kind == "missing":
                folder.mkdir()
                file, target = folder / "nowhere" / "last.pt", folder / "nowhere" / "last.pt"
            else:
                shutil.copytree(trained, folder)
                file = folder / "last.pt"
                _make_bad(kind, good, file, marker)
                target = folder if command == "resume" else file
            jobs[command, kind] = {"folder": folder, "file": file, "target": target, "marker": marker,
                                   "before": snapshot(folder)}
    for (command, _), job in jobs.items():  # in this process: a payload would leave its marker here too
        job["result"] = invoke(command, str(job["target"]))
    return jobs


@pytest.mark.parametrize("command", ["resume", "eval"])
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_checkpoint_is_refused_cleanly(bad_results, command, kind):
    job = bad_results[command, kind]
    result = job["result"]
    err = result.stderr
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.stdout}\n{err}"
    assert "Traceback" not in err and "Error:" not in err.replace("error:", ""), err
    assert str(job["file"]) in err, err  # names the file
    assert EXPECTED_WORDS[kind] in err, err
    assert len(err.strip().splitlines()) == 1, err  # one paragraph
    assert not job["marker"].exists(), "loading the checkpoint ran code"
    assert snapshot(job["folder"]) == job["before"], "a file was written or changed"
    assert not job["file"].parent.exists() or kind != "missing"


# --- unwritable destinations -------------------------------------------------------------------

def test_run_directory_inside_a_file_is_a_clear_error(tmp_path):
    config = write_config(tmp_path, SMALL, "small.yaml")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a regular file\n")
    result = run_nncli("train", config, "--out", blocker / "runs", "--epochs", "1", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == (f"error: {blocker}: cannot create the run directory "
                             f"{blocker / 'runs' / 'small'}: "
                             f"{blocker} is a file. Give --out (or checkpoint.dir) a folder.\n")
    assert blocker.read_text() == "a regular file\n"


def test_run_directory_where_nothing_can_be_created_is_exit_2(tmp_path):
    config = write_config(tmp_path, SMALL, "small.yaml")
    result = run_nncli("train", config, "--out", "/proc/nncli-test", "--epochs", "1", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == ("error: /proc/nncli-test/small: cannot create the run directory: No such file "
                             "or directory. Give --out (or checkpoint.dir) a folder you can write to.\n")


def test_a_file_named_like_the_run_directory_is_left_alone(tmp_path):
    config = write_config(tmp_path, SMALL, "small.yaml")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "small").write_text("notes\n")
    ok(run_nncli("train", config, "--out", "runs", "--epochs", "1", "-q", cwd=tmp_path))
    assert (tmp_path / "runs" / "small").read_text() == "notes\n"
    assert load(tmp_path / "runs" / "small-2" / "last.pt")["epoch"] == 1


def test_unwritable_file_in_run_directory_is_a_clear_error(trained, tmp_path):
    run = shutil.copytree(trained, tmp_path / "run")
    (run / "metrics.csv").unlink()
    (run / "metrics.csv").mkdir()  # a folder where metrics.csv must go: it cannot be replaced
    (run / "metrics.csv" / "keep").write_text("x")
    before = (run / "last.pt").read_bytes()
    result = run_nncli("resume", run, "--epochs", "4", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr  # the run directory, not the input
    assert "Traceback" not in result.stderr
    assert str(run / "metrics.csv") in result.stderr and "cannot write" in result.stderr, result.stderr
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert (run / "last.pt").read_bytes() == before  # resume writes metrics.csv before it trains


@pytest.mark.parametrize("optimizer, edit, problem", [
    ("{type: SGD, lr: 0.1, momentum: 0.9}", lambda state: state.update(momentum_buffer=torch.zeros(2, 2)),
     "the optimizer's 'momentum_buffer' of 0.weight is [2, 2], but 0.weight [1, 2] needs [1, 2]"),
    ("{type: Adam, lr: 0.01}", lambda state: state.pop("exp_avg"),
     "the optimizer state of 0.weight lacks 'exp_avg'"),
], ids=["wrong_shape", "missing"])
def test_an_optimizer_state_that_does_not_fit_is_refused_on_resume(tmp_path, optimizer, edit, problem):
    """The field types pass, torch's load_state_dict takes it, and the first step crashed (exit 1)."""
    text = TINY_REGRESSION.replace("{type: SGD, lr: 0.1}", optimizer)
    run = train_config(tmp_path, text, "tiny")[1]
    ckpt = load(run / "last.pt")
    edit(ckpt["optimizer"]["state"][0])
    torch.save(ckpt, run / "last.pt")
    before = snapshot(run)
    result = run_nncli("resume", run, "--epochs", "4", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == (f"error: {run / 'last.pt'}: the checkpoint does not fit the run its own config "
                             f"describes ({problem}); was it edited?\n")
    assert snapshot(run) == before


def test_an_archive_that_inflates_far_beyond_its_size_is_refused_at_once(tmp_path):
    """A 0.8 MB file whose data.pkl inflates to 800 MB: torch.save stores its entries
    uncompressed, so eval and resume refuse it from the archive's directory, before inflating
    anything (eval ran for minutes at 2 GB)."""
    bomb = tmp_path / "model.pt"
    zeros = bytes(1 << 20)
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/version", "3\n")
        with archive.open("archive/data.pkl", "w") as f:
            for _ in range(800):
                f.write(zeros)
    size = bomb.stat().st_size
    assert size < 1_000_000
    for command in ("eval", "resume"):
        started = time.monotonic()
        result = run_nncli(command, bomb, cwd=tmp_path, timeout=120)
        assert time.monotonic() - started < 30  # the bound: refused in seconds, whatever the machine
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr == (f"error: {bomb}: refused to load: its entries would inflate to 838,860,802 "
                                 f"bytes, and the file has {size:,}; torch.save stores them uncompressed, "
                                 "so it did not write this archive\n")
    assert snapshot(tmp_path) == {"model.pt": bomb.read_bytes()}


def test_a_read_only_run_directory_says_it_cannot_write(trained, tmp_path):
    """On a read-only file system even deleting the temporary file that was never created fails;
    that failure hid the message saying which file could not be written."""
    run = shutil.copytree(trained, tmp_path / "run")
    before = snapshot(run)
    # the run directory mounted read-only, in a user namespace of its own (no privileges needed)
    mount = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
             'mount --bind -o ro "$1" "$1" && shift && exec "$@"', "sh", str(run)]
    if shutil.which("unshare") is None or subprocess.run([*mount, "true"], capture_output=True).returncode:
        pytest.skip("needs unshare and user namespaces to mount a folder read-only")
    result = subprocess.run([*mount, *nncli_argv("resume", run, "--epochs", "4")], cwd=tmp_path, env=ENV,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240)
    assert result.returncode == 2, result.stdout + result.stderr  # found when the run is locked, at once
    assert result.stderr == (f"error: {run}: cannot write in the run directory: Read-only file system. "
                             "Resume it from a copy in a folder you can write to.\n")
    assert snapshot(run) == before


def test_the_saved_random_state_does_not_depend_on_quiet(tmp_path):
    """Importing rich (for the output that --quiet leaves out) draws from Python's generator: it
    changed the `rng.python` state saved after seeding."""
    config = write_config(tmp_path, TINY_REGRESSION, "tiny.yaml")
    ok(run_nncli("train", config, "--out", tmp_path / "quiet", "--quiet", cwd=tmp_path))
    ok(run_nncli("train", config, "--out", tmp_path / "talking", cwd=tmp_path))
    quiet, talking = (load(tmp_path / out / "tiny" / "last.pt")["rng"] for out in ("quiet", "talking"))
    assert quiet["python"] == talking["python"]
    random.seed(0)  # the config's seed: training itself draws nothing from Python's generator
    assert tuple(quiet["python"][1]) == random.getstate()[1]


@pytest.mark.parametrize("edit", ["layer", "input_shape"])
def test_a_config_edited_to_a_huge_model_is_refused_before_it_is_built(tmp_path, edit):
    """A checkpoint whose stored config (or input_shape) asks for terabytes of weights that its own
    tensors do not have: eval, predict and resume refuse it as bad input (exit 2, does not fit),
    before allocating a model for it (which was exit 1, out of memory, or minutes of swapping)."""
    config, run = train_config(tmp_path, TINY_REGRESSION, "tiny")
    ckpt = load(run / "last.pt")
    if edit == "layer":
        ckpt["config"]["model"]["layers"][0]["out_features"] = 10**12
    else:
        ckpt["input_shape"] = [10**12]
    torch.save(ckpt, tmp_path / "model.pt")
    for args in (["eval"], ["predict", "--input", "[[0.5, 0.5]]"], ["resume", "--epochs", "4"]):
        result = invoke(args[0], str(tmp_path / "model.pt"), *args[1:])
        assert result.exit_code == 2, result.stdout + result.stderr
        assert "the checkpoint does not fit the run its own config describes" in result.stderr
        assert "Traceback" not in result.stderr
