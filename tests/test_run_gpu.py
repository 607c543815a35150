"""GPU checks: skipped without CUDA; `bash bench/gpu_check.sh` runs them on a GPU machine."""
from pathlib import Path

import pytest
import torch
from helpers import CONFIGS, load, metrics_rows, run_nncli, write_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("settings", [
    ["amp=bf16", "channels_last=true"],
    ["amp=fp16"],
    ["compile=true"],
    ["amp=bf16", "channels_last=true", "compile=true"],
])
def test_digits_cnn_trains_on_the_gpu(tmp_path: Path, settings: list[str]) -> None:
    sets = [arg for s in settings for arg in ("--set", s)]
    done = run_nncli("train", CONFIGS / "digits_cnn.yaml", "--device", "cuda", "--epochs", "3",
                     "--out", tmp_path, "--quiet", *sets, cwd=tmp_path,
                     timeout=600)  # torch.compile may take minutes
    assert done.returncode == 0, done.stderr
    ckpt = load(tmp_path / "digits_cnn" / "last.pt")
    assert ckpt["metrics"][-1]["val_accuracy"] > 0.9
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    if "amp=fp16" in settings:
        assert ckpt["scaler"] is not None and "scale" in ckpt["scaler"]


def test_resume_on_the_gpu_continues_the_run_with_its_dropout(tmp_path: Path) -> None:
    """2 epochs, then resumed to 4, against 4 in one go: the GPU's random generator (dropout)
    is restored, and the checkpoints hold CPU tensors only, so plain torch.load reads them anywhere."""
    text = (CONFIGS / "digits_mlp.yaml").read_text().replace("    - ReLU\n",
                                                             "    - ReLU\n    - {type: Dropout, p: 0.3}\n")
    config = write_config(tmp_path, text + "deterministic: true\n", "dropout.yaml")
    for name, epochs in (("whole", "4"), ("resumed", "2")):
        done = run_nncli("train", config, "--device", "cuda", "--epochs", epochs, "--out", tmp_path / name,
                         "-q", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    done = run_nncli("resume", tmp_path / "resumed" / "dropout", "--epochs", "4", "--device", "cuda", "-q",
                     cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert [r["epoch"] for r in metrics_rows(tmp_path / "resumed" / "dropout")] == ["1", "2", "3", "4"]
    whole, resumed = (torch.load(tmp_path / name / "dropout" / "last.pt", weights_only=True)
                      for name in ("whole", "resumed"))
    assert "cuda" in resumed["rng"]
    tensors = [v for v in resumed["model"].values()] + [t for s in resumed["optimizer"]["state"].values()
                                                        for t in s.values() if isinstance(t, torch.Tensor)]
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    for key, value in whole["model"].items():
        assert torch.allclose(value, resumed["model"][key], atol=1e-6), key


def test_dp_with_one_gpu_trains_without_the_wrapper(tmp_path: Path) -> None:
    if torch.cuda.device_count() > 1:
        pytest.skip("several GPUs: DataParallel is used")
    done = run_nncli("train", CONFIGS / "digits_mlp.yaml", "--device", "cuda", "--epochs", "1",
                     "--set", "parallel=dp", "--out", tmp_path, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "without the DataParallel wrapper" in done.stdout


def test_explicit_missing_gpu_index_is_an_error(tmp_path: Path) -> None:
    index = torch.cuda.device_count()
    done = run_nncli("train", CONFIGS / "digits_mlp.yaml", "--device", f"cuda:{index}", cwd=tmp_path)
    assert done.returncode == 2
    assert f"only {index} GPU" in done.stderr


def test_dataloader_pins_batches_and_trains_like_memory_on_the_gpu(tmp_path: Path) -> None:
    from nncli.run.setup import load_config, load_data

    config = load_config(CONFIGS / "digits_mlp.yaml", ["data.loader=dataloader", "data.workers=1"])
    train = load_data(config).train.to(torch.device("cuda"))
    batches = list(train.batches(torch.arange(96), 64))
    assert [len(xb) for xb, _ in batches] == [64, 32] and all(xb.is_cuda and yb.is_cuda for xb, yb in batches)
    host_x, host_y = next(iter(train._loader))  # what the loader hands over before the copy
    assert host_x.is_pinned() and host_y.is_pinned()  # so that the copy need not block
    train.close()

    runs = []
    for name, sets in (("memory", []),
                       ("loaded", ["--set", "data.loader=dataloader", "--set", "data.workers=2"])):
        done = run_nncli("train", CONFIGS / "digits_mlp.yaml", "--device", "cuda", "--epochs", "3",
                         "--out", tmp_path / name, "-q", *sets, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        runs.append(load(tmp_path / name / "digits_mlp" / "last.pt"))
    # the same batches in the same order; GPU kernels may differ in the last bits
    for key, value in runs[0]["model"].items():
        assert torch.allclose(value, runs[1]["model"][key], atol=1e-5), key
