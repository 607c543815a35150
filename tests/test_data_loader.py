"""`loader: dataloader`: the inputs stay on the host (memory-mapped with `mmap: true`) and a torch
DataLoader reads each batch, in worker processes. It must draw the same batches as the default
`loader: memory`, so a run trains the same model bit for bit, alone and under DDP.
(Ctrl-C with workers and resuming with the other loader: tests/test_run_resume.py.)"""
from __future__ import annotations

import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    DROPOUT_MLP,
    ENV,
    load,
    metrics_rows,
    nncli_argv,
    ok,
    run_nncli,
    run_python,
    train_config,
    write_config,
)

# Dropout and normalize: a loader that drew torch's global RNG, or normalized differently, would
# change the weights.
DIGITS = """
seed: 5
data: {source: digits, normalize: true, val_split: 0.25%s}
loss: CrossEntropyLoss
metrics: [accuracy]
optimizer: {type: Adam, lr: 0.002}
train: {epochs: 3, batch_size: 50}
model:
  layers:
    - Flatten
    - {type: Linear, out_features: 32}
    - ReLU
    - {type: Dropout, p: 0.3}
    - {type: Linear, out_features: 10}
"""
NPY = """
seed: 1
data: {source: npy, x: x.npy, y: y.npy%s}
loss: CrossEntropyLoss
optimizer: {type: SGD, lr: 0.1, momentum: 0.9}
train: {epochs: 2, batch_size: 32}
""" + DROPOUT_MLP


def assert_same_model(run_a, run_b) -> None:
    a, b = load(run_a / "last.pt")["model"], load(run_b / "last.pt")["model"]
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert metrics_rows(run_a) == metrics_rows(run_b)


def write_arrays(folder, n: int = 1000) -> np.ndarray:
    g = np.random.default_rng(0)
    x = g.normal(size=(n, 16)).astype(np.float32)
    np.save(folder / "x.npy", x)
    np.save(folder / "y.npy", (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1))
    return x


def test_dataloader_with_workers_trains_the_same_model_as_memory(tmp_path):
    _, memory = train_config(tmp_path, DIGITS % "", "memory")
    config, loaded = train_config(tmp_path, DIGITS % ", loader: dataloader, workers: 2", "loaded")
    assert_same_model(loaded, memory)
    assert load(loaded / "last.pt")["data_fingerprint"] == load(memory / "last.pt")["data_fingerprint"]
    assert "loader: dataloader" in (loaded / "config.yaml").read_text()
    # eval reads the run's validation data with its loader, and says the same
    evals = [ok(run_nncli("eval", run, "--json", cwd=tmp_path)).stdout for run in (memory, loaded)]
    assert evals[0] == evals[1] and '"accuracy"' in evals[0]


def test_mmap_keeps_the_inputs_in_the_file_and_trains_like_memory(tmp_path):
    from nncli.data.samples import HostSamples
    from nncli.run.setup import load_config, load_data

    x = write_arrays(tmp_path)
    config = write_config(tmp_path, NPY % ", loader: dataloader, mmap: true", "mapped.yaml")
    data = load_data(load_config(config))
    assert isinstance(data.train, HostSamples) and len(data.train) == 800 and len(data.val) == 200
    # the inputs are the file's pages, mapped, not a copy read into memory
    address = data.train.x.data_ptr()
    maps = [line.split() for line in open("/proc/self/maps") if line.rstrip().endswith("/x.npy")]
    assert any(int(r.split("-")[0], 16) <= address < int(r.split("-")[1], 16) for r, *_ in maps), maps
    xb, yb = next(data.train.batches(torch.tensor([3, 0]), 2))
    rows = data.train.rows[[3, 0]].numpy()
    assert torch.equal(xb, torch.from_numpy(x[rows])) and yb.dtype == torch.long

    _, memory = train_config(tmp_path, NPY % "", "memory")
    _, mapped = train_config(tmp_path, NPY % ", loader: dataloader, mmap: true, workers: 1", "mapped")
    assert_same_model(mapped, memory)
    assert np.array_equal(np.load(tmp_path / "x.npy"), x)  # copy-on-write: the file never changes


def test_a_mapped_file_is_mapped_again_not_copied_when_pickled_for_a_spawned_worker(tmp_path):
    from nncli.run.setup import load_config, load_data

    x = write_arrays(tmp_path)
    train = load_data(load_config(write_config(tmp_path, NPY % ", loader: dataloader, mmap: true"))).train
    next(train.batches(torch.arange(4), 2))  # the loader exists, and is not sent to a worker
    state = pickle.dumps(train)
    assert len(state) < x.nbytes / 2  # the rows and targets, not the inputs
    copy = pickle.loads(state)
    assert copy._loader is None and torch.equal(copy.rows, train.rows)
    assert torch.equal(copy[torch.tensor([0, 5])][0], train[torch.tensor([0, 5])][0])
    assert any(line.rstrip().endswith("/x.npy") for line in open("/proc/self/maps"))


def test_dataloader_workers_under_spawn_train_the_same_model(tmp_path):
    """macOS and Windows start loader workers with `spawn`, which pickles the samples."""
    _, memory = train_config(tmp_path, DIGITS % "", "memory")
    config = write_config(tmp_path, DIGITS % ", loader: dataloader, workers: 1", "spawned.yaml")
    code = ("import multiprocessing, sys; multiprocessing.set_start_method('spawn'); "
            "from nncli.cli import main; sys.argv[0] = 'nncli'; main()")
    ok(run_python("-c", code, "train", config, "--out", tmp_path / "runs", "-q", cwd=tmp_path))
    assert_same_model(tmp_path / "runs" / "spawned", memory)


def test_mmap_of_a_fortran_ordered_file_is_refused(tmp_path):
    write_arrays(tmp_path)
    np.save(tmp_path / "x.npy", np.asfortranarray(np.load(tmp_path / "x.npy")))
    config = write_config(tmp_path, NPY % ", loader: dataloader, mmap: true")
    result = run_nncli("validate", config, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{config}:2: data.x: x.npy is stored in Fortran order" in result.stderr
    assert "np.ascontiguousarray" in result.stderr


@pytest.mark.parametrize("loader", ["memory", "dataloader"])
def test_an_empty_share_gives_no_batch(tmp_path, loader):
    """Under DDP a process's share of a tiny validation set may be empty: no batch, not an empty
    one, whose mean loss is NaN and would make the job's val_loss NaN."""
    from nncli.run.setup import load_config, load_data

    write_arrays(tmp_path, 10)
    config = write_config(tmp_path, NPY % f", loader: {loader}, workers: 0, val_split: 0.1")
    val = load_data(load_config(config)).val
    assert len(val) == 1 and list(val.subset(slice(1, None, 2)).batches(torch.arange(0), 4)) == []
    assert [len(x) for x, _ in val.batches(torch.arange(1), 4)] == [1]


# a sample is 20 bytes (3 floats and a label): chunks of 1 batch, of 2 batches, of them all
@pytest.mark.parametrize("gather_bytes", [1, 2 * 4 * 20, 2**30])
def test_memory_batches_gathered_in_chunks_are_those_indexed_one_by_one(monkeypatch, gather_bytes):
    """`loader: memory` gathers many batches at once and splits them: the batches must be exactly
    those of indexing x and y batch by batch, as the hand-written loop does."""
    from nncli.data import samples
    from nncli.data.samples import TensorPair

    monkeypatch.setattr(samples, "GATHER_BYTES", gather_bytes)
    x, y = torch.randn(23, 3), torch.arange(23)
    index = torch.randperm(23, generator=torch.Generator().manual_seed(0))
    got = list(TensorPair(x, y).batches(index, 4))
    expected = [(x[idx], y[idx]) for idx in index.split(4)]
    assert [len(xb) for xb, _ in got] == [4, 4, 4, 4, 4, 3]
    for (xb, yb), (xe, ye) in zip(got, expected, strict=True):
        assert torch.equal(xb, xe) and torch.equal(yb, ye)


def test_normalization_statistics_merged_over_chunks_match_torch(monkeypatch):
    from nncli.data import load as data
    from nncli.data.load import normalization_of
    from nncli.data.samples import HostSamples

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1001, 3, 4, dtype=torch.float64, generator=g) * torch.tensor([1.0, 1e3, 0.0]).view(3, 1)
         + 7)
    samples = HostSamples(x, torch.randperm(1001, generator=g), torch.zeros(1001), torch.float32)
    # 40 rows of 12 float64 values: 26 chunks, the last 1 row
    monkeypatch.setattr(data, "CHUNK_BYTES", 40 * 12 * 8)
    stats = normalization_of(samples)
    exact = x.float().double()  # what the model takes, in float64: torch's own float32 mean is further off
    assert torch.allclose(stats["mean"].double(), exact.mean(0), rtol=1e-7, atol=1e-6)
    assert torch.allclose(stats["std"][:2].double(), exact.std(0)[:2], rtol=1e-6)
    assert torch.equal(stats["std"][2], torch.ones(4))  # a constant feature is left as it is
    assert stats["mean"].dtype == torch.float32  # the model's input dtype
    samples.dtype = torch.float64
    assert normalization_of(samples)["mean"].dtype == torch.float64


def test_resume_normalizes_with_the_checkpoints_statistics(tmp_path):
    """The statistics a model was trained with, not recomputed ones (an older nncli computed them
    in float32 and a resumed run would drift from an uninterrupted one)."""
    _, run = train_config(tmp_path, DIGITS % ", loader: dataloader", "run")
    ckpt = load(run / "last.pt")
    ckpt["normalization"]["mean"] += 0.5
    torch.save(ckpt, run / "last.pt")
    ok(run_nncli("resume", run, "--epochs", "4", cwd=tmp_path))
    assert torch.equal(load(run / "last.pt")["normalization"]["mean"], ckpt["normalization"]["mean"])


def processes_mentioning(text: str) -> list[str]:
    """The command lines of running processes that contain `text`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # it ended meanwhile
            continue
        if text in line:
            found.append(line)
    return found


def test_ddp_with_dataloader_workers_matches_ddp_in_memory_and_leaves_no_process(tmp_path):
    """Two gloo processes, each reading its shard with its own loader and two workers: the same
    model as in memory; and when the command returns, no worker is left (a DDP process leaves
    with os._exit, which does not end a DataLoader's workers by itself)."""
    write_arrays(tmp_path, 640)
    runs = []
    for name, loader in (("memory", ""), ("loaded", ", loader: dataloader, workers: 2")):
        config = write_config(tmp_path, NPY % loader, f"{name}.yaml")
        with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
            # output to files, not pipes: waiting for a pipe's end would wait for every worker too
            code = subprocess.run(nncli_argv("train", config, "--nproc", "2", "--out", tmp_path / "runs"),
                                  cwd=tmp_path, env=ENV, stdout=out, stderr=err, timeout=240).returncode
        assert processes_mentioning(str(config)) == []
        assert code == 0, (tmp_path / "err.txt").read_text()
        assert "DDP: weights identical on all 2 processes" in (tmp_path / "out.txt").read_text()
        runs.append(tmp_path / "runs" / name)
    assert_same_model(*runs)


@pytest.mark.parametrize("change", ["data.loader=dataloader", "data.workers=3"])
def test_how_the_data_is_read_may_change_on_resume_but_not_what_it_is(tmp_path, change):
    _, run = train_config(tmp_path, DIGITS % "" if change.startswith("data.loader") else
                          DIGITS % ", loader: dataloader", "run")
    result = ok(run_nncli("resume", run, "--epochs", "4", "--set", change, cwd=tmp_path))
    assert "epoch 4" in result.stdout
    refused = run_nncli("resume", run, "--epochs", "5", "--set", "data.val_split=0.3", cwd=tmp_path)
    assert refused.returncode == 2 and "data.val_split: 0.25 -> 0.3" in refused.stderr


def test_checking_a_config_does_not_read_every_input(tmp_path, monkeypatch):
    """validate, summary and `--nproc`'s check in the parent need shapes and targets, not a pass
    over a (maybe larger than memory) mapped file for the fingerprint and the statistics."""
    from nncli.data import load as data
    from nncli.run.setup import check_config, load_config

    def must_not_scan(*args):
        raise AssertionError("a pass over every input")

    write_arrays(tmp_path)
    config = load_config(write_config(tmp_path, NPY.replace("y.npy", "y.npy, normalize: true")
                                      % ", loader: dataloader, mmap: true"))
    monkeypatch.setattr(data, "data_fingerprint", must_not_scan)
    monkeypatch.setattr(data, "normalization_of", must_not_scan)
    plan, groups = check_config(config)
    assert plan.output_shape[1:] == (3,) and len(groups) == 1
    with pytest.raises(AssertionError, match="a pass over every input"):
        data.read_data(config)  # training does scan
