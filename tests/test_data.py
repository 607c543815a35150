"""The data section: csv / npz / npy / tensors / synthetic sources, the seeded split, and
every way the data can be wrong (exit 2, naming the config file, the line and the key)."""
from __future__ import annotations

import json
import os
import re
import sys

import numpy as np
import pytest
import torch
import yaml
from helpers import ENV, REPO, invoke, load, metrics_rows, read_metrics, run_nncli, write_config

MODEL = "model:\n  layers:\n    - {type: Linear, out_features: 2}\n"


def load_dataset(path):
    from nncli.run.setup import load_config, load_data

    return load_data(load_config(path))


def data_config(tmp_path, data_lines: str, *, loss: str = "CrossEntropyLoss", out: int = 2,
                name: str = "config.yaml"):
    """`data:` on line 1, then `data_lines` (indented two spaces) from line 2, loss, model."""
    text = ("data:\n" + data_lines + f"loss: {loss}\nmodel:\n  layers:\n"
            f"    - {{type: Linear, out_features: {out}}}\n")
    return write_config(tmp_path, text, name)


# --- sources that work ---------------------------------------------------------------------

def test_csv_reads_features_and_target_by_header(tmp_path):
    (tmp_path / "scores.csv").write_text("a, b ,label\n1,2.5,0\n\n3,-4,1\n5,6e-1,1\n")
    data = load_dataset(data_config(tmp_path, "  source: csv\n  path: scores.csv\n  target: label\n"
                                              "  val_split: 0\n"))
    assert data.val is None and data.sample_shape == (2,)
    assert data.train.x.dtype == torch.float32
    assert torch.allclose(data.train.x, torch.tensor([[1, 2.5], [3, -4], [5, 0.6]]))
    assert data.train.y.dtype == torch.long and data.train.y.tolist() == [0, 1, 1]  # class labels


def test_csv_features_subset_several_targets_and_delimiter(tmp_path):
    (tmp_path / "table.csv").write_text("a;b;c;t1;t2\n1;2;3;0.5;1.5\n4;5;6;2.5;3.5\n")
    config = data_config(tmp_path, "  source: csv\n  path: table.csv\n  target: [t1, t2]\n"
                                   "  features: [c, a]\n"
                                   "  delimiter: ';'\n  val_split: 0\n", loss="MSELoss")
    data = load_dataset(config)
    assert data.train.x.tolist() == [[3, 1], [6, 4]]
    assert data.train.y.dtype == torch.float32 and data.train.y.tolist() == [[0.5, 1.5], [2.5, 3.5]]


def test_npz_with_named_arrays_relative_to_the_config_file(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    images = np.arange(6 * 16, dtype=np.float64).reshape(6, 1, 4, 4)
    np.savez(folder / "train_images.npz", images=images, labels=np.array([0, 1, 0, 1, 1, 0]))
    config = data_config(folder, "  source: npz\n  path: train_images.npz\n  x: images\n  y: labels\n"
                                 "  val_split: 0\n")
    monkeypatch.chdir(tmp_path)  # the path is relative to the config's folder, not the cwd
    data = load_dataset(config)
    assert data.sample_shape == (1, 4, 4)
    assert data.train.x.dtype == torch.float32
    assert torch.equal(data.train.x, torch.from_numpy(images).float())
    assert data.train.y.tolist() == [0, 1, 0, 1, 1, 0]


def test_npy_pair(tmp_path):
    np.save(tmp_path / "x.npy", np.array([[1, 2], [3, 4], [5, 6]], dtype=np.int32))
    np.save(tmp_path / "y.npy", np.array([0.5, 1.5, 2.5], dtype=np.float64))
    data = load_dataset(data_config(tmp_path, "  source: npy\n  x: x.npy\n  y: y.npy\n  val_split: 0\n",
                                    loss="MSELoss"))
    assert data.train.x.dtype == torch.float32 and data.train.x.tolist() == [[1, 2], [3, 4], [5, 6]]
    assert data.train.y.dtype == torch.float32 and data.train.y.tolist() == [0.5, 1.5, 2.5]


def test_separate_train_and_val_sources(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((4, 3), dtype=np.float32))
    np.save(tmp_path / "y.npy", np.array([0, 1, 1, 0]))
    np.savez(tmp_path / "val.npz", x=np.zeros((2, 3)), y=np.array([1, 1]))
    data = load_dataset(data_config(tmp_path, "  train: {source: npy, x: x.npy, y: y.npy}\n"
                                      "  val: {source: npz, path: val.npz}\n"))
    assert len(data.train) == 4 and len(data.val) == 2
    assert data.val.y.tolist() == [1, 1]


def test_split_is_seeded_and_partitions_the_samples(tmp_path):
    x = [[float(i)] for i in range(10)]
    y = [[float(i)] for i in range(10)]
    def config(seed, name):
        return write_config(tmp_path, f"seed: {seed}\ndata: {{source: tensors, x: {x}, "
                                      f"y: {y}, val_split: 0.3}}\n"
                                      f"loss: MSELoss\n{MODEL}", name)
    first, again, other = (load_dataset(config(0, "a.yaml")), load_dataset(config(0, "b.yaml")),
                           load_dataset(config(1, "c.yaml")))
    assert (len(first.train), len(first.val)) == (7, 3)
    assert torch.equal(first.val.x, again.val.x) and torch.equal(first.train.x, again.train.x)
    assert not torch.equal(first.val.x, other.val.x)
    together = sorted(first.train.x[:, 0].tolist() + first.val.x[:, 0].tolist())
    assert together == [float(i) for i in range(10)]
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))  # the first 3 go to val
    assert first.val.x[:, 0].tolist() == perm[:3].float().tolist()


def test_normalize_uses_training_statistics_for_both_sides(tmp_path):
    x = [[float(i), 100.0 + 10 * i] for i in range(10)]
    config = write_config(tmp_path, f"data: {{source: tensors, x: {x}, y: {[[0.0]] * 10}, val_split: 0.2, "
                                    f"normalize: true}}\nloss: MSELoss\n{MODEL}", "n.yaml")
    data = load_dataset(config)
    # the samples keep their values; each batch is normalized on the device as the model takes it
    raw_train, raw_val = data.train.x, data.val.x
    train, val = data.train.prepare(raw_train), data.val.prepare(raw_val)
    assert torch.allclose(train.mean(0), torch.zeros(2), atol=1e-5)
    assert torch.allclose(train.std(0), torch.ones(2), atol=1e-5)
    assert torch.allclose(data.normalization["mean"], raw_train.mean(0))
    assert torch.allclose(val, (raw_val - raw_train.mean(0)) / raw_train.std(0))
    # the validation side uses the training statistics (so its samples are others)
    assert set(raw_val[:, 0].round().tolist()) <= set(range(10)) - set(raw_train[:, 0].round().tolist())


def test_synthetic_and_digits_sources():
    from nncli.config import config_from_mapping
    from nncli.run.setup import load_data

    model = {"layers": [{"type": "Linear", "out_features": 3}]}
    data = load_data(config_from_mapping({"seed": 3, "model": model, "data": {
        "source": "synthetic", "n": 50, "features": 4, "classes": 3, "val_split": 0}}))
    assert data.train.x.shape == (50, 4) and set(data.train.y.tolist()) <= {0, 1, 2}
    again = load_data(config_from_mapping({"seed": 3, "model": model, "data": {
        "source": "synthetic", "n": 50, "features": 4, "classes": 3, "val_split": 0}}))
    assert torch.equal(data.train.x, again.train.x)  # generated from the run's seed
    digits = load_data(config_from_mapping({"model": model, "data": {"source": "digits"}}))
    assert (len(digits.train), len(digits.val)) == (1438, 359)
    assert digits.sample_shape == (1, 8, 8) and digits.train.y.max() == 9


# --- bad data: exit 2 with file, line, key and a clear message -----------------------------

def write_files(tmp_path):
    (tmp_path / "scores.csv").write_text("a,b,label\n1,2,0\n3,4,1\n5,6,1\n")
    (tmp_path / "scores_bad.csv").write_text("a,b,label\n1,2,0\n3,x,1\n5,6,1\n")
    (tmp_path / "scores_inf.csv").write_text("a,b,label\n1,2,0\n3,4,1\n-inf,6,1\n")
    (tmp_path / "ragged.csv").write_text("a,b,label\n1,2,0\n3,1\n")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header_only.csv").write_text("a,b,label\n")
    (tmp_path / "labels.csv").write_text("a,b,label\n1,2,0\n3,4,7\n5,6,1\n")
    (tmp_path / "negative.csv").write_text("a,b,label\n1,2,0\n3,4,-1\n5,6,1\n")
    np.save(tmp_path / "x3.npy", np.zeros((3, 2), np.float32))
    np.save(tmp_path / "y4.npy", np.zeros(4, np.int64))
    np.save(tmp_path / "words.npy", np.array(["a", "b", "c"]))
    np.savez(tmp_path / "arrays.npz", x=np.zeros((3, 2)), y=np.array(["a", "b", "c"]))
    (tmp_path / "fake.npz").write_text("not an archive")
    np.savez(tmp_path / "objects.npz", x=np.zeros((3, 2)), y=np.array([0, "a", None], dtype=object))
    np.save(tmp_path / "objects.npy", np.array([[1], "a", None], dtype=object))
    np.save(tmp_path / "complex.npy", np.ones((4, 2), np.complex128))
    np.save(tmp_path / "big_endian.npy", np.zeros((4, 2), ">f4"))


BAD_DATA = {
    "missing file": (
        "  source: csv\n  path: nope.csv\n  target: label\n",
        "{cfg}:3: data.path: file {dir}/nope.csv not found (paths are relative to the config file)"),
    "missing column": (
        "  source: csv\n  path: scores.csv\n  target: lable\n",
        "{cfg}:4: data.target: column 'lable' is not in scores.csv (columns: a, b, label). "
        "Did you mean 'label'?"),
    "column name as a list": (
        "  source: csv\n  path: scores.csv\n  target: [[label]]\n",
        "{cfg}:4: data.target: expected column names, got list ['label']\n"),
    "missing feature column": (
        "  source: csv\n  path: scores.csv\n  target: label\n  features: [a, bb]\n",
        "{cfg}:5: data.features: column 'bb' is not in scores.csv (columns: a, b, label). Did you mean 'b'?"),
    "non-numeric cell": (
        "  source: csv\n  path: scores_bad.csv\n  target: label\n",
        "{cfg}:3: data.path: scores_bad.csv row 3, column 'b': 'x' is not a number"),
    "infinite cell": (
        "  source: csv\n  path: scores_inf.csv\n  target: label\n",
        "{cfg}:3: data.path: scores_inf.csv row 4, column 'a': '-inf' is not a finite number; a NaN or "
        "infinite value makes the loss NaN. Remove or fill in that row."),
    "NaN in inline tensors": (
        "  source: tensors\n  x: [[1.0], [.nan], [3.0]]\n  y: [0.5, 1.5, 2.5]\n",
        "{cfg}:1: data: x holds nan at sample 1 (counting from 0), column 0; a NaN or infinite value "
        "makes the loss NaN. Remove or fill in those samples."),
    "ragged row": (
        "  source: csv\n  path: ragged.csv\n  target: label\n",
        "{cfg}:3: data.path: ragged.csv row 3 has 2 cells, the header has 3"),
    "empty csv": (
        "  source: csv\n  path: empty.csv\n  target: label\n",
        "{cfg}:3: data.path: {dir}/empty.csv is empty; expected a header row and data rows"),
    "header only": (
        "  source: csv\n  path: header_only.csv\n  target: label\n",
        "{cfg}:3: data.path: {dir}/header_only.csv has a header but no data rows"),
    "x/y length mismatch (tensors)": (
        "  source: tensors\n  x: [[1.0], [2.0], [3.0]]\n  y: [0, 1]\n  val_split: 0\n",
        "{cfg}:1: data: x has 3 samples but y has 2; they must match"),
    "x/y length mismatch (npy)": (
        "  source: npy\n  x: x3.npy\n  y: y4.npy\n  val_split: 0\n",
        "{cfg}:1: data: x has 3 samples but y has 4; they must match"),
    "ragged tensors": (
        "  source: tensors\n  x: [[1.0, 2.0], [3.0]]\n  y: [0, 1]\n",
        "{cfg}:3: data.x: expected a (nested) list of numbers with equal-length rows"),
    "label above the classes": (
        "  source: csv\n  path: labels.csv\n  target: label\n  val_split: 0\n",
        "{cfg}:1: data: training labels run from 0 to 7, but the model's output has 2 classes "
        "(labels 0 to 1). Make the last layer's out_features the number of classes."),
    "negative label": (
        "  source: csv\n  path: negative.csv\n  target: label\n  val_split: 0\n",
        "{cfg}:1: data: training labels run from -1 to 1, but the model's output has 2 classes"),
    "val_split leaves training empty": (
        "  source: synthetic\n  n: 10\n  val_split: 0.999\n",
        "{cfg}:4: data.val_split: a split of 0.999 leaves the training side empty (10 samples). "
        "Use val_split: 0 to train without validation."),
    "val_split leaves validation empty": (
        "  source: synthetic\n  n: 10\n  val_split: 0.01\n",
        "{cfg}:4: data.val_split: a split of 0.01 leaves the validation side empty (10 samples)"),
    "val_split out of range": (
        "  source: synthetic\n  n: 10\n  val_split: 1.5\n",
        "{cfg}:4: data.val_split: must lie strictly between 0 and 1, got 1.5"),
    "unknown source": (
        "  source: cvs\n  path: scores.csv\n",
        "{cfg}:2: data.source: unknown data source 'cvs'. Did you mean 'csv'?"),
    "no source": (
        "  path: scores.csv\n",
        "{cfg}:1: data: needs 'source:', one of: "),
    "unknown source key": (
        "  source: csv\n  paht: scores.csv\n  target: label\n",
        "{cfg}:3: data.paht: unknown key; expected one of: "),
    "npz without the array": (
        "  source: npz\n  path: arrays.npz\n  x: images\n",
        "{cfg}:4: data.x: arrays.npz has no array 'images' (it has: x, y)"),
    "npz of strings": (
        "  source: npz\n  path: arrays.npz\n",
        "{cfg}:1: data.y: array 'y' holds <U1, not numbers"),
    "npy of strings": (
        "  source: npy\n  x: words.npy\n  y: y4.npy\n",
        "{cfg}:3: data.x: array 'x' holds <U1, not numbers"),
    "an npz archive as an npy file": (
        "  source: npy\n  x: arrays.npz\n  y: y4.npy\n",
        "{cfg}:3: data.x: arrays.npz is not a readable .npy file: it is an .npz archive (arrays: x, y); "
        "use source: npz with path: arrays.npz"),
    "npz holding an object array": (
        "  source: npz\n  path: objects.npz\n",
        "{cfg}:1: data.y: objects.npz: array 'y' cannot be read: it holds Python objects (dtype object), "
        "which only pickle can read, and nncli never unpickles data. Save numbers: e.g. "),
    "npy holding an object array": (
        "  source: npy\n  x: objects.npy\n  y: y4.npy\n",
        "{cfg}:3: data.x: objects.npy is not a readable .npy file: it holds Python objects (dtype object)"),
    "complex numbers": (
        "  source: npy\n  x: complex.npy\n  y: y4.npy\n",
        "{cfg}:3: data.x: array 'x' holds complex numbers (complex128); a model trains on real numbers. "
        "Give the real and imaginary parts as two features: np.stack([x.real, x.imag], axis=-1)."),
    "memory map of a big-endian file": (
        "  source: npy\n  x: big_endian.npy\n  y: y4.npy\n  mmap: true\n  loader: dataloader\n",
        "{cfg}:3: data.x: big_endian.npy is stored big-endian; a memory map reads it as stored, and torch "
        "takes this machine's byte order. Re-save it with "
        "np.save(path, x.astype(x.dtype.newbyteorder('='))), or remove mmap."),
    "not an npz file": (
        "  source: npz\n  path: fake.npz\n",
        "{cfg}:3: data.path: fake.npz is not a readable .npz file"),
    "val without train": (
        "  source: npy\n  x: x3.npy\n  y: y4.npy\n  val: {source: npz, path: arrays.npz}\n",
        "{cfg}:5: data.val: val: needs train: beside it (or use val_split:)"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_exits_2_naming_file_line_and_key(tmp_path, case):
    write_files(tmp_path)
    lines, expected = BAD_DATA[case]
    config = data_config(tmp_path, lines, loss="MSELoss" if "tensors" in case and "mismatch" not in case
                         else "CrossEntropyLoss")
    out = tmp_path / "runs"
    result = invoke("train", config, "--out", out, "--quiet")
    assert result.exit_code == 2, result.stdout + result.stderr
    assert result.stdout == ""
    message = expected.format(cfg=config, dir=tmp_path)
    assert result.stderr.startswith(f"error: {message}"), result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists(), "bad data must not leave a run directory"
    validate = invoke("validate", config)  # the same check without training
    assert validate.exit_code == 2 and validate.stderr == result.stderr


def test_torchvision_not_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    config = data_config(tmp_path, "  source: torchvision\n  name: MNIST\n")
    result = invoke("train", config, "--out", tmp_path / "runs")
    assert result.exit_code == 2
    assert result.stderr == (f"error: {config}:3: data.name: needs torchvision, which is not installed. "
                             "Install it with: pip install 'nncli[vision]'.\n")


def test_bad_data_exit_status_of_the_real_process(tmp_path):
    config = data_config(tmp_path, "  source: csv\n  path: nope.csv\n  target: label\n")
    proc = run_nncli("train", config, "--out", tmp_path / "runs")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == (f"error: {config}:3: data.path: file {tmp_path}/nope.csv not found "
                           "(paths are relative to the config file)\n")


def test_regression_targets_must_match_the_output_shape(tmp_path):
    config = data_config(tmp_path, "  source: synthetic\n  kind: regression\n  n: 20\n  val_split: 0\n",
                         loss="MSELoss", out=3)
    result = invoke("train", config, "--out", tmp_path / "runs")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {config}:1: data: training targets have shape [] per sample, "
                                    "but the model's output has shape [3]")
    ok = data_config(tmp_path, "  source: synthetic\n  kind: regression\n  n: 20\n  val_split: 0\n",
                     loss="MSELoss", out=1, name="ok.yaml")
    assert invoke("train", ok, "--out", tmp_path / "runs", "-q", "--epochs", 1).exit_code == 0


def test_validation_labels_are_checked_too(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 2), np.float32))
    np.save(tmp_path / "y.npy", np.array([0, 1, 1, 0]))
    np.savez(tmp_path / "val.npz", x=np.zeros((2, 2)), y=np.array([1, 5]))
    config = data_config(tmp_path, "  train: {source: npy, x: x.npy, y: y.npy}\n"
                                   "  val: {source: npz, path: val.npz}\n")
    result = invoke("train", config, "--out", tmp_path / "runs")
    assert result.exit_code == 2
    assert "validation labels run from 1 to 5, but the model's output has 2 classes" in result.stderr


def test_eval_data_file_is_read_by_column_name(tmp_path):
    rows = [(i, i % 3, i % 2) for i in range(10)]
    (tmp_path / "scores.csv").write_text("a,b,label\n" + "".join(f"{a},{b},{t}\n" for a, b, t in rows))
    config = data_config(tmp_path, "  source: csv\n  path: scores.csv\n  target: label\n  val_split: 0.2\n")
    assert invoke("train", config, "--out", tmp_path / "runs", "--epochs", 1, "-q").exit_code == 0
    run = tmp_path / "runs" / "config"
    same = invoke("eval", run, "--data", tmp_path / "scores.csv", "--json")
    assert same.exit_code == 0, same.stderr
    # the same samples with the columns in another order (and an extra column) give the same loss
    (tmp_path / "shuffled.csv").write_text("label,extra,b,a\n"
                                           + "".join(f"{t},9,{b},{a}\n" for a, b, t in rows))
    shuffled = invoke("eval", run, "--data", tmp_path / "shuffled.csv", "--json")
    assert shuffled.exit_code == 0, shuffled.stderr
    assert shuffled.stdout == same.stdout

    (tmp_path / "other.csv").write_text("a,c,label\n1,2,0\n")
    result = invoke("eval", run, "--data", tmp_path / "other.csv")
    assert result.exit_code == 2
    # the --data file, not a line of the run's config
    assert result.stderr.startswith(f"error: {tmp_path / 'other.csv'}: column 'b' is not in other.csv "
                                    "(columns: a, c, label)")
    ckpt = load(run / "best.pt")
    x = torch.tensor([[float(a), float(b)] for a, b, _ in rows])
    y = torch.tensor([t for _, _, t in rows])
    expected = torch.nn.functional.cross_entropy(x @ ckpt["model"]["0.weight"].T + ckpt["model"]["0.bias"], y)
    assert json.loads(same.stdout)["loss"] == pytest.approx(float(expected), abs=1e-5)

    wrong_kind = invoke("eval", run, "--data", run / "config.yaml")
    assert wrong_kind.exit_code == 2 and "--data takes a .csv or .npz file" in wrong_kind.stderr
    np.save(tmp_path / "x.npy", np.zeros((2, 2)))
    one_npy = invoke("eval", run, "--data", tmp_path / "x.npy")
    assert one_npy.exit_code == 2 and "numpy.savez('data.npz', x=x, y=y)" in one_npy.stderr


def test_a_big_endian_npy_file_is_read_in_this_machines_byte_order(tmp_path):
    """Valid data written on (or for) a big-endian machine trains as the same numbers do."""
    x = np.random.default_rng(0).standard_normal((40, 3))
    y = (x.sum(1) > 0).astype(np.int64)
    for order in ("<", ">"):
        np.save(tmp_path / f"x{order == '>'}.npy", x.astype(f"{order}f8"))
        np.save(tmp_path / f"y{order == '>'}.npy", y.astype(f"{order}i8"))
        config = data_config(tmp_path, f"  source: npy\n  x: x{order == '>'}.npy\n  y: y{order == '>'}.npy\n",
                             name=f"order{order == '>'}.yaml")
        result = invoke("train", config, "--out", tmp_path / "runs", "--epochs", 2, "-q")
        assert result.exit_code == 0, result.stderr
    assert metrics_rows(tmp_path / "runs" / "orderTrue") == metrics_rows(tmp_path / "runs" / "orderFalse")
    assert load(tmp_path / "runs" / "orderTrue" / "last.pt")["model"]["0.weight"].dtype == torch.float32


def test_a_30000_column_csv_validates_and_an_unknown_column_is_named_briefly(tmp_path):
    """Reading a CSV file is linear in its cells (it was quadratic in the columns: 14 s for these
    30,000), and an unknown column's error lists the first columns, not all of them."""
    columns = [f"pixel{i}" for i in range(30_000)]
    rng = np.random.default_rng(0)
    rows = [",".join(f"{v:.3f}" for v in rng.standard_normal(30_000)) + f",{r % 2}" for r in range(30)]
    (tmp_path / "wide.csv").write_text(",".join(columns + ["label"]) + "\n" + "\n".join(rows) + "\n")
    config = data_config(tmp_path, "  source: csv\n  path: wide.csv\n  target: label\n")
    result = invoke("validate", config)
    assert result.exit_code == 0, result.stderr
    assert "input [30000] -> output [2]" in result.stdout
    result = invoke("validate", config, "--set", "data.target=lable")
    assert result.exit_code == 2
    assert result.stderr == ("error: --set data.target: column 'lable' is not in wide.csv (columns: "
                             f"{', '.join(columns[:20])}, ... 30,001 in all). Did you mean 'label'?\n")


def test_the_run_records_which_csv_columns_its_model_takes(tmp_path):
    """`features` left out means every other column: config.yaml and the checkpoints say which."""
    (tmp_path / "scores.csv").write_text("a,label,b\n" + "".join(f"{i},{i % 2},{i % 3}\n" for i in range(12)))
    config = data_config(tmp_path, "  source: csv\n  path: scores.csv\n  target: label\n")
    assert invoke("train", config, "--out", tmp_path / "runs", "--epochs", 1, "-q").exit_code == 0
    run = tmp_path / "runs" / "config"
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["features"] == ["a", "b"]
    assert load(run / "last.pt")["config"]["data"]["features"] == ["a", "b"]
    # the stored list is the same columns
    resumed = invoke("resume", run, "--epochs", 2, "-q", "--trust-data", tmp_path)
    assert resumed.exit_code == 0, resumed.stderr


def test_more_workers_than_cpus_are_capped_with_a_warning(tmp_path):
    """`workers: 100000` would try to start 100,000 processes: as many as the CPUs start instead."""
    config = data_config(tmp_path, "  source: synthetic\n  n: 64\n  features: 4\n  loader: dataloader\n"
                                   "  workers: 100000\n")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    warning = (f"warning: {config}:6: data.workers: 100000 worker processes asked for, but this process "
               f"may use {cpus} CPUs: {cpus} workers read the batches\n")
    result = invoke("validate", config)
    assert result.exit_code == 0 and result.stderr == warning, result.stderr
    trained = run_nncli("train", config, "--out", tmp_path / "runs", "--epochs", 1, "-q")
    assert trained.returncode == 0 and trained.stderr == warning, trained.stderr
    assert (yaml.safe_load((tmp_path / "runs" / "config" / "config.yaml").read_text())["data"]["workers"]
            == cpus)


# --- the validation split ------------------------------------------------------------------

TUTORIAL_POINTS = """
seed: 0
data:
  source: tensors
  x: [[1.0], [2.0], [3.0]]
  y: [[2.0], [4.0], [6.0]]
loss: {type: MSELoss, reduction: sum}
optimizer: {type: SGD, lr: 0.01}
train: {epochs: 1000, batch_size: 3}
model:
  layers:
    linear: {type: Linear, out_features: 1}
"""


def test_inline_tensors_train_on_every_point_unless_val_split_is_given(tmp_path):
    """The tutorial's three points as inline tensors: no validation split by default, so the
    1000 epochs learn what PyTorch learns on all three (w -> 2, 4 -> 8)."""
    config = write_config(tmp_path, TUTORIAL_POINTS, "points.yaml")
    result = invoke("train", config, "--out", tmp_path / "runs")
    assert result.exit_code == 0, result.stderr
    assert "train/val samples: 3/0" in result.stdout
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    x = torch.tensor([[1.0], [2.0], [3.0]])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(1000):
        optimizer.zero_grad()
        torch.nn.MSELoss(reduction="sum")(model(x), 2 * x).backward()
        optimizer.step()
    saved = load(tmp_path / "runs" / "points" / "last.pt")
    assert float(saved["model"]["linear.weight"]) == pytest.approx(float(model.weight), abs=1e-5)
    assert float(model.weight) == pytest.approx(2.0, abs=1e-3)
    assert saved["config"]["data"]["val_split"] == 0  # the resolved config says so

    given = invoke("validate", config, "--set", "data.val_split=0.34")  # asked for: split, and warned
    assert given.exit_code == 0
    assert given.stderr == ("warning: --set data.val_split: a split of 0.34 keeps 1 of the 3 samples out of "
                            "training for validation: fewer than 10, too few for a validation loss that "
                            "means much, yet that loss picks best.pt (and early stopping). Use val_split: 0 "
                            "to train on every sample, or give more data.\n")


@pytest.mark.parametrize("n, warned", [(40, True), (50, False)])
def test_a_split_that_leaves_fewer_than_10_validation_samples_warns_with_the_figure(tmp_path, n, warned):
    config = data_config(tmp_path, f"  source: synthetic\n  n: {n}\n  features: 2\n  val_split: 0.2\n")
    result = invoke("validate", config)
    assert result.exit_code == 0, result.stderr
    expected = (f"warning: {config}:5: data.val_split: a split of 0.2 keeps 8 of the 40 samples out of "
                "training for validation: fewer than 10") if warned else ""
    assert result.stderr.startswith(expected) and bool(result.stderr) == warned, result.stderr


# --- torchvision (not a test dependency: a stand-in package plays its part) -----------------

# The parts of torchvision that the source uses, as torchvision shapes them: MNIST takes root,
# train and download, and fails as the real one does without its files or without a network;
# FakeData takes none of those (its defaults made small here).
FAKE_DATASETS = '''
import urllib.error

import torch


class MNIST:
    def __init__(self, root, train=True, transform=None, target_transform=None, download=False):
        if download:
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        raise RuntimeError("Dataset not found. You can use download=True to download it")


class FakeData:
    def __init__(self, size=40, image_size=(1, 4, 4), num_classes=3, transform=None, target_transform=None,
                 random_offset=0):
        self.size, self.image_size, self.num_classes, self.transform = size, image_size, num_classes, transform

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(index)
        image = torch.rand(self.image_size, generator=g)
        return self.transform(image), torch.randint(0, self.num_classes, (1,), generator=g)[0]
'''  # noqa: E501 -- a module's source, written out as it is: a wrapped line would change the text


@pytest.fixture
def fake_torchvision(tmp_path, monkeypatch):
    """Write a stand-in torchvision (0.99.0) whose __init__ is `init`, first on the subprocesses'
    PYTHONPATH; returns the function that writes it."""
    def write(init: str) -> None:
        site = tmp_path / "site"
        package = site / "torchvision"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(init)
        (package / "datasets.py").write_text(FAKE_DATASETS)
        (package / "transforms.py").write_text("class ToTensor:\n    def __call__(self, image):\n"
                                               "        return image\n")
        (site / "torchvision-0.99.0.dist-info").mkdir()
        (site / "torchvision-0.99.0.dist-info" / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: torchvision\nVersion: 0.99.0\n")
        monkeypatch.setitem(ENV, "PYTHONPATH", os.pathsep.join([str(site), ENV["PYTHONPATH"]]))
    return write


def test_torchvision_built_for_another_torch_is_exit_2_saying_so(tmp_path, fake_torchvision):
    fake_torchvision('raise RuntimeError("operator torchvision::nms does not exist")\n')
    config = data_config(tmp_path, "  source: torchvision\n  name: MNIST\n")
    result = run_nncli("train", config, "--out", tmp_path / "runs")
    assert result.returncode == 2, result.stderr
    version = torch.__version__.split("+")[0]
    assert result.stderr == (
        f"error: {config}:3: data.name: torchvision 0.99.0 does not work with the installed torch "
        f"{torch.__version__}: importing it fails with 'operator torchvision::nms does not exist', the sign "
        f"of a torchvision built for another torch. Install the torchvision made for torch {version}, "
        f"from the package index torch came from: pip install --upgrade 'torch=={version}' torchvision.\n")


@pytest.mark.parametrize("download, hint", [
    ("true", "Check the network connection; or download the files elsewhere, copy them to {root} and set "
             "download: false."),
    ("false", "Set download: true to fetch them, or root: to the folder that holds them (now {root})."),
])
def test_torchvision_dataset_that_cannot_load_hints_what_fits(tmp_path, fake_torchvision, download, hint):
    """Without a network, download: true fails: the hint is not to set it again."""
    fake_torchvision("from . import datasets, transforms\n")
    config = data_config(tmp_path, f"  source: torchvision\n  name: MNIST\n  download: {download}\n")
    result = run_nncli("validate", config)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {config}:3: data.name: cannot load MNIST: ")
    assert result.stderr.endswith(hint.format(root=tmp_path / "data") + "\n"), result.stderr
    assert ("Set download: true" in result.stderr) == (download == "false")


def test_torchvision_fakedata_trains(tmp_path, fake_torchvision):
    """FakeData takes no root, train or download: it is given only what it takes."""
    fake_torchvision("from . import datasets, transforms\n")
    text = ("data: {source: torchvision, name: FakeData}\nmodel:\n  layers: [Flatten, {type: Linear, "
            "out_features: 3}]\ntrain: {epochs: 2, batch_size: 8}\n")
    config = write_config(tmp_path, text, "fake.yaml")
    result = run_nncli("train", config, "--out", tmp_path / "runs")
    assert result.returncode == 0, result.stderr
    assert "train/val samples: 32/8" in result.stdout
    _, rows = read_metrics(tmp_path / "runs" / "fake")
    assert len(rows) == 2 and 0 <= rows[-1]["val_accuracy"] <= 1


def test_every_extra_a_message_names_is_in_pyproject():
    """`pip install 'nncli[vision]'` must install something: every extra named by nncli's messages
    or the README is one that pyproject.toml defines."""
    extras_section = re.search(r"^\[project\.optional-dependencies\]\n(.*?)(?=^\[)", (REPO / "pyproject.toml")
                               .read_text(), re.M | re.S).group(1)
    defined = set(re.findall(r"^(\w+) = \[", extras_section, re.M))
    texts = ([p.read_text() for p in sorted((REPO / "nncli").rglob("*.py"))]
             + [(REPO / "README.md").read_text()])
    named = {extra for text in texts for extra in re.findall(r"nncli\[(\w+)\]", text)}
    from nncli.run.export import FORMATS  # its message names each format's extra from this table

    named |= {entry.extra for entry in FORMATS.values() if entry.extra}
    assert {"vision", "images", "onnx", "safetensors", "tensorboard"} <= named
    assert named <= defined, named - defined
    assert {"images", "onnx", "plot", "tensorboard", "all"} <= defined  # the extras the README lists


@pytest.mark.parametrize("section, problem", [
    ("{source: synthetic, kind: images, n: 10, shape: [-1, 3]}", "data.shape: must be one sample's shape"),
    ("{source: synthetic, kind: images, n: 10, shape: [a]}", "data.shape: must be one sample's shape"),
    ("{source: synthetic, n: 99999999999999, features: 999999999}", "data.n: 99,999,999,999,999 samples"),
])
def test_synthetic_sizes_beyond_a_tensor_are_bad_input(cli, tmp_path, section, problem):
    """A synthetic source's shape and size are checked as config (exit 2, the key named), not left
    to torch (exit 1: negative dimension, storage size overflowed)."""
    model = "model:\n  layers: [Flatten, {type: Linear, out_features: 2}]\n"
    path = write_config(tmp_path, f"data: {section}\n{model}")
    result = cli("validate", path)
    assert result.exit_code == 2, result.stdout + result.stderr
    assert f"{path}:1: {problem}" in result.stderr
