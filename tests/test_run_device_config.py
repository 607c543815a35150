"""The device keys (device, device_ids, amp, compile): their syntax is checked when the config loads,
so `validate` and `summary` refuse what `train` would; what needs a GPU is checked when training
starts (devices.resolve_device, devices.wrap_model)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import invoke, ok, run_nncli, write_config

from nncli.errors import ConfigError
from nncli.run.devices import Process, resolve_device, wrap_model

BASE = """\
data: {source: synthetic, n: 64, features: 2, classes: 3, val_split: 0.25}
train: {epochs: 1, batch_size: 16}
model:
  layers:
    - {type: Linear, out_features: 3}
"""  # 5 lines: a key appended to it is on line 6

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


def _refused(result, expected: str) -> None:
    """Exit status 2 and exactly `expected` as the one line on stderr, with no traceback."""
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stderr.strip() == expected


@pytest.mark.parametrize("command", ["validate", "summary"])
@pytest.mark.parametrize("line, message", [
    ("device: gpu", "device: must be auto, cpu, cuda, cuda:N or mps, got 'gpu'. Did you mean 'cuda'?"),
    ("device: CUDA", "device: must be auto, cpu, cuda, cuda:N or mps, got 'CUDA'. Did you mean 'cuda'?"),
    ("device: Cpu", "device: must be auto, cpu, cuda, cuda:N or mps, got 'Cpu'. Did you mean 'cpu'?"),
    ("device: gpu:1", "device: must be auto, cpu, cuda, cuda:N or mps, got 'gpu:1'. Did you mean 'cuda:1'?"),
    ("device: 'cuda:x'", "device: must be auto, cpu, cuda, cuda:N or mps, got 'cuda:x'. N in cuda:N is a "
                         "GPU index (cuda:0, cuda:1, ...); cuda alone is the first GPU."),
    ("device: cpu:5", "device: must be auto, cpu, cuda, cuda:N or mps, got 'cpu:5'. cpu takes no index: "
                      "use cpu."),
    ("device: ''", "device: must be auto, cpu, cuda, cuda:N or mps, got ''. Use auto to pick CUDA, else MPS, "
                   "else the CPU."),
    ("device: 0", "device: expected a string, got integer 0. Did you mean 'cuda:0'?"),
    ("device: cuda:128", "device: must be a GPU index that torch can take, got 'cuda:128'. torch numbers "
                         "GPUs from 0 to 127; nvidia-smi lists this machine's."),
    ("amp: true", "amp: expected a string, got boolean True. amp: true is not a precision: use bf16 "
                  "(or fp16 on older GPUs)."),
    ("amp: false", "amp: expected a string, got boolean False. Did you mean 'off'?"),
    ("amp: fp32", "amp: must be one of off, bf16, fp16, got 'fp32'. Did you mean 'off'?"),
    ("compile: 'true'", "compile: must be one of default, reduce-overhead, max-autotune, "
                        "max-autotune-no-cudagraphs, got 'true'. Write true or false without quotes: "
                        "'true' in quotes is a string, not a boolean."),
    ("compile: fast", "compile: must be one of default, reduce-overhead, max-autotune, "
                      "max-autotune-no-cudagraphs, got 'fast'. compile also takes true or false."),
    ("device_ids: []", "device_ids: expected a non-empty list of GPU indices, got []. Leave device_ids out "
                       "to use every visible GPU."),
    ("device_ids: [a, b]", "device_ids.0: expected a GPU index (an integer, 0 or more), got 'a'"),
    ("device_ids: [-1]", "device_ids.0: expected a GPU index (an integer, 0 or more), got -1"),
    ("device_ids: [1.5]", "device_ids.0: expected a GPU index (an integer, 0 or more), got 1.5"),
    ("device_ids: [true]", "device_ids.0: expected a GPU index (an integer, 0 or more), got True"),
    ("device_ids: [0, 0]", "device_ids.1: GPU 0 is listed twice; list each GPU once"),
])
def test_bad_device_keys_are_refused_at_load(tmp_path: Path, command: str, line: str, message: str) -> None:
    path = write_config(tmp_path, BASE + line + "\n")
    _refused(invoke(command, path), f"error: {path}:6: {message}")


def test_a_bad_device_id_names_the_line_of_its_item(tmp_path: Path) -> None:
    path = write_config(tmp_path, BASE + "parallel: dp\ndevice_ids:\n  - 0\n  - 1\n  - 0\n")
    _refused(invoke("validate", path),
             f"error: {path}:10: device_ids.2: GPU 0 is listed twice; list each GPU once")


@pytest.mark.parametrize("device", ["auto", "cpu", "mps", "cuda", "cuda:0", "cuda:12"])
def test_well_formed_devices_pass_validate_whatever_the_machine(tmp_path: Path, device: str) -> None:
    """validate checks the syntax only: whether the device is there is a question for train."""
    path = write_config(tmp_path, BASE + f"device: '{device}'\nparallel: dp\ndevice_ids: [1, 0]\n")
    assert ok(invoke("validate", path)).stdout.startswith("ok: ")


def test_set_device_is_checked_like_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, BASE)
    _refused(invoke("validate", path, "--set", "device=gpu"),
             "error: --set device: must be auto, cpu, cuda, cuda:N or mps, got 'gpu'. Did you mean 'cuda'?")


def test_a_gpu_index_beyond_torchs_is_refused_naming_the_option(tmp_path: Path) -> None:
    """cuda:99999999999999999999 passed the syntax check, then torch.device failed (exit 1)."""
    path = write_config(tmp_path, BASE)
    device = "cuda:99999999999999999999"
    _refused(invoke("validate", path, "--set", f"device={device}"),
             f"error: --set device: must be a GPU index that torch can take, got '{device}'. torch numbers "
             "GPUs from 0 to 127; nvidia-smi lists this machine's.")
    result = invoke("train", path, "--device", device, "--out", tmp_path / "runs")
    _refused(result, f"error: --device: '{device}' is not a device; expected auto, cpu, cuda, cuda:N or mps. "
                     "torch numbers GPUs from 0 to 127; nvidia-smi lists this machine's.")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("device, hint", [
    ("gpu", "Did you mean 'cuda'?"),
    ("cpu:5", "cpu takes no index: use cpu."),
    ("cuda:x", "N in cuda:N is a GPU index (cuda:0, cuda:1, ...); cuda alone is the first GPU."),
])
def test_malformed_device_option_names_the_option(tmp_path: Path, device: str, hint: str) -> None:
    path = write_config(tmp_path, BASE)
    result = invoke("train", path, "--device", device, "--out", tmp_path / "runs")
    _refused(result, f"error: --device: '{device}' is not a device; expected auto, cpu, cuda, cuda:N or mps. "
                     f"{hint}")
    assert not (tmp_path / "runs").exists()


@NO_GPU
def test_dp_with_device_ids_and_no_gpu_trains_without_the_wrapper_and_says_so(tmp_path: Path) -> None:
    path = write_config(tmp_path, BASE + "parallel: dp\ndevice_ids: [0, 1]\n")
    done = run_nncli("train", path, "--out", "runs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("parallel: dp needs two or more GPUs, and no GPU is visible: training "
                                  "without the DataParallel wrapper\n")


# --- GPU-only paths ---------------------------------------------------------------------------------
# This machine has no GPU: these tests make torch report some (torch.cuda.is_available and
# device_count), set torchrun's environment variables and call the functions directly. Nothing
# touches a real GPU: resolve_device only builds torch.device objects, and wrap_model's
# DataParallel is replaced by a stand-in that records its arguments.

@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name in ("WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def _ddp(monkeypatch: pytest.MonkeyPatch, local_rank: int, per_node: int) -> None:
    monkeypatch.setenv("WORLD_SIZE", str(per_node))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(per_node))


def _config_error(call) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        call()
    return caught.value


def test_single_process_devices(two_gpus) -> None:
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    err = _config_error(lambda: resolve_device("cuda:2"))
    assert (err.key, str(err)) == ("device", "device: 'cuda:2' asked for, but only 2 GPU(s) are visible")


def test_ddp_takes_the_gpu_of_the_local_rank(two_gpus, monkeypatch: pytest.MonkeyPatch) -> None:
    _ddp(monkeypatch, local_rank=1, per_node=2)
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_ddp_with_more_processes_than_gpus_is_an_error(two_gpus, monkeypatch: pytest.MonkeyPatch,
                                                        device: str) -> None:
    _ddp(monkeypatch, local_rank=2, per_node=4)
    err = _config_error(lambda: resolve_device(device))
    assert err.key == "device"
    assert str(err) == ("device: --nproc 4 needs 4 GPUs, 2 are visible. Lower --nproc "
                        "(torchrun: --nproc_per_node) or use device: cpu.")


def test_ddp_with_an_explicit_gpu_index_is_an_error(two_gpus, monkeypatch: pytest.MonkeyPatch) -> None:
    _ddp(monkeypatch, local_rank=0, per_node=2)
    err = _config_error(lambda: resolve_device("cuda:1"))
    assert err.key == "device"
    assert str(err) == ("device: 'cuda:1' names one GPU, but under DDP each process takes the GPU of its "
                        "local rank. Use device: cuda, and choose the GPUs with CUDA_VISIBLE_DEVICES.")


def _wrap_dp(device: str, device_ids: list[int] | None, monkeypatch: pytest.MonkeyPatch) -> list[int] | None:
    """wrap_model's parallel: dp branch: the device_ids it gives DataParallel (None: not wrapped)."""
    given = []
    monkeypatch.setattr(torch.nn, "DataParallel", lambda model, device_ids: given.append(device_ids) or model)
    notices = []
    wrap_model(torch.nn.Linear(2, 2), parallel="dp", device=torch.device(device), device_ids=device_ids,
               compile_mode=False, channels_last=False, process=Process(), notice=notices.append)
    assert len(notices) == 1
    return given[0] if given else None


def test_dp_default_ids_start_with_the_models_gpu(two_gpus, monkeypatch: pytest.MonkeyPatch) -> None:
    """DataParallel needs the module on device_ids[0] and gathers the outputs there."""
    assert _wrap_dp("cuda:0", None, monkeypatch) == [0, 1]
    assert _wrap_dp("cuda:1", None, monkeypatch) == [1, 0]
    assert _wrap_dp("cuda:1", [1, 0], monkeypatch) == [1, 0]


@pytest.mark.parametrize("device, ids, message", [
    ("cuda:0", [0, 2], "device_ids: GPU 2 asked for, but 2 GPUs are visible. Use ids from 0 to 1, or leave "
                       "device_ids out to use every visible GPU."),
    ("cuda:1", [0, 1], "device_ids: the model is on cuda:1, but DataParallel needs it on the first of "
                       "device_ids, GPU 0. List GPU 1 first, or use device: cuda:0."),
])
def test_dp_with_unusable_device_ids_is_an_error(two_gpus, monkeypatch: pytest.MonkeyPatch, device: str,
                                                 ids: list[int], message: str) -> None:
    err = _config_error(lambda: _wrap_dp(device, ids, monkeypatch))
    assert (err.key, str(err)) == ("device_ids", message)


def test_dp_on_the_cpu_of_a_gpu_machine_trains_without_the_wrapper(two_gpus,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    given, notices = [], []
    monkeypatch.setattr(torch.nn, "DataParallel", lambda model, device_ids: given.append(device_ids) or model)
    wrap_model(torch.nn.Linear(2, 2), parallel="dp", device=torch.device("cpu"), device_ids=[0, 1],
               compile_mode=False, channels_last=False, process=Process(), notice=notices.append)
    assert given == []
    assert notices == ["parallel: dp needs two or more GPUs, and training runs on cpu: training without the "
                       "DataParallel wrapper"]
