"""The `images` source (folders of class folders, decoded with Pillow), class names from folder
names and from a CSV's word labels, and `normalize: channel`: through the CLI, as a user runs
them, against what the test computes itself from the PNG files and with numpy."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import CONFIGS, invoke, load, ok, read_metrics, write_config, write_digits

Image = pytest.importorskip("PIL.Image")

WORDS = sorted(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])


def small_folder(root: Path, per_class: int = 6, size: tuple[int, int] = (5, 4)) -> Path:
    """root/<a|b|c>/<i>.png: RGB images of `size` (height, width), each class its own colour."""
    g = np.random.default_rng(0)
    for k, name in enumerate("abc"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = g.integers(0, 256, (*size, 3), dtype=np.uint8)
            pixels[..., k] = 255
            Image.fromarray(pixels, mode="RGB").save(root / name / f"{i}.png")
    return root


SMALL = """
seed: 0
data: {{source: images, root: pics, mode: RGB, val_split: 0{extra}}}
loss: CrossEntropyLoss
train: {{epochs: 1, batch_size: 8}}
model:
  layers: [Flatten, {{type: Linear, out_features: 3}}]
"""


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict:
    """configs/images_folder.yaml trained on the digits written as PNGs, 8 epochs."""
    tmp = tmp_path_factory.mktemp("digits")
    folder = write_digits(tmp / "digits_png")
    result = invoke("train", CONFIGS / "images_folder.yaml", "--set", f"data.root={folder}", "--epochs", 8,
                    "--out", tmp / "runs", "--quiet")
    assert result.exit_code == 0, result.stderr
    return {"folder": folder, "run": tmp / "runs" / "images_folder", "tmp": tmp}


def test_digits_as_png_folder_learns_and_records_the_class_names(digits):
    run = digits["run"]
    header, rows = read_metrics(run)
    assert max(row["val_accuracy"] for row in rows) >= 0.95
    ckpt = load(run / "best.pt")
    assert ckpt["classes"] == WORDS  # the folder names, sorted: eight is class 0
    assert ckpt["input_shape"] == [1, 8, 8]
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["data"]["class_names"] == WORDS
    assert resolved["data"]["mode"] == "L" and resolved["data"]["normalize"] == "channel"


def test_predict_prints_class_names_of_image_files_and_folders(digits):
    folder = digits["folder"]
    three = sorted((folder / "three").iterdir())[0]
    result = ok(invoke("predict", digits["run"], "--input", three))
    assert result.stdout.startswith(f"0: {three}:") and result.stdout.rstrip().endswith("class=three")
    rows = json.loads(ok(invoke("predict", digits["run"], "--input", folder / "seven", "--json")).stdout)
    assert len(rows) == len(list((folder / "seven").iterdir()))
    assert {row["file"] for row in rows} == {str(p) for p in (folder / "seven").iterdir()}
    assert sum(row["class"] == "seven" for row in rows) >= 0.9 * len(rows)
    assert all(WORDS[row["class_index"]] == row["class"] for row in rows)
    assert all(len(row["output"]) == 10 for row in rows)


def test_predict_of_a_missing_or_broken_image_exits_2(digits, tmp_path):
    missing = invoke("predict", digits["run"], "--input", tmp_path / "nothing.png")
    assert missing.exit_code == 2 and "nothing.png: --input: no such file" in missing.stderr
    (tmp_path / "broken.png").write_bytes(b"GIF89a?")
    broken = invoke("predict", digits["run"], "--input", tmp_path / "broken.png")
    assert broken.exit_code == 2 and "broken.png cannot be decoded as an image" in broken.stderr


def test_predict_of_an_image_matches_the_model_on_pixels_read_by_hand(digits):
    """The file read by hand (PIL, /255, the checkpoint's per-channel statistics) through the saved
    weights in the config's CNN written in plain PyTorch: the same outputs as predict."""
    from torch import nn

    ckpt = load(digits["run"] / "best.pt")
    image = sorted((digits["folder"] / "four").iterdir())[3]
    x = torch.from_numpy(np.asarray(Image.open(image).convert("L"), dtype=np.float32) / 255)[None, None]
    stats = ckpt["normalization"]
    assert stats["mean"].shape == (1, 1, 1)
    x = (x - stats["mean"]) / stats["std"]
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2)))
    model.add_module("head", nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(64 * 4 * 4, 10)))
    model.load_state_dict(ckpt["model"])
    expected = model.eval()(x)[0]
    rows = json.loads(ok(invoke("predict", digits["run"], "--input", image, "--json")).stdout)
    np.testing.assert_allclose(rows[0]["output"], expected.detach().numpy(), atol=1e-5)


def test_eval_reports_per_class_accuracy_by_name(digits):
    run = digits["run"]
    # the checkpoint's folder is read only when the user names it (README "Trust")
    refused = invoke("eval", run)
    assert refused.exit_code == 2 and "--trust-data" in refused.stderr
    text = ok(invoke("eval", run, "--trust-data", digits["folder"]))
    assert "per class:" in text.stdout
    for word in WORDS:
        assert f"  {word} " in text.stdout
    results = json.loads(ok(invoke("eval", run, "--trust-data", digits["folder"], "--json")).stdout)
    assert [row["class"] for row in results["per_class"]] == WORDS
    # the per-class tallies add up to the overall accuracy
    samples = sum(row["samples"] for row in results["per_class"])
    hits = sum(row["samples"] * row["accuracy"] for row in results["per_class"])
    assert samples == 359 and hits / samples == pytest.approx(results["accuracy"])
    # validation of best.pt's epoch gave the same numbers
    best = load(run / "best.pt")["epoch"]
    assert results["accuracy"] == pytest.approx(read_metrics(run)[1][best - 1]["val_accuracy"])


def test_eval_takes_an_image_folder_as_data(digits, tmp_path):
    subset = tmp_path / "subset"
    for word in ("one", "zero"):  # two of the classes: still indexed by the run's names
        shutil.copytree(digits["folder"] / word, subset / word)
    results = json.loads(ok(invoke("eval", digits["run"], "--data", subset, "--json")).stdout)
    counts = {row["class"]: row["samples"] for row in results["per_class"]}
    assert counts["one"] == len(list((subset / "one").iterdir())) and counts["zero"] > 0
    assert counts["eight"] == 0 and results["accuracy"] >= 0.9
    unknown = tmp_path / "unknown"
    shutil.copytree(digits["folder"] / "one", unknown / "eleven")
    result = invoke("eval", digits["run"], "--data", unknown)
    assert result.exit_code == 2 and "'eleven'" in result.stderr


def test_images_are_uint8_until_a_batch_is_prepared(tmp_path):
    from nncli.run.setup import load_config, load_data

    small_folder(tmp_path / "pics")
    config = load_config(write_config(tmp_path, SMALL.format(extra=""), "small.yaml"))
    data = load_data(config)
    assert data.train.x.dtype == torch.uint8 and data.train.x.shape == (18, 3, 5, 4)
    assert data.classes == ["a", "b", "c"] and data.train.y.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    by_hand = np.array(Image.open(tmp_path / "pics" / "b" / "2.png")).transpose(2, 0, 1)
    assert torch.equal(data.train.x[8], torch.from_numpy(by_hand))
    assert torch.equal(data.train.prepare(data.train.x[8:9])[0], torch.from_numpy(by_hand / 255).float())


def test_size_resizes_and_mode_l_gives_one_channel(tmp_path):
    from nncli.run.setup import load_config, load_data

    small_folder(tmp_path / "pics")
    text = SMALL.format(extra=", size: [3, 6]").replace("mode: RGB", "mode: L")
    data = load_data(load_config(write_config(tmp_path, text, "small.yaml")))
    assert data.train.x.shape == (18, 1, 3, 6)
    by_hand = np.array(Image.open(tmp_path / "pics" / "c" / "0.png").convert("L")
                         .resize((6, 3), Image.Resampling.BILINEAR))
    assert torch.equal(data.train.x[12, 0], torch.from_numpy(by_hand))


def test_normalize_channel_uses_the_training_images_statistics(tmp_path):
    """Per channel over N, H and W of the training split only, as computed here with numpy."""
    from nncli.run.setup import load_config, load_data

    small_folder(tmp_path / "pics", per_class=25)
    text = SMALL.format(extra=", normalize: channel").replace("val_split: 0", "val_split: 0.2")
    data = load_data(load_config(write_config(tmp_path, text, "small.yaml")))
    pixels = data.train.x.numpy().astype(np.float64) / 255
    mean, std = pixels.mean((0, 2, 3)), pixels.std((0, 2, 3), ddof=1)
    assert data.normalization["mean"].shape == (3, 1, 1)
    np.testing.assert_allclose(data.normalization["mean"].flatten(), mean, rtol=1e-6)
    np.testing.assert_allclose(data.normalization["std"].flatten(), std, rtol=1e-6)
    val = data.val.prepare(data.val.x)  # validation uses the training statistics
    expected = (data.val.x.numpy() / 255 - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(val.numpy(), expected, atol=1e-5)
    assert len(data.val) == 15


def test_normalize_channel_on_tabular_data_exits_2(tmp_path, cli):
    config = write_config(tmp_path, """
        data: {source: synthetic, n: 40, features: 4, normalize: channel}
        model: {layers: [{type: Linear, out_features: 2}]}
        """, "tab.yaml")
    result = cli("validate", config)
    assert result.exit_code == 2 and "data.normalize" in result.stderr and "normalize: true" in result.stderr


def test_a_broken_image_exits_2_naming_the_file_without_a_run_directory(tmp_path):
    small_folder(tmp_path / "pics")
    (tmp_path / "pics" / "b" / "3.png").write_bytes(b"not a png at all")
    config = write_config(tmp_path, SMALL.format(extra=""), "small.yaml")
    result = invoke("train", config, "--out", tmp_path / "runs")
    assert result.exit_code == 2
    assert "3.png cannot be decoded as an image" in result.stderr and ":2: data.root" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_images_of_other_sizes_without_size_exit_2_with_the_fix(tmp_path, cli):
    small_folder(tmp_path / "pics")
    Image.new("RGB", (9, 9)).save(tmp_path / "pics" / "a" / "big.png")
    result = cli("validate", write_config(tmp_path, SMALL.format(extra=""), "small.yaml"))
    assert result.exit_code == 2 and "big.png is 9x9" in result.stderr
    assert "size: [height, width]" in result.stderr


def test_a_folder_without_class_folders_exits_2(tmp_path, cli):
    (tmp_path / "pics").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "pics" / "loose.png")
    result = cli("validate", write_config(tmp_path, SMALL.format(extra=""), "small.yaml"))
    assert result.exit_code == 2 and "no class folders" in result.stderr


def test_missing_pillow_exits_2_naming_the_extra(tmp_path, cli, monkeypatch):
    small_folder(tmp_path / "pics")
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL now raises ImportError
    result = cli("validate", write_config(tmp_path, SMALL.format(extra=""), "small.yaml"))
    assert result.exit_code == 2 and "pip install 'nncli[images]'" in result.stderr


def test_cache_is_written_beside_the_folder_reused_and_renewed(tmp_path):
    from nncli.run.setup import load_config, load_data

    small_folder(tmp_path / "pics")
    text = SMALL.format(extra=", cache: true, loader: dataloader")
    config = write_config(tmp_path, text, "small.yaml")
    first = load_data(load_config(config))
    caches = sorted(tmp_path.glob("pics.nncli-cache-*.npy"))
    assert len(caches) == 1 and first.train.mapped_file == caches[0]
    written = caches[0].stat().st_mtime_ns
    second = load_data(load_config(config))
    assert second.train.mapped_file == caches[0] and caches[0].stat().st_mtime_ns == written  # reused
    assert torch.equal(second.train.x, first.train.x)
    Image.new("RGB", (4, 5), (1, 2, 3)).save(tmp_path / "pics" / "a" / "0.png")  # the folder changed
    third = load_data(load_config(config))
    renewed = sorted(tmp_path.glob("pics.nncli-cache-*.npy"))
    assert len(renewed) == 1 and renewed != caches  # the stale cache is removed
    assert third.train.x[0, :, 0, 0].tolist() == [1, 2, 3]
    ok(invoke("train", config, "--out", tmp_path / "runs", "--quiet"))


# --- class names from a CSV's word labels --------------------------------------------------------

def iris_like(path: Path, n: int = 90) -> Path:
    g = np.random.default_rng(1)
    species = ["versicolor", "setosa", "virginica"]
    lines = ["a,b,species"]
    for i in range(n):
        k = i % 3
        a, b = g.normal(k * 3, 0.3), g.normal(-k, 0.3)
        lines.append(f"{a:.4f},{b:.4f},{species[k]}")
    path.write_text("\n".join(lines) + "\n")
    return path


IRIS = """
seed: 0
data: {source: csv, path: iris.csv, target: species, val_split: 0.2, normalize: true}
loss: CrossEntropyLoss
optimizer: {type: Adam, lr: 0.05}
train: {epochs: 15, batch_size: 16}
model:
  layers: [{type: Linear, out_features: 3}]
"""


def test_csv_word_labels_train_and_predict_prints_the_names(tmp_path):
    iris_like(tmp_path / "iris.csv")
    config = write_config(tmp_path, IRIS, "iris.yaml")
    ok(invoke("train", config, "--out", tmp_path / "runs", "--quiet"))
    run = tmp_path / "runs" / "iris"
    assert load(run / "last.pt")["classes"] == ["setosa", "versicolor", "virginica"]
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["class_names"] == [
        "setosa", "versicolor", "virginica"]
    assert read_metrics(run)[1][-1]["val_accuracy"] >= 0.95
    rows = json.loads(ok(invoke("predict", run, "--input", "[[0.0, 0.0], [6.0, -2.0]]", "--json")).stdout)
    assert [row["class"] for row in rows] == ["versicolor", "virginica"]
    assert [row["class_index"] for row in rows] == [1, 2]
    text = ok(invoke("predict", run, "--input", "[[3.0, -1.0]]")).stdout
    assert text.rstrip().endswith("class=setosa")
    results = json.loads(ok(invoke("eval", run, "--json", "--trust-data", tmp_path)).stdout)
    assert [row["class"] for row in results["per_class"]] == ["setosa", "versicolor", "virginica"]
    assert sum(row["samples"] for row in results["per_class"]) == 18


def test_integer_labels_stay_integers(tmp_path):
    config = write_config(tmp_path, """
        data: {source: synthetic, n: 60, features: 2, classes: 3, val_split: 0.25}
        train: {epochs: 1}
        model: {layers: [{type: Linear, out_features: 3}]}
        """, "ints.yaml")
    ok(invoke("train", config, "--out", tmp_path / "runs", "--quiet"))
    run = tmp_path / "runs" / "ints"
    assert load(run / "last.pt")["classes"] is None
    rows = json.loads(ok(invoke("predict", run, "--input", "[[0.1, 0.2]]", "--json")).stdout)
    assert isinstance(rows[0]["class"], int) and "class_index" not in rows[0]
    per_class = json.loads(ok(invoke("eval", run, "--json")).stdout)["per_class"]
    assert [row["class"] for row in per_class] == [0, 1, 2]
    small_folder(tmp_path / "pics")  # images for a model of 2 features
    refused = invoke("eval", run, "--data", tmp_path / "pics")
    assert refused.exit_code == 2 and "the model takes samples of shape [2], not images" in refused.stderr


def test_a_number_among_word_labels_exits_2_naming_the_cell(tmp_path, cli):
    path = iris_like(tmp_path / "iris.csv")
    lines = path.read_text().splitlines()
    lines[5] = lines[5].rsplit(",", 1)[0] + ",3"
    path.write_text("\n".join(lines) + "\n")
    result = cli("validate", write_config(tmp_path, IRIS, "iris.yaml"))
    assert result.exit_code == 2 and "row 6, column 'species': '3' is a number" in result.stderr


def test_word_labels_with_a_regression_loss_exit_2(tmp_path, cli):
    iris_like(tmp_path / "iris.csv")
    result = cli("validate", write_config(tmp_path, IRIS.replace("CrossEntropyLoss", "MSELoss"), "iris.yaml"))
    assert result.exit_code == 2 and "class names" in result.stderr and "CrossEntropyLoss" in result.stderr


# --- normalize_target ----------------------------------------------------------------------------

def test_normalize_target_on_targets_in_the_thousands_beats_a_linear_baseline(tmp_path):
    """Targets around 5,000 with a spread of 1,000: standardized for training, reported in their
    units. r2 at least a least-squares line's (numpy), on the same validation rows."""
    g = np.random.default_rng(0)
    x = g.normal(size=(400, 3)).astype(np.float32)
    y = (5000 + 800 * x[:, 0] - 400 * x[:, 1] * x[:, 2] + 300 * np.sin(3 * x[:, 2])
         + g.normal(0, 50, 400)).astype(np.float32)
    (tmp_path / "big.csv").write_text("a,b,c,target\n" + "".join(
        f"{a},{b},{c},{t}\n" for (a, b, c), t in zip(x.tolist(), y.tolist())))
    config = write_config(tmp_path, """
        seed: 0
        data: {source: csv, path: big.csv, target: target, val_split: 0.25, normalize_target: true}
        loss: MSELoss
        metrics: [mae, r2]
        optimizer: {type: Adam, lr: 0.01}
        train: {epochs: 40, batch_size: 32}
        model:
          layers: [{type: Linear, out_features: 64}, ReLU, {type: Linear, out_features: 1}]
        """, "big.yaml")
    ok(invoke("train", config, "--out", tmp_path / "runs", "--quiet"))
    run = tmp_path / "runs" / "big"
    ckpt = load(run / "best.pt")
    from nncli.run.setup import load_config, load_data

    # the same split, read without normalize_target: the targets as the file gives them
    plain = write_config(tmp_path, config.read_text().replace(", normalize_target: true", ""), "plain.yaml")
    data = load_data(load_config(plain))
    train_x, val_x = data.train.x.numpy(), data.val.x.numpy()
    train_y, val_y = data.train.y.numpy().reshape(-1), data.val.y.numpy().reshape(-1)
    assert ckpt["target_normalization"]["mean"].item() == pytest.approx(train_y.mean(), rel=1e-5)
    assert ckpt["target_normalization"]["std"].item() == pytest.approx(train_y.std(ddof=1), rel=1e-4)
    design = np.c_[train_x, np.ones(len(train_x))]
    w = np.linalg.lstsq(design, train_y, rcond=None)[0]
    line = np.c_[val_x, np.ones(len(val_x))] @ w
    baseline = 1 - ((val_y - line) ** 2).sum() / ((val_y - val_y.mean()) ** 2).sum()
    best = read_metrics(run)[1][ckpt["epoch"] - 1]
    assert best["val_r2"] >= baseline > 0.5
    # predict and eval answer in the targets' units
    np.save(tmp_path / "val_x.npy", val_x)
    rows = json.loads(ok(invoke("predict", run, "--input", tmp_path / "val_x.npy", "--json")).stdout)
    predicted = np.array([row["output"][0] for row in rows])
    assert abs(predicted.mean() - 5000) < 300
    mae = np.abs(predicted - val_y).mean()
    assert mae == pytest.approx(best["val_mae"], rel=1e-4)
    results = json.loads(ok(invoke("eval", run, "--json", "--trust-data", tmp_path)).stdout)
    assert results["mae"] == pytest.approx(best["val_mae"], rel=1e-6)
    assert results["loss"] == pytest.approx(best["val_loss"], rel=1e-6)  # on standardized targets, as trained


def test_normalize_target_with_a_classification_loss_exits_2(tmp_path, cli):
    config = write_config(tmp_path, """
        data: {source: synthetic, n: 40, features: 2, normalize_target: true}
        model: {layers: [{type: Linear, out_features: 2}]}
        """, "cls.yaml")
    result = cli("validate", config)
    assert result.exit_code == 2 and "data.normalize_target" in result.stderr
