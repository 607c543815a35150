"""Nothing saved is lost: a run directory belongs to one run, is locked while a process trains in
it, is left as it is by a resume from an older checkpoint, keeps files it did not write, and its
metrics.csv grows a row per epoch."""
from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers import (
    ENV,
    REPO,
    TINY_REGRESSION,
    Background,
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

KEPT = TINY_REGRESSION.replace("train: {epochs: 3, batch_size: 16}",
                               "train: {epochs: 4, batch_size: 16}\ncheckpoint: {keep_last: 4}")
# long enough to be busy while a second command tries the run (minutes; always stopped early)
LONG = TINY_REGRESSION.replace("n: 64", "n: 20000").replace("epochs: 3", "epochs: 2000")


def test_resume_from_an_older_checkpoint_leaves_the_run_as_it_was(tmp_path):
    """nncli's own advice, `resume RUN/epoch_2.pt --epochs 3` on a finished 4-epoch run: the run's
    files stay byte for byte; the resumed run goes on in RUN-2, from epoch 2's state exactly."""
    config, run = train_config(tmp_path, KEPT, "kept")
    before = snapshot(run)
    result = ok(run_nncli("resume", run / "epoch_2.pt", "--epochs", "3", cwd=tmp_path))
    fork = run.with_name("kept-2")
    assert f"in a new run directory: {fork} ({run} is left as it is)" in result.stdout, result.stdout
    assert snapshot(run) == before
    assert [r["epoch"] for r in metrics_rows(fork)] == ["1", "2", "3"]
    assert metrics_rows(fork) == metrics_rows(run)[:3]  # epoch 3 trained again, the same way
    assert torch.equal(load(fork / "last.pt")["model"]["0.weight"],
                       load(run / "epoch_3.pt")["model"]["0.weight"])
    assert load(fork / "last.pt")["config"]["train"]["epochs"] == 3

    # --out: a copy of the run goes on elsewhere, from its last.pt; the run stays as it was
    ok(run_nncli("resume", run, "--epochs", "5", "--out", tmp_path / "copies", cwd=tmp_path))
    assert snapshot(run) == before
    assert [r["epoch"] for r in metrics_rows(tmp_path / "copies" / "kept")] == ["1", "2", "3", "4", "5"]


def _claim(args: tuple) -> str:
    from nncli.run.rundir import claim_run_dir

    base, barrier = args
    barrier.wait()
    run_dir, lock = claim_run_dir(Path(base), "sweep")
    (run_dir / "owner").write_text(str(os.getpid()))
    time.sleep(0.2)  # hold the directory while the others choose theirs
    return run_dir.name


def test_runs_started_together_never_share_a_directory(tmp_path):
    """8 processes claim a run directory at the same instant, 10 times over: each gets its own."""
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, context.Pool(8) as pool:
        for round_ in range(10):
            base = tmp_path / f"round{round_}"
            barrier = manager.Barrier(8)
            names = pool.map(_claim, [(str(base), barrier)] * 8)
            assert sorted(names) == sorted(["sweep", *(f"sweep-{n}" for n in range(2, 9))]), names
            assert all((base / name / "owner").is_file() for name in names)


def test_four_trainings_at_once_keep_four_results(tmp_path):
    """A 4-value lr sweep started together into one --out: 4 complete run directories."""
    config = write_config(tmp_path, TINY_REGRESSION, "sweep.yaml")
    lrs = ["0.01", "0.02", "0.03", "0.04"]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda lr: run_nncli("train", config, "--set", f"optimizer.lr={lr}", "-q",
                                                     "--out", tmp_path / "out", cwd=tmp_path), lrs))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    runs = sorted((tmp_path / "out").iterdir())
    assert [r.name for r in runs] == ["sweep", "sweep-2", "sweep-3", "sweep-4"]
    assert sorted(str(load(r / "last.pt")["config"]["optimizer"]["lr"]) for r in runs) == lrs
    assert all(len(metrics_rows(r)) == 3 for r in runs)


def test_a_run_in_use_is_refused_at_once(tmp_path):
    """While `train` (then `resume`) trains in a run directory, a second `resume` of it stops at
    once, exit 1, naming the holder's PID, and writes nothing; when the holder is gone (kill -9
    too), the run resumes."""
    config = write_config(tmp_path, LONG, "long.yaml")
    trainer = Background("train", config, "--out", tmp_path / "out", cwd=tmp_path)
    trainer.wait_for_line("epoch 1/")
    run = tmp_path / "out" / "long"
    second = run_nncli("resume", run, cwd=tmp_path)
    assert second.returncode == 1, second.stdout + second.stderr
    assert f"the run is in use: process {trainer.proc.pid} is training in it" in second.stderr, second.stderr
    trainer.interrupt()
    assert trainer.finish()[0] == 130

    resumer = Background("resume", run, cwd=tmp_path)
    resumer.wait_for_line("resuming")
    refused = run_nncli("resume", run, cwd=tmp_path)
    assert refused.returncode == 1 and f"process {resumer.proc.pid}" in refused.stderr, refused.stderr
    resumer.proc.kill()  # kill -9: the OS drops the lock with the process
    resumer.proc.wait()
    proc = Background("resume", run, cwd=tmp_path)
    proc.wait_for_line("resuming")
    proc.interrupt()
    assert proc.finish()[0] == 130


def test_rotation_deletes_only_its_own_checkpoints(tmp_path):
    """keep_last: 2 removes the epoch_<N>.pt files it wrote, not a user's epoch_1_keep-this-one.pt,
    and a file named epoch_final.pt does not stop the run."""
    text = TINY_REGRESSION.replace("train: {epochs: 3, batch_size: 16}",
                                   "train: {epochs: 2, batch_size: 16}\ncheckpoint: {keep_last: 2}")
    config, run = train_config(tmp_path, text, "rotated")
    (run / "epoch_1_keep-this-one.pt").write_bytes(b"mine")
    (run / "epoch_final.pt").write_bytes(b"mine too")
    ok(run_nncli("resume", run, "--epochs", "5", cwd=tmp_path))
    names = sorted(p.name for p in run.glob("epoch_*"))
    assert names == ["epoch_1_keep-this-one.pt", "epoch_4.pt", "epoch_5.pt", "epoch_final.pt"]
    assert (run / "epoch_1_keep-this-one.pt").read_bytes() == b"mine"


def test_metrics_csv_keeps_the_rows_of_its_checkpoint(tmp_path):
    """metrics.csv is appended a row per epoch; a row written after last.pt (a kill between the two)
    is cut off on resume and trained again, so no epoch is written twice. A missing metrics.csv is
    said, and the run still resumes exactly."""
    config, run = train_config(tmp_path, TINY_REGRESSION, "appended")
    reference = tmp_path / "reference"
    ok(run_nncli("train", config, "--epochs", "4", "--out", reference, "-q", cwd=tmp_path))
    with open(run / "metrics.csv", "a") as f:
        f.write("4,0.5,0.5,0.5,0.1,0.01\n5,0.4,0.4")  # a row after last.pt, and half of one
    ok(run_nncli("resume", run, "--epochs", "4", cwd=tmp_path))
    assert metrics_rows(run) == metrics_rows(reference / "appended")
    assert load(run / "last.pt")["metrics_rows"] == 4

    (run / "metrics.csv").unlink()
    result = ok(run_nncli("resume", run, "--epochs", "5", cwd=tmp_path))
    assert "metrics.csv holds 0 of the 4 epochs of metrics that last.pt has trained" in result.stderr
    assert [r["epoch"] for r in metrics_rows(run)] == ["5"]


ROWS_THEN_LAST = [(name, rows) for rows in range(1, 7) for name in ("metrics", "last")]


@pytest.mark.parametrize("every, expected", [
    (1, ROWS_THEN_LAST),
    # the first row creates the file (atomically, so fsynced); epochs 2 and 3 are one fsync
    (3, [("metrics", 1), ("metrics", 3), ("last", 3), ("metrics", 6), ("last", 6)]),
])
def test_metrics_rows_are_on_disk_before_the_checkpoint_that_counts_them(tmp_path, cli, monkeypatch,
                                                                         every, expected):
    """Rows are appended without an fsync each (on a small model one costs more than its epoch);
    metrics.csv is fsynced once before each last.pt, never after it, so no checkpoint counts a row
    a power cut could take."""
    synced = []  # (file, the metrics rows it holds or counts) at each fsync of metrics.csv or last.pt
    real_fsync = os.fsync

    def recording_fsync(fd):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))  # a write_atomic's is .<name>.<pid>.tmp
        name = path.name.split(".")[1] if path.name.endswith(".tmp") else path.stem
        if name == "metrics":
            synced.append((name, len(path.read_text().splitlines()) - 1))
        elif name == "last":
            synced.append((name, torch.load(path, weights_only=True)["metrics_rows"]))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    text = TINY_REGRESSION.replace("epochs: 3", "epochs: 6") + f"checkpoint: {{every: {every}}}\n"
    config = write_config(tmp_path, text, "run.yaml")
    assert cli("train", str(config), "--out", str(tmp_path / "out"), "-q").exit_code == 0
    assert synced == expected


def _processes_running(marker: str) -> list[int]:
    """PIDs of processes whose command line holds `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the workers")
def test_workers_end_when_their_launcher_is_killed(tmp_path):
    """`kill -9` of `nncli train --nproc 2`: its two DDP processes stop (saving where they were)
    within 20 s instead of training on unsupervised."""
    config = write_config(tmp_path, LONG.replace("seed: 0", "seed: 0\nparallel: ddp"), "orphaned.yaml")
    launcher = subprocess.Popen(nncli_argv("train", config, "--nproc", "2", "--out", tmp_path / "out"),
                                cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    try:
        for line in launcher.stdout:
            if line.startswith("epoch 1/"):
                break
        else:
            raise AssertionError("the job ended before its first epoch")
        assert len(_processes_running(str(config))) == 3  # the launcher and its two workers
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 20
        while _processes_running(str(config)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _processes_running(str(config)) == []
    finally:
        for pid in _processes_running(str(config)):
            os.kill(pid, signal.SIGKILL)
    assert load(tmp_path / "out" / "orphaned" / "last.pt")["epoch"] >= 1


def test_a_resume_that_another_resume_overtook_trains_nothing(tmp_path, monkeypatch, cli):
    """Two resumes of one run started together: the one that takes the lock second finds last.pt
    newer than the one it read, and stops (exit 1) instead of training on from the older state
    over the other's epochs."""
    import nncli.run.resume as resume_module

    config, run = train_config(tmp_path, TINY_REGRESSION, "raced")
    prepare_run = resume_module.prepare_run

    def overtaken(*args, **kwargs):  # the other resume runs to its end while this one prepares
        prepared = prepare_run(*args, **kwargs)
        ok(run_nncli("resume", run, "--epochs", "5", "-q", cwd=tmp_path))
        return prepared

    monkeypatch.setattr(resume_module, "prepare_run", overtaken)
    result = cli("resume", str(run), "--epochs", "5", "--set", "optimizer.lr=0.05", "-q")
    assert result.exit_code == 1, result.stdout + result.stderr
    assert "the run went on in another process since this resume read last.pt" in result.stderr
    assert load(run / "last.pt")["config"]["optimizer"]["lr"] == 0.1  # the other resume's, kept
    assert [r["epoch"] for r in metrics_rows(run)] == ["1", "2", "3", "4", "5"]


END_PROCESS = """
import ast, atexit, sys, threading, time
from pathlib import Path
from nncli.process import end_process

class TornDown:
    def __del__(self):
        print("torn down")  # only in the interpreter's teardown

kept = TornDown()
atexit.register(lambda: print("exit handler ran"))
print("buffered", end="")  # not flushed yet
if len(sys.argv) > 2:  # a thread that still works when the command is done
    threading.Thread(target=lambda: (time.sleep(0.5), Path(sys.argv[2]).write_text("done"))).start()
end_process(ast.literal_eval(sys.argv[1]))
"""


@pytest.mark.parametrize("status, code, stderr", [(None, 0, ""), (3, 3, ""), ("bad input", 1, "bad input")])
def test_the_process_ends_without_teardown_after_its_exit_handlers(status, code, stderr):
    done = run_python("-c", END_PROCESS, repr(status))
    assert done.returncode == code
    assert done.stdout == "bufferedexit handler ran\n"  # flushed, handlers run, nothing torn down
    assert done.stderr.strip() == stderr


def test_the_process_waits_for_a_thread_that_still_works(tmp_path):
    """Where a plugin's thread (not a daemon) still runs, the process ends as Python's does."""
    written = tmp_path / "written"
    done = run_python("-c", END_PROCESS, "0", written)
    assert done.returncode == 0
    assert written.read_text() == "done"
    assert "torn down" in done.stdout


def test_collection_is_paused_while_torch_imports_then_runs_on_what_comes_after():
    done = run_python("-c", """
import gc, sys
from nncli.process import pause_collection_until_torch_imported
assert "torch" not in sys.modules
pause_collection_until_torch_imported()
assert not gc.isenabled()
import torch
assert gc.isenabled() and gc.get_freeze_count() > 50_000, gc.get_freeze_count()
print("frozen", gc.get_freeze_count())
""")
    ok(done)
    assert done.stdout.startswith("frozen")


def test_collection_resumes_after_a_module_that_fails_to_import(tmp_path, monkeypatch):
    import gc
    import sys

    from nncli.process import _ResumeCollectionAfterImport

    (tmp_path / "fails_on_import.py").write_text("raise RuntimeError('broken')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    finder = _ResumeCollectionAfterImport("fails_on_import")
    gc.disable()
    sys.meta_path.insert(0, finder)
    try:
        with pytest.raises(RuntimeError, match="broken"):
            import fails_on_import  # noqa: F401
        assert gc.isenabled() and finder not in sys.meta_path
    finally:
        gc.unfreeze()
        gc.enable()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_output_that_cannot_be_written_fails_the_command():
    """Printed output is flushed at the end: a full disk must fail the command, not exit 0 with
    nothing written (the interpreter's own exit says so, with status 120)."""
    env = {k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"}  # buffered, as a user's stdout is
    with open("/dev/full", "w") as full:
        done = subprocess.run(nncli_argv("--version"), stdout=full, stderr=subprocess.PIPE, text=True,
                              env=env, cwd=REPO, timeout=120)
    assert done.returncode == 1
    assert "error: cannot write the output: No space left on device" in done.stderr


LOGGING_PLUGIN = """
from torch import nn

import nncli

LOG = open(__file__ + ".log", "w")  # never closed: the interpreter's teardown would write it


@nncli.register_layer(name="Logged")
class Logged(nn.Module):
    def forward(self, x):
        print("forward", tuple(x.shape), file=LOG)
        return x
"""


def test_what_a_plugin_left_in_an_open_file_is_written_before_the_process_ends(tmp_path):
    (tmp_path / "logging_plugin.py").write_text(LOGGING_PLUGIN)
    config = write_config(tmp_path, TINY_REGRESSION.replace(
        "seed: 0", "seed: 0\nplugins: [logging_plugin.py]").replace(
        "    - {type: Linear", "    - Logged\n    - {type: Linear"))
    ok(run_nncli("train", config, "--out", tmp_path / "runs", "-q"))
    lines = (tmp_path / "logging_plugin.py.log").read_text().splitlines()
    assert len(lines) >= 3 * 3 and all(line.startswith("forward") for line in lines)  # 3 epochs' steps
