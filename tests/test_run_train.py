"""`nncli train`, `eval` and `predict`: run directories, the loop, early and NaN stops, the CLI."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import (
    BAR_CHARS,
    CONFIGS,
    ENV,
    REPO,
    TINY_REGRESSION,
    invoke,
    load,
    metrics_rows,
    nncli_argv,
    ok,
    only_run_dir,
    read_metrics,
    run_nncli,
    run_python,
    shipped_options,
    write_config,
)
from torch import nn

REFERENCE_LOOP = REPO.parent / "shared" / "bench" / "reference_loop.py"
if not REFERENCE_LOOP.is_file():
    REFERENCE_LOOP = Path("/work/shared/bench/reference_loop.py")

# Every shipped config with a data section, and the metrics.csv header it must produce.
SHIPPED_HEADERS = {
    "csv_regression.yaml": "epoch,train_loss,val_loss,val_mae,val_rmse,val_r2,lr_0,time_s",
    "digits_cnn.yaml": "epoch,train_loss,val_loss,val_accuracy,lr_0,time_s",
    "digits_inception_se.yaml": "epoch,train_loss,val_loss,val_accuracy,lr_0,time_s",
    "digits_mlp.yaml": "epoch,train_loss,val_loss,val_accuracy,val_top3,lr_0,time_s",
    "images_folder.yaml": "epoch,train_loss,val_loss,val_accuracy,lr_0,time_s",  # needs Pillow
    "linear_regression.yaml": "epoch,train_loss,lr_0,time_s",  # val_split: 0
    # 2 named groups
    "perceptron_lr_groups.yaml": "epoch,train_loss,val_loss,val_mae,lr_bias,lr_weight,time_s",
    "perceptron_synthetic.yaml": "epoch,train_loss,val_loss,val_mae,val_r2,lr_0,time_s",
    "synthetic_cifar_augment.yaml": "epoch,train_loss,val_loss,val_accuracy,lr_0,time_s",
}


def tiny(tmp_path: Path, extra: str = "", name: str = "tiny.yaml") -> Path:
    """TINY_REGRESSION with `extra` YAML lines appended (later keys are not allowed to repeat,
    so `extra` only adds top-level sections the base lacks)."""
    return write_config(tmp_path, TINY_REGRESSION + extra, name)


def test_every_shipped_config_with_data_is_covered():
    with_data = sorted(p.name for p in CONFIGS.glob("*.yaml")
                       if (yaml.safe_load(p.read_text()) or {}).get("data"))
    assert with_data == sorted(SHIPPED_HEADERS)


@pytest.mark.parametrize("name", sorted(SHIPPED_HEADERS))
def test_shipped_config_trains(name, tmp_path):
    epochs = 1 if name in ("digits_cnn.yaml", "synthetic_cifar_augment.yaml") else 2  # slow on 2 CPU cores
    options = shipped_options(CONFIGS / name, tmp_path)  # images_folder's folder, made in tmp_path
    if options:
        tmp_path = tmp_path / "out"
    result = invoke("train", CONFIGS / name, "--epochs", epochs, "--out", tmp_path, "--quiet", *options)
    assert result.exit_code == 0, result.stderr
    assert not re.search(r"^epoch \d", result.stdout, re.M), "--quiet printed epoch lines"
    run = only_run_dir(tmp_path)
    assert run.name == Path(name).stem
    assert f"saved: {run}" in result.stdout

    resolved = yaml.safe_load((run / "config.yaml").read_text())
    original = yaml.safe_load((CONFIGS / name).read_text())
    assert "grad_clip" in resolved["train"] and resolved["train"]["grad_clip"] is None
    assert resolved["train"]["epochs"] == epochs  # --epochs is part of the resolved config
    assert resolved["checkpoint"] == {"dir": "checkpoints",
                                      "every": original.get("checkpoint", {}).get("every", 1),
                                      "every_steps": None, "keep_last": 0}
    assert resolved["name"] == Path(name).stem and resolved["seed"] == original.get("seed", 0)
    for key in ("amp", "device", "compile", "schedule", "metrics", "loss", "optimizer"):
        assert key in resolved

    header, rows = read_metrics(run)
    assert ",".join(header) == SHIPPED_HEADERS[name]
    assert [row["epoch"] for row in rows] == list(range(1, epochs + 1))
    assert all(math.isfinite(v) for row in rows for v in row.values())

    last, best = load(run / "last.pt"), load(run / "best.pt")
    for ckpt in (last, best):
        assert {"model", "optimizer"} <= set(ckpt)
        assert ckpt["model"] and all(isinstance(t, torch.Tensor) for t in ckpt["model"].values())
        lrs = [g["lr"] for g in ckpt["optimizer"]["param_groups"]]
        assert len(lrs) == sum(h.startswith("lr_") for h in header)
    assert last["epoch"] == epochs
    assert last["model"].keys() == best["model"].keys()
    best_epoch = best["epoch"]
    monitor = "val_loss" if "val_loss" in header else "train_loss"
    assert rows[best_epoch - 1][monitor] == min(row[monitor] for row in rows)


def test_float64_and_token_id_models_train_and_predict(tmp_path):
    """model.input_dtype: float64 builds a float64 model (its outputs given in full by predict);
    int64 feeds token ids to an Embedding, and predict takes whole numbers only."""
    f64 = write_config(tmp_path, TINY_REGRESSION.replace("model:\n", "model:\n  input_dtype: float64\n"),
                       "f64.yaml")
    assert invoke("train", f64, "--out", tmp_path, "-q").exit_code == 0
    weights = load(tmp_path / "f64" / "best.pt")["model"]  # what predict takes from a run directory
    assert {v.dtype for v in weights.values()} == {torch.float64}
    out = invoke("predict", tmp_path / "f64", "--input", "[[0.25, -0.5]]", "--json")
    assert out.exit_code == 0, out.stderr
    x = torch.tensor([[0.25, -0.5]], dtype=torch.float64)
    expected = x @ weights["0.weight"].T + weights["0.bias"]
    assert json.loads(out.stdout)[0]["output"] == expected[0].tolist()  # float64, every digit

    tokens = write_config(tmp_path, """
        data:
          source: tensors
          x: [[1, 2, 3], [4, 5, 6], [7, 8, 9], [0, 1, 2], [3, 4, 5], [6, 7, 8]]
          y: [0, 1, 0, 1, 0, 1]
          val_split: 0
        train: {epochs: 2, batch_size: 2}
        model:
          input_dtype: int64
          layers:
            - {type: Embedding, num_embeddings: 10, embedding_dim: 4}
            - Flatten
            - {type: Linear, out_features: 2}
    """, "tokens.yaml")
    assert invoke("train", tokens, "--out", tmp_path, "-q").exit_code == 0
    out = invoke("predict", tmp_path / "tokens", "--input", "[[1, 2, 3]]", "--json")
    assert out.exit_code == 0, out.stderr
    assert len(json.loads(out.stdout)[0]["output"]) == 2
    fraction = invoke("predict", tmp_path / "tokens", "--input", "[[1.5, 2, 3]]")
    assert fraction.exit_code == 2 and "the model takes whole numbers" in fraction.stderr
    unknown = invoke("predict", tmp_path / "tokens", "--input", "[[1, 2, 10]]")
    assert unknown.exit_code == 2
    assert unknown.stderr == ("error: --input: token id 10 is outside the Embedding's num_embeddings: 10 "
                              "(ids 0 to 9)\n")


def test_linear_regression_100_epochs_equals_the_tutorials_code(tmp_path):
    """The tutorial's own run (100 epochs) gives bit for bit the weights of its code, seed 0."""
    result = invoke("train", CONFIGS / "linear_regression.yaml", "--epochs", 100, "--out", tmp_path,
                    "--quiet")
    assert result.exit_code == 0, result.stderr
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    x = torch.tensor([[1.0], [2.0], [3.0]])
    criterion = torch.nn.MSELoss(reduction="sum")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(100):
        optimizer.zero_grad()
        loss = criterion(model(x), 2 * x)
        loss.backward()
        optimizer.step()
    saved = load(tmp_path / "linear_regression" / "last.pt")["model"]
    assert torch.equal(saved["linear.weight"], model.weight.detach())
    assert torch.equal(saved["linear.bias"], model.bias.detach())
    assert float(model.weight) == pytest.approx(1.7463, abs=1e-4)


def test_linear_regression_learns_y_equals_2x(tmp_path):
    """The tutorial: 1000 epochs of SGD on three points; weight 2, prediction for x = 4 is 8."""
    result = invoke("train", CONFIGS / "linear_regression.yaml", "--out", tmp_path, "--quiet")
    assert result.exit_code == 0, result.stderr
    run = tmp_path / "linear_regression"
    weight = load(run / "best.pt")["model"]["linear.weight"]
    assert weight.shape == (1, 1)
    assert abs(float(weight) - 2.0) < 0.01
    _, rows = read_metrics(run)
    assert len(rows) == 1000

    out = invoke("predict", run, "--input", "[[4.0]]", "--json")
    assert out.exit_code == 0, out.stderr
    predictions = json.loads(out.stdout)
    assert len(predictions) == 1 and "class" not in predictions[0]
    assert abs(predictions[0]["output"][0] - 8.0) < 0.02

    plain = invoke("predict", run, "--input", "[[4.0]]")
    value = float(re.fullmatch(r"0: \[([-\d.e]+)\]\n", plain.stdout).group(1))
    assert abs(value - 8.0) < 0.02


# --- the digits MLP: the reference loop, eval and predict ---------------------------------

@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory) -> Path:
    """configs/digits_mlp.yaml trained for 3 epochs (shared by the tests below)."""
    out = tmp_path_factory.mktemp("mlp")
    result = invoke("train", CONFIGS / "digits_mlp.yaml", "--epochs", 3, "--out", out, "--quiet")
    assert result.exit_code == 0, result.stderr
    return out / "digits_mlp"


def test_digits_mlp_matches_hand_written_reference_loop(mlp_run):
    if not REFERENCE_LOOP.is_file():
        pytest.skip("shared/bench/reference_loop.py is not here")
    ref = subprocess.run([sys.executable, str(REFERENCE_LOOP), "--model", "mlp", "--epochs", "3"],
                         capture_output=True, text=True, timeout=120)
    assert ref.returncode == 0, ref.stderr
    reference_acc = re.search(r"\bval_acc=([\d.]+)", ref.stdout).group(1)
    _, rows = read_metrics(mlp_run)
    assert len(rows) == 3
    assert f"{rows[-1]['val_accuracy']:.4f}" == reference_acc


def _digits_model(state_dict: dict) -> nn.Module:
    """The digits MLP by hand, to check nncli's outputs independently of nncli's model code."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    model.load_state_dict(state_dict)
    return model.eval()


def _digits_val_split() -> tuple[np.ndarray, np.ndarray]:
    """The seeded 80/20 split (seed 0), as reference_loop.py makes it."""
    arrays = np.load(REPO / "nncli" / "datasets" / "digits.npz")
    perm = torch.randperm(len(arrays["labels"]), generator=torch.Generator().manual_seed(0)).numpy()
    n_val = len(perm) // 5
    return arrays["images"][perm[:n_val]], arrays["labels"][perm[:n_val]]


def test_eval_reports_the_best_epochs_val_loss(mlp_run):
    _, rows = read_metrics(mlp_run)
    best = min(rows, key=lambda r: r["val_loss"])
    as_json = invoke("eval", mlp_run, "--json")
    assert as_json.exit_code == 0, as_json.stderr
    results = json.loads(as_json.stdout)
    assert results["loss"] == pytest.approx(best["val_loss"], abs=1e-6)
    assert results["accuracy"] == pytest.approx(best["val_accuracy"], abs=1e-9)
    assert results["top3"] == pytest.approx(best["val_top3"], abs=1e-9)

    plain = invoke("eval", mlp_run)
    assert plain.exit_code == 0
    assert plain.stdout.startswith("validation data: ")
    assert f"loss={best['val_loss']:.4f}" in plain.stdout
    assert f"accuracy={best['val_accuracy']:.4f}" in plain.stdout


def test_eval_of_a_regression_run_matches_its_best_epoch(tmp_path):
    """(N,) targets against an (N, 1) output: eval must not broadcast them into an (N, N) loss."""
    config = write_config(tmp_path, TINY_REGRESSION.replace("epochs: 3", "epochs: 5"), "tiny.yaml")
    assert invoke("train", config, "--out", tmp_path, "--quiet").exit_code == 0
    _, rows = read_metrics(tmp_path / "tiny")
    best = min(rows, key=lambda r: r["val_loss"])
    assert best["epoch"] < rows[-1]["epoch"], "the scenario: validation loss rises after its best epoch"
    assert load(tmp_path / "tiny" / "best.pt")["epoch"] == best["epoch"]
    result = invoke("eval", tmp_path / "tiny", "--json")
    assert result.exit_code == 0 and result.stderr == ""  # no broadcasting warning either
    got = json.loads(result.stdout)
    assert got["loss"] == pytest.approx(best["val_loss"], abs=1e-6)
    assert got["mae"] == pytest.approx(best["val_mae"], abs=1e-6)
    text = invoke("eval", tmp_path / "tiny")
    assert text.stdout == f"validation data: loss={best['val_loss']:.4f}  mae={best['val_mae']:.4f}\n"


def test_eval_and_resume_warn_when_the_data_changed_since_training(tmp_path):
    data = tmp_path / "points.csv"
    data.write_text("x1,x2,target\n" + "".join(f"{i % 7},{i % 5},{2 * (i % 7) + i % 5}\n" for i in range(40)))
    config = write_config(tmp_path, """
        data: {source: csv, path: points.csv, target: target, val_split: 0.25}
        loss: MSELoss
        metrics: [mae]
        optimizer: {type: SGD, lr: 0.01}
        train: {epochs: 2, batch_size: 8}
        model: {layers: [{type: Linear, out_features: 1}]}
        """, "points.yaml")
    run = tmp_path / "runs" / "points"
    ok(run_nncli("train", config, "--out", tmp_path / "runs", "-q", cwd=tmp_path))
    assert re.fullmatch(r"crc32:[0-9a-f]{8} train:30 val:10", load(run / "last.pt")["data_fingerprint"])
    assert ok(run_nncli("eval", run, "--trust-data", tmp_path, cwd=tmp_path)).stderr == ""

    data.write_text(data.read_text().replace("\n3,3,9\n", "\n3,3,10\n"))  # one target edited
    changed = ok(run_nncli("eval", run, "--trust-data", tmp_path, cwd=tmp_path))
    assert changed.stderr.splitlines() == [
        "warning: the run's data has changed since it was trained (a data file was edited or replaced?); "
        "these results are not comparable with its metrics.csv"]
    resumed = ok(run_nncli("resume", run, "--epochs", "3", "-q", "--trust-data", tmp_path, cwd=tmp_path))
    assert resumed.stderr.splitlines() == [
        "warning: the run's data has changed since it was saved (a data file was edited or replaced?); "
        "training continues on the new data, so it will not reproduce an uninterrupted run"]
    assert load(run / "last.pt")["epoch"] == 3


OUT_OF_MEMORY_PLUGIN = """
import torch
from torch import nn
import nncli

@nncli.register_layer
class RunsOutOfMemory(nn.Module):
    \"\"\"The identity, until its 5th training step: then the allocator 'fails', as a GPU's would.\"\"\"
    def __init__(self):
        super().__init__()
        self.steps = 0

    def forward(self, x):
        if self.training:
            self.steps += 1
            if self.steps == 5:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB.\\nmore detail")
        return x
"""


def test_running_out_of_device_memory_is_exit_1_with_a_hint(tmp_path):
    (tmp_path / "oom.py").write_text(OUT_OF_MEMORY_PLUGIN)
    config = write_config(tmp_path, """
        plugins: [oom.py]
        data: {source: synthetic, n: 80, features: 4, classes: 2, val_split: 0.2}
        train: {epochs: 3, batch_size: 16}
        model: {layers: [{type: Linear, out_features: 2}, RunsOutOfMemory]}
        """)
    done = run_nncli("train", config, "--out", tmp_path / "runs", "-q", cwd=tmp_path)  # 4 steps an epoch
    assert done.returncode == 1
    assert done.stderr == ("plugins: imported oom.py (Python code that the config names)\n"
                           "error: out of memory training on cpu: CUDA out of memory. Tried to allocate "
                           "20.00 GiB. Lower train.batch_size (train.accumulate keeps the effective batch "
                           "size), or train.eval_batch_size if it failed in validation, or set amp: bf16. "
                           "The checkpoints of earlier epochs are unchanged.\n")
    assert load(tmp_path / "runs" / "config" / "last.pt")["epoch"] == 1


def test_a_model_too_big_for_the_cpu_is_exit_1_with_a_hint(tmp_path):
    """The CPU allocator's failure (a RuntimeError, not torch's OutOfMemoryError) while the model
    is built: exit 1 with a hint, not a config error; validate, on the meta device, is fine."""
    (tmp_path / "huge.py").write_text(
        "import torch\nfrom torch import nn\nimport nncli\n\n\n"
        "@nncli.register_layer(infer={'in_features': -1})\nclass Huge(nn.Linear):\n"
        "    def __init__(self, in_features: int, out_features: int):\n"
        "        if torch.empty(0).device.type != 'meta':\n"
        "            raise RuntimeError('[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: "
        "can\\'t '\n"
        "                               'allocate memory: you tried to allocate 40000000000 bytes.\\nmore')\n"
        "        super().__init__(in_features, out_features)\n")
    config = write_config(tmp_path, """
        plugins: [huge.py]
        data: {source: synthetic, n: 50, features: 4, classes: 2}
        model: {layers: [{type: Huge, out_features: 2}]}
        """)
    assert invoke("validate", config).exit_code == 0
    done = run_nncli("train", config, "--out", tmp_path / "runs", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr == ("plugins: imported huge.py (Python code that the config names)\n"
                           "error: out of memory building the model on the CPU: [enforce fail at "
                           "alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: you tried "
                           "to allocate 40000000000 bytes. `nncli summary` shows its size without building "
                           "it; use a smaller model, or a machine with more memory.\n")
    assert not (tmp_path / "runs").exists()


def test_data_too_big_for_the_cpu_in_validate_is_exit_1_in_one_line(tmp_path):
    config = write_config(tmp_path, """
        data: {source: synthetic, n: 1000000000000, features: 3}
        model: {layers: [{type: Linear, out_features: 2}]}
        """)
    done = run_nncli("validate", config, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr == ("error: out of memory: DefaultCPUAllocator: can't allocate memory: you tried to "
                           "allocate 12000000000000 bytes. Error code 12 (Cannot allocate memory). The "
                           "config's sizes (data, layers, batch) ask for more than this machine has; "
                           "`nncli summary` shows the model's size\n")


def test_validation_batches_are_eval_batch_size(tmp_path):
    """Validation reads batches of train.eval_batch_size (default: at least 1024), in training and
    in `nncli eval`; a plugin layer writes down the batch sizes it sees in eval mode."""
    (tmp_path / "records.py").write_text(
        "from pathlib import Path\nfrom torch import nn\nimport nncli\n\n\n"
        "@nncli.register_layer\nclass Records(nn.Module):\n"
        "    def forward(self, x):\n"
        "        if not self.training and len(x) > 1:  # not the shape pass, a batch of 1\n"
        "            with open(Path(__file__).with_suffix('.log'), 'a') as log:\n"
        "                log.write(f'{len(x)}\\n')\n"
        "        return x\n")
    config = write_config(tmp_path, """
        plugins: [records.py]
        data: {source: synthetic, n: 100, features: 4, classes: 2, val_split: 0.3}
        train: {epochs: 2, batch_size: 16, eval_batch_size: 8}
        model: {layers: [{type: Linear, out_features: 2}, Records]}
        """)
    assert invoke("train", config, "--out", tmp_path / "runs", "-q").exit_code == 0
    assert (tmp_path / "records.log").read_text().split() == ["8", "8", "8", "6"] * 2  # 30 samples, 2 epochs
    (tmp_path / "records.log").unlink()
    assert invoke("eval", tmp_path / "runs" / "config", "--plugin", tmp_path / "records.py").exit_code == 0
    assert (tmp_path / "records.log").read_text().split() == ["8", "8", "8", "6"]
    default = invoke("train", config, "--set", "train.eval_batch_size=null", "--epochs", "1", "--out",
                     tmp_path / "runs", "-q")
    assert default.exit_code == 0
    assert (tmp_path / "records.log").read_text().split()[-1] == "30"


def test_torch_warnings_are_one_line_each_and_in_full_with_debug(tmp_path):
    config = write_config(tmp_path, """
        data: {source: synthetic, n: 64, features: 4, classes: 3}
        train: {epochs: 1, batch_size: 32}
        model: {layers: [{type: Linear, out_features: 3}, Softmax]}
        """)
    softmax = "Implicit dimension choice for softmax has been deprecated"
    done = ok(run_nncli("train", config, "--out", tmp_path / "runs", "-q", cwd=tmp_path))
    lines = [line for line in done.stderr.splitlines() if line]
    assert len(lines) == 2, lines  # torch's and nncli's (a Softmax before CrossEntropyLoss)
    assert lines[0] == f"warning: {softmax}. Change the call to include dim=X as an argument."
    assert lines[1].startswith(f"warning: {config}:3: 1 (Softmax): the model ends with Softmax")
    debug = ok(run_nncli("train", config, "--out", tmp_path / "runs", "-q", "--debug", cwd=tmp_path))
    assert f"UserWarning: {softmax}" in debug.stderr  # Python's own format: file, line, category
    assert f"UserWarning: {config}:3: 1 (Softmax)" in debug.stderr


def test_eval_on_a_data_file_with_labels_outside_the_classes_exits_2(mlp_run, tmp_path):
    np.savez(tmp_path / "labels.npz", x=np.zeros((3, 1, 8, 8), np.float32), y=np.array([0, 3, 12]))
    result = invoke("eval", mlp_run, "--data", tmp_path / "labels.npz")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {tmp_path / 'labels.npz'}: labels run from 0 to 12, but the "
                                    "model's output has 10 classes (labels 0 to 9)")


def test_eval_on_a_data_file_matches_a_hand_computed_loss(mlp_run, tmp_path):
    x, y = _digits_val_split()
    np.savez(tmp_path / "val.npz", x=x[:100], y=y[:100])
    result = invoke("eval", mlp_run, "--data", tmp_path / "val.npz", "--json")
    assert result.exit_code == 0, result.stderr
    model = _digits_model(load(mlp_run / "best.pt")["model"])
    with torch.no_grad():
        out = model(torch.from_numpy(x[:100]))
    expected_loss = float(nn.functional.cross_entropy(out, torch.from_numpy(y[:100])))
    expected_acc = float((out.argmax(1) == torch.from_numpy(y[:100])).float().mean())
    got = json.loads(result.stdout)
    assert got["loss"] == pytest.approx(expected_loss, abs=1e-5)
    assert got["accuracy"] == pytest.approx(expected_acc, abs=1e-6)
    text = invoke("eval", mlp_run, "--data", tmp_path / "val.npz")
    assert text.stdout.startswith(f"{tmp_path / 'val.npz'}: loss=")


def test_eval_on_a_data_file_of_the_wrong_shape_exits_2(mlp_run, tmp_path):
    np.savez(tmp_path / "flat.npz", x=np.zeros((3, 64), np.float32), y=np.zeros(3, np.int64))
    result = invoke("eval", mlp_run, "--data", tmp_path / "flat.npz")
    assert result.exit_code == 2
    assert result.stderr == (f"error: {tmp_path / 'flat.npz'}: its samples have shape [64], but the "
                             "model takes [1, 8, 8]\n")


def test_eval_on_the_validation_split_as_a_file_equals_plain_eval(mlp_run, tmp_path):
    x, y = _digits_val_split()
    np.savez(tmp_path / "val.npz", x=x, y=y)
    on_file = json.loads(invoke("eval", mlp_run, "--data", tmp_path / "val.npz", "--json").stdout)
    plain = json.loads(invoke("eval", mlp_run, "--json").stdout)
    assert on_file.pop("per_class") == plain.pop("per_class")
    assert on_file == pytest.approx(plain, abs=1e-6)


def test_predict_into_a_pipe_closed_early_stops_quietly(mlp_run, tmp_path):
    """`nncli predict ... | head -1`: the reader leaves; no error message, no traceback."""
    np.save(tmp_path / "many.npy", np.zeros((20_000, 1, 8, 8), np.float32))
    process = subprocess.Popen(nncli_argv("predict", mlp_run, "--input", tmp_path / "many.npy"), env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().startswith("0: [")
    process.stdout.close()  # as `head -1` does
    assert process.wait(timeout=120) == 1
    assert process.stderr.read() == ""


def test_training_into_a_pipe_closed_early_goes_on(tmp_path):
    """`nncli train ... | head -1`: the reader leaves after the first line; the run still trains
    to the end and saves, silently."""
    config = write_config(tmp_path, TINY_REGRESSION.replace("epochs: 3", "epochs: 40"), "piped.yaml")
    process = subprocess.Popen(nncli_argv("train", config, "--out", tmp_path / "runs"), env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    assert process.stdout.readline().startswith("run directory: ")
    process.stdout.close()
    assert process.wait(timeout=120) == 0
    assert process.stderr.read() == ""
    assert load(tmp_path / "runs" / "piped" / "last.pt")["epoch"] == 40


def test_predict_npy_json_one_row_per_input_with_class(mlp_run, tmp_path):
    arrays = np.load(REPO / "nncli" / "datasets" / "digits.npz")
    x = arrays["images"][:7]
    np.save(tmp_path / "inputs.npy", x)
    result = invoke("predict", mlp_run, "--input", tmp_path / "inputs.npy", "--json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert len(rows) == 7
    with torch.no_grad():
        expected = _digits_model(load(mlp_run / "best.pt")["model"])(torch.from_numpy(x))
    for row, out in zip(rows, expected):
        assert len(row["output"]) == 10
        assert row["output"] == out.tolist()  # every digit of the float32 outputs
        assert row["class"] == int(out.argmax()) == int(np.argmax(row["output"]))

    plain = invoke("predict", mlp_run, "--input", tmp_path / "inputs.npy")
    lines = plain.stdout.splitlines()
    assert len(lines) == 7
    assert all(re.fullmatch(rf"{i}: \[.*\]  class={rows[i]['class']}", line) for i, line in enumerate(lines))


@pytest.mark.parametrize("given, message", [
    ("[[1, 2]]", "2 numbers given, not a whole number of samples of shape [1, 8, 8] (64 numbers each)"),
    ("[[1, 2", "not a JSON list of numbers"),
    (str([[0.5] * 32] * 4), "each input has 32 numbers (shape [32]), but the model takes samples of shape "
                            "[1, 8, 8] (64 numbers each)"),
    ("[]", "0 numbers given"),
    ("missing.npy", "error: missing.npy: --input: no such file"),
    ("missing", "neither a JSON list of samples nor a file"),
    ("inputs.txt", "--input takes a .json, .csv, .npy or .npz file"),
    ("broken.npy", "cannot read the inputs"),
    (str([[float("nan")] + [0.5] * 63]).replace("nan", "NaN"), "the inputs hold NaN or infinite values"),
])
def test_predict_bad_input_exits_2(mlp_run, tmp_path, monkeypatch, given, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "inputs.txt").write_text("1 2 3\n")
    (tmp_path / "broken.npy").write_bytes(b"not numpy")
    result = invoke("predict", mlp_run, "--input", given)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr


def test_eval_and_predict_of_a_missing_run_exit_2(tmp_path):
    for args in (("eval", tmp_path / "nope"), ("predict", tmp_path / "nope", "--input", "[[1]]")):
        result = invoke(*args)
        assert result.exit_code == 2, args
        assert str(tmp_path / "nope") in result.stderr


def test_eval_on_a_missing_data_file_or_a_folder_exits_2(mlp_run, tmp_path):
    (tmp_path / "folder.csv").mkdir()
    result = invoke("eval", mlp_run, "--data", tmp_path / "nope.csv")
    assert result.exit_code == 2
    assert result.stderr == f"error: {tmp_path / 'nope.csv'}: file not found; check the path\n"
    # a folder is read as a folder of class folders of images (the model takes 1 x 8 x 8)
    result = invoke("eval", mlp_run, "--data", tmp_path / "folder.csv")
    assert result.exit_code == 2
    folder = tmp_path / "folder.csv"
    assert result.stderr.startswith(f"error: {folder}: {folder} has no class folders")


# --- normalization ------------------------------------------------------------------------

def test_normalize_statistics_are_stored_and_used_by_predict(tmp_path):
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(1000, 50, 40), rng.normal(0.01, 0.002, 40)], 1).astype(np.float32)
    y = (x[:, 0] / 100 + 300 * x[:, 1]).astype(np.float32)
    lines = ["size,rate,target"] + [f"{a},{b},{t}" for (a, b), t in zip(x, y)]
    (tmp_path / "train_scaled.csv").write_text("\n".join(lines) + "\n")
    config = write_config(tmp_path, """
        data: {source: csv, path: train_scaled.csv, target: target, normalize: true, val_split: 0}
        loss: MSELoss
        optimizer: {type: SGD, lr: 0.05}
        train: {epochs: 5, batch_size: 8}
        model:
          layers:
            - {type: Linear, out_features: 1}
        """, "norm.yaml")
    result = invoke("train", config, "--out", tmp_path / "runs", "--quiet")
    assert result.exit_code == 0, result.stderr
    run = tmp_path / "runs" / "norm"
    ckpt = load(run / "best.pt")
    stats = ckpt["normalization"]
    x_read = np.array([[float(v) for v in line.split(",")[:2]] for line in lines[1:]], dtype=np.float32)
    np.testing.assert_allclose(stats["mean"].numpy(), x_read.mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats["std"].numpy(), x_read.std(0, ddof=1), rtol=1e-4)
    # normalized inputs are what the model learnt from: a linear model fits in 5 epochs
    assert read_metrics(run)[1][-1]["train_loss"] < read_metrics(run)[1][0]["train_loss"]

    np.save(tmp_path / "train_x.npy", x_read)
    out = invoke("predict", run, "--input", tmp_path / "train_x.npy", "--json")
    assert out.exit_code == 0, out.stderr
    predicted = np.array([row["output"][0] for row in json.loads(out.stdout)])
    w, b = ckpt["model"]["0.weight"].numpy(), ckpt["model"]["0.bias"].numpy()
    expected = ((x_read - stats["mean"].numpy()) / stats["std"].numpy()) @ w.T + b
    np.testing.assert_allclose(predicted, expected[:, 0], atol=1e-4)

    # the training CSV itself: its feature columns are taken by name, the target left out
    from_csv = invoke("predict", run, "--input", tmp_path / "train_scaled.csv", "--json")
    assert from_csv.exit_code == 0, from_csv.stderr
    assert json.loads(from_csv.stdout) == json.loads(out.stdout)


# --- run directories, --set, --epochs, --out -----------------------------------------------

def test_a_second_train_gets_a_new_run_directory(tmp_path):
    config = tiny(tmp_path)
    out = tmp_path / "runs"
    assert invoke("train", config, "--out", out, "--quiet", "--epochs", 1).exit_code == 0
    first = out / "tiny"
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in first.iterdir()}
    assert set(before) == {"config.yaml", "metrics.csv", "last.pt", "best.pt", ".lock"}

    second = invoke("train", config, "--out", out, "--quiet", "--epochs", 2)
    assert second.exit_code == 0
    assert f"saved: {out / 'tiny-2'}" in second.stdout
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in first.iterdir()} == before
    assert len(read_metrics(out / "tiny-2")[1]) == 2
    assert invoke("train", config, "--out", out, "--quiet", "--epochs", 1).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["tiny", "tiny-2", "tiny-3"]


def test_set_epochs_and_out_reach_the_resolved_config(tmp_path):
    config = tiny(tmp_path)
    result = invoke("train", config, "--set", "train.batch_size=32", "--set", "optimizer.lr=0.05",
                    "--set", "name=renamed", "--epochs", 4, "--out", tmp_path / "elsewhere", "--quiet")
    assert result.exit_code == 0, result.stderr
    run = tmp_path / "elsewhere" / "renamed"
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["batch_size"] == 32
    assert resolved["train"]["epochs"] == 4
    assert resolved["optimizer"] == {"type": "SGD", "lr": 0.05}
    _, rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert all(r["lr_0"] == 0.05 for r in rows)


def test_checkpoint_dir_is_used_without_out(tmp_path):
    config = tiny(tmp_path)
    target = tmp_path / "ckpts"
    result = invoke("train", config, "--set", f"checkpoint.dir={target}", "--epochs", 1, "--quiet")
    assert result.exit_code == 0, result.stderr
    assert (target / "tiny" / "last.pt").is_file()


@pytest.mark.parametrize("override, messages", [
    ("train.batchsize=32", ["unknown key 'train.batchsize'", "Did you mean 'batch_size'?"]),
    ("trian.epochs=3", ["unknown key 'trian'", "Did you mean 'train'?"]),
    ("train.batch_size", ["'train.batch_size' is not KEY=VALUE"]),
    ("=3", ["must be a dotted path"]),
    ("train.batch_size=-1", ["train.batch_size", "must be greater than 0"]),
])
def test_set_errors_exit_2(tmp_path, override, messages):
    out = tmp_path / "runs"
    result = invoke("train", tiny(tmp_path), "--set", override, "--out", out, "--quiet")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ")
    for message in messages:
        assert message in result.stderr
    assert not out.exists(), "a bad --set must not create a run directory"


def test_epochs_below_one_is_a_usage_error(tmp_path):
    result = invoke("train", tiny(tmp_path), "--epochs", 0, "--out", tmp_path / "runs")
    assert result.exit_code == 2
    assert "--epochs" in result.stderr


# --- output without a terminal, quiet -------------------------------------------------------

def test_without_a_terminal_one_plain_line_per_epoch(tmp_path):
    config = tiny(tmp_path, "schedule: {type: StepLR, step_size: 1, gamma: 0.5}\n")
    proc = run_nncli("train", config, "--epochs", 2, "--out", tmp_path / "runs")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    for char in BAR_CHARS:
        assert char not in proc.stdout, f"progress output {char!r} without a terminal"
    for line in proc.stdout.splitlines():  # heavy rules only as the borders of tables
        assert "━" not in line or line.lstrip()[0] in "┏┡└", line
    epoch_lines = [line for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 2
    number = r"\d+\.\d{4}"
    for i, line in enumerate(epoch_lines, start=1):
        lr = ["0.1", "0.05"][i - 1]
        assert re.fullmatch(rf"epoch {i}/2 train_loss={number} val_loss={number} val_mae={number} "
                            rf"lr_0={lr} time_s=\d+\.\d\d( \*)?", line), line
    _, rows = read_metrics(tmp_path / "runs" / "tiny")
    for line, row in zip(epoch_lines, rows):  # the line shows what metrics.csv holds
        assert f"train_loss={row['train_loss']:.4f}" in line and f"val_loss={row['val_loss']:.4f}" in line
    assert proc.stdout.index("Optimizer groups") < proc.stdout.index("epoch 1/2")
    assert f"saved: {tmp_path / 'runs' / 'tiny'}" in proc.stdout


def test_quiet_prints_no_epoch_lines(tmp_path):
    result = invoke("train", tiny(tmp_path), "--epochs", 2, "--out", tmp_path / "runs", "-q")
    assert result.exit_code == 0
    assert "epoch 1/2" not in result.stdout and "Optimizer groups" not in result.stdout
    assert result.stdout.splitlines()[-1] == f"saved: {tmp_path / 'runs' / 'tiny'}"


def test_log_every_prints_every_nth_epoch_and_the_last(tmp_path):
    config = write_config(tmp_path, TINY_REGRESSION.replace("epochs: 3,", "epochs: 5, log_every: 2,"),
                          "tiny.yaml")
    result = invoke("train", config, "--out", tmp_path / "runs")
    assert result.exit_code == 0, result.stderr
    shown = re.findall(r"^epoch (\d)/5 ", result.stdout, re.M)
    assert shown == ["2", "4", "5"]


# --- early stop and NaN stop ----------------------------------------------------------------

def test_early_stop_stops_before_the_epoch_limit_and_says_so(tmp_path):
    # min_delta far above any change: only epoch 1 counts as an improvement
    config = write_config(tmp_path, TINY_REGRESSION.replace(
        "train: {epochs: 3, batch_size: 16}",
        "train: {epochs: 20, batch_size: 16, early_stop: {metric: val_loss, patience: 2, min_delta: 1000}}"),
        "tiny.yaml")
    result = invoke("train", config, "--out", tmp_path / "runs", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert "early stop after epoch 3: no improvement in val_loss for 2 epochs" in result.stdout
    run = tmp_path / "runs" / "tiny"
    _, rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert load(run / "last.pt")["epoch"] == 3
    assert load(run / "best.pt")["epoch"] == 1
    assert f"best epoch 1: val_loss={rows[0]['val_loss']:.4f}" in result.stdout


def test_early_stop_on_a_metric_that_is_not_recorded_exits_2(tmp_path):
    config = write_config(tmp_path, TINY_REGRESSION.replace(
        "train: {epochs: 3, batch_size: 16}",
        "train:\n  epochs: 3\n  early_stop:\n    metric: val_accuracy\n"), "tiny.yaml")
    result = invoke("train", config, "--out", tmp_path / "runs")
    assert result.exit_code == 2
    assert f"{config}:9: train.early_stop.metric: metric 'val_accuracy' is not recorded" in result.stderr
    assert "val_mae" in result.stderr


def test_a_huge_value_in_the_data_stops_with_exit_1_naming_epoch_and_batch(tmp_path):
    rows = ["a,b,y"] + [f"{i},{i % 3},{2 * i}" for i in range(10)]
    rows[6] = "1e30,1,3"  # the 6th sample: batch 3 of batch_size 2, unshuffled
    (tmp_path / "train_huge.csv").write_text("\n".join(rows) + "\n")
    config = write_config(tmp_path, """
        data: {source: csv, path: train_huge.csv, target: y, val_split: 0}
        loss: MSELoss
        optimizer: {type: SGD, lr: 0.01}
        train: {epochs: 3, batch_size: 2, shuffle: false}
        model:
          layers:
            - {type: Linear, out_features: 1}
        """, "huge.yaml")
    proc = run_nncli("train", config, "--out", tmp_path / "runs", "--quiet")
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: the loss became inf at epoch 1, batch 3;")
    assert "Traceback" not in proc.stderr
    run = tmp_path / "runs" / "huge"
    assert not (run / "last.pt").exists() and not (run / "best.pt").exists()


def test_nan_stop_leaves_the_earlier_epochs_checkpoint_unchanged(tmp_path, monkeypatch):
    """lr 0.01 in epoch 1, then 1e8 (StepLR gamma 1e10): the loss overflows after epoch 1."""
    import nncli.run.save as train_module

    config = tiny(tmp_path, "schedule: {type: StepLR, step_size: 1, gamma: 1.0e+10}\n")
    config.write_text(config.read_text().replace("lr: 0.1", "lr: 0.01").replace("epochs: 3", "epochs: 6"))
    writes: list[tuple[str, bytes, int]] = []
    write_atomic = train_module.write_atomic

    def recording_write(data, path):
        write_atomic(data, path)
        writes.append((Path(path).name, Path(path).read_bytes(), Path(path).stat().st_mtime_ns))

    monkeypatch.setattr(train_module, "write_atomic", recording_write)
    result = invoke("train", config, "--out", tmp_path / "runs", "--quiet")
    assert result.exit_code == 1
    match = re.match(r"error: the loss became (inf|nan) at epoch (\d+), batch ([1-3]); training stopped",
                     result.stderr)
    assert match, result.stderr
    assert "Lower the learning rate" in result.stderr
    failed = int(match.group(2))
    assert 2 <= failed <= 3

    run = tmp_path / "runs" / "tiny"
    last_writes = [w for w in writes if w[0] == "last.pt"]
    assert len(last_writes) == failed - 1, "last.pt is written once per finished epoch, never after"
    assert (run / "last.pt").read_bytes() == last_writes[-1][1]
    assert (run / "last.pt").stat().st_mtime_ns == last_writes[-1][2]
    ckpt = load(run / "last.pt")
    assert ckpt["epoch"] == failed - 1
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    _, rows = read_metrics(run)
    assert len(rows) == failed - 1 and rows[0]["lr_0"] == pytest.approx(0.01)
    assert "loss became" not in result.stdout


# --- metrics -------------------------------------------------------------------------------

def test_metrics_against_numpy():
    from nncli.optim.metrics import create_metric, higher_is_better

    cpu = torch.device("cpu")
    logits = torch.tensor([[0.1, 0.7, 0.2], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.3, 0.4, 0.3]])
    labels = torch.tensor([1, 2, 2, 0])
    values = {}
    for name in ("accuracy", "top2", "top3"):
        metric = create_metric(name, cpu)
        metric.update(logits[:2], labels[:2])  # accumulated over two batches
        metric.update(logits[2:], labels[2:])
        values[name] = metric.compute()
    assert values == {"accuracy": 0.5, "top2": 0.75, "top3": 1.0}

    out = torch.tensor([[1.0], [2.0], [4.0], [3.0]])
    target = torch.tensor([1.5, 2.0, 3.0, 5.0])  # (N,) targets against (N, 1) outputs
    err = out[:, 0].numpy() - target.numpy()
    expected = {"mae": np.abs(err).mean(), "rmse": np.sqrt((err ** 2).mean()),
                "r2": 1 - (err ** 2).sum() / ((target.numpy() - target.numpy().mean()) ** 2).sum()}
    for name, value in expected.items():
        metric = create_metric(name, cpu)
        metric.update(out[:3], target[:3])
        metric.update(out[3:], target[3:])
        assert metric.compute() == pytest.approx(float(value), rel=1e-6), name
    assert higher_is_better("val_accuracy") and higher_is_better("val_top5") and higher_is_better("val_r2")
    assert not higher_is_better("val_loss") and not higher_is_better("train_loss")
    assert not higher_is_better("val_mae") and not higher_is_better("val_rmse")


def test_unknown_metric_exits_2_with_suggestion(tmp_path):
    config = write_config(tmp_path, TINY_REGRESSION.replace("metrics: [mae]", "metrics:\n  - mae\n  - rsme"),
                          "tiny.yaml")
    result = invoke("train", config, "--out", tmp_path / "runs")
    assert result.exit_code == 2
    assert f"{config}:6: metrics.1: unknown metric 'rsme'" in result.stderr
    assert "Did you mean 'rmse'?" in result.stderr


def test_build_model_takes_the_input_shape_from_the_data():
    """The README's API example: a config whose input_shape comes from its data section."""
    import nncli

    config = nncli.load_config(CONFIGS / "digits_cnn.yaml", overrides=["train.epochs=3"])
    model = nncli.build_model(config)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_r2_of_several_outputs_is_their_plain_mean_as_scikit_learn_computes_it():
    """r2 as scikit-learn's r2_score (multioutput='uniform_average'): each output's R² from its
    own targets' spread, then the mean; an exactly predicted constant output scores 1, else 0."""
    from nncli.optim.metrics import create_metric

    g = torch.Generator().manual_seed(0)
    target = torch.randn(50, 2, generator=g) * torch.tensor([1.0, 10.0])
    output = target + torch.randn(50, 2, generator=g) * torch.tensor([0.3, 10.0])  # R² near 0.9 and 0
    t, o = target.double().numpy(), output.double().numpy()
    per_output = 1 - ((o - t) ** 2).sum(0) / ((t - t.mean(0)) ** 2).sum(0)
    metric = create_metric("r2", torch.device("cpu"), outputs=2)
    metric.update(output[:20], target[:20])
    metric.update(output[20:], target[20:])
    assert metric.compute() == pytest.approx(per_output.mean(), rel=1e-9)
    pooled = 1 - ((o - t) ** 2).sum() / ((t - t.mean()) ** 2).sum()
    assert abs(pooled - per_output.mean()) > 0.05  # what the outputs pooled would have said

    constant = torch.full((4, 1), 0.1)
    for predicted, expected in ((constant, 1.0), (constant + 0.5, 0.0)):
        metric = create_metric("r2", torch.device("cpu"))
        metric.update(predicted, constant[:, 0])
        assert metric.compute() == expected


def test_r2_of_a_two_target_csv_regression_through_eval_and_predict(tmp_path):
    """A 2-target CSV: metrics.csv and eval give the r2 computed here, by hand, from predict's
    outputs on the validation file (the mean of each target's R²)."""
    rng = np.random.default_rng(0)
    for name, n in (("train", 120), ("val", 40)):
        x = rng.normal(size=(n, 3))
        y = np.stack([x @ [1.0, -2.0, 0.5] + rng.normal(0, 1.0, n),         # R² near 0.8
                      100 * (x @ [0.3, 0.2, -0.1]) + rng.normal(0, 40.0, n)], 1)  # wide, poorly fit
        rows = ["a,b,c,t1,t2"] + [",".join(f"{v:.6f}" for v in row) for row in np.hstack([x, y])]
        (tmp_path / f"{name}.csv").write_text("\n".join(rows) + "\n")
    config = write_config(tmp_path, """
        seed: 0
        data:
          train: {source: csv, path: train.csv, target: [t1, t2]}
          val: {source: csv, path: val.csv, target: [t1, t2]}
        loss: MSELoss
        metrics: [r2]
        optimizer: {type: Adam, lr: 0.05}
        train: {epochs: 30, batch_size: 16}
        model:
          layers: [{type: Linear, out_features: 2}]
    """)
    ok(invoke("train", config, "--out", tmp_path / "runs", "--quiet"))
    run = tmp_path / "runs" / "config"
    evaluated = json.loads(ok(invoke("eval", run, "--json", "--trust-data", tmp_path)).stdout)
    predicted = np.array([row["output"]
                          for row in json.loads(ok(invoke("predict", run, "--input", tmp_path / "val.csv",
                                                          "--json")).stdout)])
    val = np.loadtxt(tmp_path / "val.csv", delimiter=",", skiprows=1)[:, 3:]
    per_target = 1 - ((predicted - val) ** 2).sum(0) / ((val - val.mean(0)) ** 2).sum(0)
    assert evaluated["r2"] == pytest.approx(per_target.mean(), abs=1e-5)
    pooled = 1 - ((predicted - val) ** 2).sum() / ((val - val.mean()) ** 2).sum()
    assert abs(pooled - per_target.mean()) > 0.1, (pooled, per_target)
    _, rows = read_metrics(run)
    best = min(rows, key=lambda row: row["val_loss"])
    assert best["val_r2"] == pytest.approx(evaluated["r2"], abs=1e-6)


# --- silent traps -------------------------------------------------------------------------------

TRANSFORMER = """
seed: 0
data: {source: synthetic, kind: images, n: 32, shape: [5, 8], classes: 3, val_split: 0}
model:
  layers:
    - {type: TransformerEncoderLayer, nhead: 2, dim_feedforward: 16, dropout: 0.0}
    - Flatten
    - {type: Linear, out_features: 3}
train: {epochs: 1, batch_size: 8}
"""


def test_a_transformer_sample_does_not_depend_on_the_other_samples_of_its_batch(tmp_path):
    """Attention over each sample's own sequence (batch_first: true by default, nncli's data being
    batch-first), not across the samples of a batch: the same as the layer built by hand."""
    config = write_config(tmp_path, TRANSFORMER, "attention.yaml")
    ok(invoke("train", config, "--out", tmp_path / "runs", "--quiet"))
    run = tmp_path / "runs" / "attention"
    x = np.random.default_rng(0).normal(size=(4, 5, 8)).astype(np.float32)
    np.save(tmp_path / "batch.npy", x)
    np.save(tmp_path / "alone.npy", x[:1])
    batch = [row["output"] for row in json.loads(ok(invoke("predict", run, "--input", tmp_path / "batch.npy",
                                                           "--json")).stdout)]
    alone = json.loads(ok(invoke("predict", run, "--input", tmp_path / "alone.npy",
                                 "--json")).stdout)[0]["output"]
    assert alone == pytest.approx(batch[0], abs=1e-5)

    by_hand = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), nn.Flatten(),
                            nn.Linear(40, 3))
    by_hand.load_state_dict(load(run / "best.pt")["model"])
    with torch.no_grad():
        expected = by_hand.eval()(torch.from_numpy(x))
    assert np.allclose(batch, expected.numpy(), atol=1e-5)


def test_softmax_before_cross_entropy_warns_once_saying_why_and_what_to_do(tmp_path):
    last = "    - {type: Linear, out_features: 10}"
    text = (CONFIGS / "digits_mlp.yaml").read_text().replace(last, last + "\n    - {type: Softmax, dim: 1}")
    config = write_config(tmp_path, text, "softmax.yaml")
    line = text.splitlines().index("    - {type: Softmax, dim: 1}") + 1
    result = run_nncli("train", config, "--epochs", 2, "--out", tmp_path / "runs", "-q")
    assert result.returncode == 0, result.stderr
    assert result.stderr == (
        f"warning: {config}:{line}: 4 (Softmax): the model ends with Softmax, and CrossEntropyLoss applies "
        "log-softmax to the model's output itself, so it takes these probabilities for scores: the gradients "
        "shrink and the model trains worse. Drop the Softmax: the model then outputs scores (logits), with "
        "the same predicted class; or end with LogSoftmax and use loss: NLLLoss.\n")
    checked = invoke("validate", config)
    assert (checked.exit_code == 0 and checked.stderr.count("warning: ") == 1
            and "ends with Softmax" in checked.stderr)

    log_softmax = write_config(tmp_path, text.replace("Softmax, dim", "LogSoftmax, dim"), "log_softmax.yaml")
    checked = invoke("validate", log_softmax)
    assert checked.exit_code == 0 and "Use loss: NLLLoss" in checked.stderr
    assert invoke("validate", log_softmax, "--set", "loss=NLLLoss").stderr == ""  # the pair that fits


# --- torch._dynamo, which nothing compiled needs -------------------------------------------------

DYNAMO_FREE_CONFIGS = {
    "adamw_groups_onecycle": """
        seed: 3
        data: {source: synthetic, n: 256, features: 8, classes: 3, val_split: 0.25}
        optimizer:
          type: AdamW
          lr: 0.01
          groups: [{params: "*.bias", weight_decay: 0}]
        schedule: {type: OneCycleLR, interval: step}
        train: {epochs: 3, batch_size: 32, grad_clip: 1.0}
        model:
          layers:
            - {type: Linear, out_features: 16}
            - ReLU
            - {type: Dropout, p: 0.1}
            - {type: Linear, out_features: 3}
        """,
    "sgd_nesterov_steplr": """
        seed: 4
        data: {source: synthetic, kind: regression, n: 256, features: 8, val_split: 0.25}
        loss: MSELoss
        optimizer: {type: SGD, lr: 0.05, momentum: 0.9, nesterov: true}
        schedule: {type: StepLR, step_size: 1, gamma: 0.5}
        train: {epochs: 3, batch_size: 32}
        model: {layers: [{type: Linear, out_features: 16}, Tanh, {type: Linear, out_features: 1}]}
        """,
}
# `nncli train` in a fresh process; prints whether torch._dynamo was imported. With "torch's
# path", nncli's skip_dynamo is switched off: every optimizer wrapper does what torch does.
TRAIN_AND_SAY_DYNAMO = """
import sys
import nncli.run.setup
if sys.argv[1] == "torch's path":
    nncli.run.setup.skip_dynamo = lambda: 0
from nncli.cli import app
try:
    app(["train", *sys.argv[2:]])
except SystemExit as done:
    assert done.code == 0, done.code
print("dynamo imported:", "torch._dynamo" in sys.modules)
"""


@pytest.mark.parametrize("name", sorted(DYNAMO_FREE_CONFIGS))
def test_a_run_without_torch_dynamo_learns_bit_for_bit_what_torchs_path_learns(tmp_path, name):
    """torch.optim's wrappers import torch._dynamo (a second of start-up) for nothing when nothing
    is compiled; without them the weights, the optimizer's state and the metrics are identical."""
    config = write_config(tmp_path, DYNAMO_FREE_CONFIGS[name], f"{name}.yaml")
    for path, imported in (("skipped", "False"), ("torch's path", "True")):
        done = run_python("-c", TRAIN_AND_SAY_DYNAMO, path, config, "--out", tmp_path / path, "-q",
                          cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().endswith(f"dynamo imported: {imported}"), done.stdout
    fast, torchs = (load(tmp_path / path / name / "last.pt") for path in ("skipped", "torch's path"))
    for part in ("model", "optimizer"):
        assert _same(fast[part], torchs[part]), part
    assert metrics_rows(tmp_path / "skipped" / name) == metrics_rows(tmp_path / "torch's path" / name)


def _same(a: object, b: object) -> bool:
    """Equal, tensors bit for bit, through dicts and lists."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


COMPILE_AFTER_A_PLAIN_RUN = """
import sys
from nncli.cli import app
for extra in ([], ["--set", "compile=true"]):
    try:
        app(["train", sys.argv[1], "--out", sys.argv[2], "-q", *extra])
    except SystemExit as done:
        assert done.code == 0, done.code
print("compiled run ok")
"""


@pytest.mark.slow
def test_compile_still_works_in_a_process_that_skipped_dynamo(tmp_path):
    """A plain run (torch.optim's dynamo wrappers skipped), then a `compile: true` run in the same
    process: torch.compile wraps the model as before, and the run trains."""
    config = write_config(tmp_path, TINY_REGRESSION.replace("epochs: 3", "epochs: 2"), "tiny.yaml")
    done = run_python("-c", COMPILE_AFTER_A_PLAIN_RUN, config, tmp_path / "runs", cwd=tmp_path, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("compiled run ok"), done.stdout + done.stderr
    compiled = load(tmp_path / "runs" / "tiny-2" / "last.pt")
    assert compiled["config"]["compile"] is True and compiled["epoch"] == 2
    assert all(math.isfinite(row["train_loss"]) for row in read_metrics(tmp_path / "runs" / "tiny-2")[1])
