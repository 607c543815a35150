"""Devices on CPU: DDP through torchrun and --nproc (gloo), dp without GPUs, device errors, AMP."""
from pathlib import Path

import pytest
import torch

from helpers import load, metrics_rows, run_nncli, run_python, write_config

CONFIG = """\
seed: 1
data: {source: synthetic, n: 1200, features: 8, classes: 3, val_split: 0.25}
optimizer: {type: SGD, lr: 0.05, momentum: 0.9}
train: {epochs: 2, batch_size: 32}
model:
  layers:
    - {type: Linear, out_features: 32}
    - ReLU
    - {type: Dropout, p: 0.1}
    - {type: Linear, out_features: 3}
"""


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
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.yaml", "last.pt", "metrics.csv"]
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


def test_torchrun_directly_and_a_ddp_checkpoint_loads_in_a_single_process(tmp_path: Path, config: Path) -> None:
    done = run_python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nncli", "train",
                      config, "--out", "runs", "--set", "parallel=ddp", "--epochs", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "DDP: weights identical on all 2 processes" in done.stdout
    run = tmp_path / "runs" / "ddp"
    single = run_nncli("resume", run, "--epochs", "2", "--set", "parallel=none", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    assert "parallel: 'ddp' -> 'none'" in single.stdout
    assert load(run / "last.pt")["epoch"] == 2
    evaluated = run_nncli("eval", run, cwd=tmp_path)
    assert evaluated.returncode == 0 and "accuracy=" in evaluated.stdout


def test_ddp_without_several_processes_is_a_clear_error(tmp_path: Path, config: Path) -> None:
    done = run_nncli("train", config, "--set", "parallel=ddp", "--out", "runs", cwd=tmp_path)
    assert done.returncode == 2
    assert "--nproc N" in done.stderr and "Traceback" not in done.stderr


def test_dp_without_gpus_trains_without_the_wrapper_and_says_so(tmp_path: Path, config: Path) -> None:
    done = run_nncli("train", config, "--set", "parallel=dp", "--out", "runs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "parallel: dp needs two or more GPUs, and 0 are visible: training without the DataParallel wrapper" in done.stdout
    assert not any(key.startswith("module.") for key in load(tmp_path / "runs" / "ddp" / "last.pt")["model"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("args, where", [
    (["--device", "cuda"], "error: --device: 'cuda' asked for, but this machine has no CUDA GPU"),
    (["--set", "device=cuda:1"], "error: --set device: 'cuda:1' asked for, but this machine has no CUDA GPU"),
    (["--device", "tpu"], "error: --device: 'tpu' is not a device"),
])
def test_unavailable_devices_are_clear_errors(tmp_path: Path, config: Path, args: list[str], where: str) -> None:
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
    assert ckpt["metrics"][-1]["val_accuracy"] > 0.5


def test_amp_fp16_saves_its_grad_scaler(tmp_path: Path, config: Path) -> None:
    done = run_nncli("train", config, "--set", "amp=fp16", "--epochs", "1", "--out", "runs", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    scaler = load(tmp_path / "runs" / "ddp" / "last.pt")["scaler"]
    assert scaler is not None and scaler["scale"] > 0
