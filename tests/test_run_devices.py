"""Devices on CPU: DDP through torchrun and --nproc (gloo), dp without GPUs, device errors, AMP."""
import json
from pathlib import Path

import pytest
import torch
from helpers import (
    CONFIGS,
    DROPOUT_MLP,
    Background,
    load,
    metrics_rows,
    ok,
    read_metrics,
    run_nncli,
    run_python,
    write_config,
)

CONFIG = """\
seed: 1
data: {source: synthetic, n: 1200, features: 8, classes: 3, val_split: 0.25}
optimizer: {type: SGD, lr: 0.05, momentum: 0.9}
train: {epochs: 2, batch_size: 32}""" + DROPOUT_MLP


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path, CONFIG, "ddp.yaml")


def test_ddp_with_nproc_trains_writes_once_and_resumes(tmp_path: Path, config: Path) -> None:
    done = run_nncli("train", config, "--nproc", "2", "--out", "runs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "x 2 processes" in done.stdout
    assert "DDP: weights identical on all 2 processes" in done.stdout
    assert done.stdout.count("epoch 1/2 ") == 1  # only rank 0 prints
    run = tmp_path / "runs" / "ddp"
    assert sorted(p.name for p in run.iterdir()) == [".lock", "best.pt", "config.yaml", "last.pt",
                                                     "metrics.csv"]
    assert not (tmp_path / "runs" / "ddp-2").exists()  # one set of checkpoints, not one per rank
    ckpt = load(run / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["config"]["parallel"] == "ddp"
    assert not any(key.startswith("module.") for key in ckpt["model"])
    # 900 training samples, 450 per rank, 15 steps of 32 per epoch on each rank
    assert ckpt["step"] == 2 * 15
    assert len(metrics_rows(run)) == 2  # a row per epoch

    resumed = run_nncli("resume", run, "--nproc", "2", "--epochs", "3", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "DDP: weights identical on all 2 processes" in resumed.stdout
    assert load(run / "last.pt")["epoch"] == 3
    assert [r["epoch"] for r in metrics_rows(run)] == ["1", "2", "3"]


def test_torchrun_directly_and_a_ddp_checkpoint_loads_in_a_single_process(tmp_path: Path,
                                                                          config: Path) -> None:
    done = run_python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nncli",
                      "train", config,  # the file says parallel: none
                      "--out", "runs", "--epochs", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "DDP: weights identical on all 2 processes" in done.stdout
    run = tmp_path / "runs" / "ddp"
    ckpt = load(run / "last.pt")
    assert (ckpt["world_size"], ckpt["config"]["parallel"]) == (2, "ddp")  # what ran, not what the file said
    single = run_nncli("resume", run, "--epochs", "2", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    assert "continuing with 1 process instead of 2: 29 batches per process each epoch" in single.stdout
    ckpt = load(run / "last.pt")
    assert (ckpt["epoch"], ckpt["world_size"], ckpt["config"]["parallel"]) == (2, 1, "none")
    assert "parallel: none" in (run / "config.yaml").read_text()
    evaluated = run_nncli("eval", run, cwd=tmp_path)
    assert evaluated.returncode == 0 and "accuracy=" in evaluated.stdout


def test_ddp_validation_scores_the_saved_model_with_batchnorm(tmp_path: Path) -> None:
    """BatchNorm's running statistics are each process's own after the epoch's last step; the
    validation under DDP uses rank 0's, which last.pt holds: `eval` of it gives the same numbers."""
    config = write_config(tmp_path, CONFIG.replace("    - {type: Dropout, p: 0.2}\n", "    - BatchNorm1d\n"),
                          "bn.yaml")
    assert "BatchNorm1d" in config.read_text()
    ok(run_nncli("train", config, "--nproc", "2", "--out", "runs", "-q", cwd=tmp_path))
    last = metrics_rows(tmp_path / "runs" / "bn")[-1]
    evaluated = ok(run_nncli("eval", tmp_path / "runs" / "bn" / "last.pt", "--json", cwd=tmp_path))
    scores = json.loads(evaluated.stdout)
    assert scores["accuracy"] == pytest.approx(float(last["val_accuracy"]), abs=1e-9)
    assert scores["loss"] == pytest.approx(float(last["val_loss"]), rel=1e-5)


def test_ddp_with_accumulation_takes_the_steps_of_one_process_with_the_whole_batch(tmp_path: Path) -> None:
    """2 processes x 2 micro-batches of 8 = 32 samples per optimizer step: rank r takes every
    other sample of the epoch's permutation, so each step sees the same 32 samples as one
    process with batch_size 32, and the gradient is the same mean (to float rounding)."""
    config = write_config(tmp_path, """
        seed: 4
        data: {source: synthetic, n: 800, features: 8, classes: 3, val_split: 0.2}
        optimizer: {type: SGD, lr: 0.1}
        train: {epochs: 2, batch_size: 32}
        model: {layers: [{type: Linear, out_features: 16}, ReLU, {type: Linear, out_features: 3}]}
        """, "acc.yaml")
    ok(run_nncli("train", config, "--out", "one", "-q", cwd=tmp_path))
    ok(run_nncli("train", config, "--nproc", "2", "--set", "train.batch_size=8", "--set",
                 "train.accumulate=2", "--out", "two", "-q", cwd=tmp_path))
    one, two = load(tmp_path / "one" / "acc" / "last.pt"), load(tmp_path / "two" / "acc" / "last.pt")
    assert one["step"] == two["step"] == 2 * 20  # 640 samples / 32 per step
    for key, weights in one["model"].items():
        assert torch.allclose(weights, two["model"][key], atol=1e-5), key


# Long epochs for two processes (375 batches each), so that Ctrl-C after epoch 1's line lands
# inside epoch 2.
MANY_STEPS = CONFIG.replace("n: 1200", "n: 4000").replace("epochs: 2, batch_size: 32",
                                                          "epochs: 3, batch_size: 4")


def _processes_running(text: str) -> list[str]:
    """Command lines of this machine's processes that mention `text`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in line:
            found.append(line)
    return found


def test_ctrl_c_stops_every_ddp_process_and_resume_continues_exactly(tmp_path: Path) -> None:
    config = write_config(tmp_path, MANY_STEPS, "steps.yaml")
    ok(run_nncli("train", config, "--nproc", "2", "--out", "reference", "-q", cwd=tmp_path))
    reference = tmp_path / "reference" / "steps"

    training = Background("train", config, "--nproc", "2", "--out", "runs", cwd=tmp_path)
    training.wait_for_line("epoch 1/3")
    training.interrupt()  # the terminal's Ctrl-C reaches nncli, not the workers torchrun started
    code, out, err = training.finish()
    run = tmp_path / "runs" / "steps"
    assert code == 130, f"{out}\n{err}"
    assert err.count("stopped at epoch") == 1 and "Traceback" not in err, err
    assert f"Resume with: nncli resume {Path('runs') / 'steps'} --nproc 2" in err
    assert not _processes_running(str(config)), "a worker outlived the command"
    ckpt = load(run / "last.pt")
    assert ckpt["world_size"] == 2 and ckpt["epoch"] >= 1

    if ckpt["position"]:  # stopped inside an epoch: only 2 processes can finish it
        refused = run_nncli("resume", run, cwd=tmp_path)
        assert refused.returncode == 2
        assert f"stopped inside epoch {ckpt['epoch'] + 1} with 2 processes" in refused.stderr
        assert ("Resume it with --nproc 2; from the end of an epoch it can go on with any number."
                in refused.stderr)
    ok(run_nncli("resume", run, "--nproc", "2", "-q", cwd=tmp_path))
    assert metrics_rows(run) == metrics_rows(reference)  # train_loss too: the whole job's, not rank 0's
    trained, expected = load(run / "last.pt")["model"], load(reference / "last.pt")["model"]
    assert all(torch.equal(trained[k], expected[k]) for k in expected)


def test_nproc_says_bad_input_once_and_a_failing_process_ends_the_job(tmp_path: Path, config: Path) -> None:
    for args, message in [
        (["--nproc", "2", "--set", "train.batch_size=abc"],
         "error: --set train.batch_size: expected an integer"),
        (["--nproc", "1"], "error: --nproc: 1 process is a plain run: leave out --nproc, or give 2 or more"),
        (["--nproc", "2", "--set", "parallel=dp"],
         "error: --set parallel: dp is one process driving several GPUs"),
    ]:
        done = run_nncli("train", config, "--out", "runs", *args, cwd=tmp_path)
        assert done.returncode == 2
        assert done.stderr.startswith(message) and done.stderr.count("error:") == 1, done.stderr

    done = run_nncli("train", config, "--nproc", "2", "--device", "cuda", "--out", "runs", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("error: --device: 'cuda' asked for")
    assert done.stderr.count("error:") == 1, done.stderr

    ok(run_nncli("train", config, "--nproc", "2", "--epochs", "1", "--out", "runs", "-q", cwd=tmp_path))
    run = tmp_path / "runs" / "ddp"
    refused = run_nncli("resume", run, "--nproc", "2", "--set", "seed=3", cwd=tmp_path)
    assert refused.returncode == 2 and "cannot resume with a different seed" in refused.stderr
    assert refused.stderr.count("error:") == 1, refused.stderr
    (run / "metrics.csv").unlink()
    (run / "metrics.csv").mkdir()  # the main process cannot write it; the other one can go on
    failed = run_nncli("resume", run, "--nproc", "2", "--epochs", "2", cwd=tmp_path, timeout=120)
    assert failed.returncode == 1
    assert sorted(failed.stderr.splitlines()) == [
        "[process 1] error: stopped because process 0 of the job failed",
        f"error: {run / 'metrics.csv'}: cannot write {run / 'metrics.csv'}: Is a directory; the previous "
        "file, if any, is unchanged",
        f"warning: {run / 'metrics.csv'} holds 0 of the 1 epochs of metrics that last.pt has trained; the "
        "run goes on exactly, but its metrics.csv lacks the rest"]


def test_ddp_without_several_processes_is_a_clear_error(tmp_path: Path, config: Path) -> None:
    done = run_nncli("train", config, "--set", "parallel=ddp", "--out", "runs", cwd=tmp_path)
    assert done.returncode == 2
    assert "--nproc N" in done.stderr and "Traceback" not in done.stderr


def test_dp_without_gpus_trains_without_the_wrapper_and_says_so(tmp_path: Path, config: Path) -> None:
    done = run_nncli("train", config, "--set", "parallel=dp", "--out", "runs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert ("parallel: dp needs two or more GPUs, and no GPU is visible: training without the DataParallel "
            "wrapper" in done.stdout)
    assert not any(key.startswith("module.") for key in load(tmp_path / "runs" / "ddp" / "last.pt")["model"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("args, where", [
    (["--device", "cuda"], "error: --device: 'cuda' asked for, but this machine has no CUDA GPU"),
    (["--set", "device=cuda:1"], "error: --set device: 'cuda:1' asked for, but this machine has no CUDA GPU"),
    (["--device", "tpu"], "error: --device: 'tpu' is not a device"),
])
def test_unavailable_devices_are_clear_errors(tmp_path: Path, config: Path, args: list[str],
                                              where: str) -> None:
    done = run_nncli("train", config, "--out", "runs", *args, cwd=tmp_path)
    assert done.returncode == 2
    assert where in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()


def test_unavailable_device_in_the_file_names_its_line(tmp_path: Path, config: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    config.write_text(CONFIG + "device: cuda\n")
    done = run_nncli("train", config, cwd=tmp_path)
    assert done.returncode == 2
    assert f"{config}:11: device: 'cuda' asked for" in done.stderr


def test_amp_bf16_runs_on_cpu(tmp_path: Path, config: Path) -> None:
    done = run_nncli("train", config, "--set", "amp=bf16", "--out", "runs", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    ckpt = load(tmp_path / "runs" / "ddp" / "last.pt")
    assert ckpt["config"]["amp"] == "bf16" and ckpt["scaler"] is None
    assert ckpt["model"]["0.weight"].dtype == torch.float32  # autocast computes in bf16, keeps fp32 weights
    last = read_metrics(tmp_path / "runs" / "ddp")[1][-1]
    assert last["val_accuracy"] > 0.5
    # eval validates as training did (bf16 autocast, the same batches): the same numbers
    evaluated = ok(run_nncli("eval", tmp_path / "runs" / "ddp" / "last.pt", "--json", cwd=tmp_path))
    scores = json.loads(evaluated.stdout)
    per_class = scores.pop("per_class")  # and each class's share of it
    assert scores == {"loss": last["val_loss"], "accuracy": last["val_accuracy"]}
    assert sum(row["accuracy"] * row["samples"] for row in per_class) / sum(
        row["samples"] for row in per_class) == pytest.approx(last["val_accuracy"])


def test_amp_fp16_saves_its_grad_scaler(tmp_path: Path, config: Path) -> None:
    done = run_nncli("train", config, "--set", "amp=fp16", "--epochs", "1", "--out", "runs", "--quiet",
                     cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    scaler = load(tmp_path / "runs" / "ddp" / "last.pt")["scaler"]
    assert scaler is not None and scaler["scale"] > 0


def test_settings_that_change_nothing_say_so(tmp_path: Path, config: Path) -> None:
    mlp = run_nncli("train", config, "--set", "channels_last=true", "--set", "device_ids=[0]",
                    "--epochs", "1", "--out", "runs", cwd=tmp_path)
    assert mlp.returncode == 0, mlp.stderr
    assert ("channels_last: true changes nothing here: the model has no 4-D (convolution) weights"
            in mlp.stdout)
    assert "device_ids is for parallel: dp, and parallel is none: it is not used" in mlp.stdout
    cnn = run_nncli("train", CONFIGS / "digits_cnn.yaml", "--set", "channels_last=true", "--epochs", "1",
                    "--out", "runs", cwd=tmp_path)
    assert cnn.returncode == 0, cnn.stderr
    assert "channels_last" not in cnn.stdout and "device_ids" not in cnn.stdout


FAILS_ON_PROCESS_1 = """
import os
from torch import nn
import nncli

@nncli.register_layer
class FailsOnProcess1(nn.Module):
    def forward(self, x):
        if self.training and os.environ.get("RANK") == "1":
            raise RuntimeError("boom on process 1")
        return x
"""


def test_when_another_process_fails_each_says_what_it_knows_and_warnings_come_once(tmp_path: Path) -> None:
    (tmp_path / "fails.py").write_text(FAILS_ON_PROCESS_1)
    config = write_config(tmp_path, CONFIG.replace("model:\n  layers:\n", "plugins: [fails.py]\nmodel:\n"
                                                   "  layers:\n    - FailsOnProcess1\n"),
                          "fails.yaml")
    done = run_nncli("train", config, "--nproc", "2", "--out", "runs", "-q", cwd=tmp_path, timeout=120)
    assert done.returncode == 1
    assert sorted(done.stderr.splitlines()) == [
        "[process 1] error: RuntimeError: boom on process 1 (run again with --debug for the traceback)",
        "error: stopped because process 1 of the job failed",
        "plugins: imported fails.py (Python code that the config names)"]

    softmax = write_config(tmp_path, CONFIG.replace("    - {type: Linear, out_features: 3}\n",
                                                    "    - {type: Linear, out_features: 3}\n    - Softmax\n"),
                           "softmax.yaml")
    done = run_nncli("train", softmax, "--nproc", "2", "--out", "runs", "-q", "--epochs", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line]
    assert len(lines) == 2, lines  # torch's warning and nncli's, once each for the two processes
    assert lines[0] == ("warning: Implicit dimension choice for softmax has been deprecated. Change the call "
                        "to include dim=X as an argument.")
    assert lines[1].startswith(f"warning: {softmax}:") and "the model ends with Softmax" in lines[1]
