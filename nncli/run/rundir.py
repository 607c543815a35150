"""The run directory: claimed by one run, and locked while a process trains in it.

- `claim_run_dir` makes `<base>/<name>` (or `<name>-2`, ...) and takes it atomically: two runs
  started at the same instant never share a directory.
- `lock_run_dir` holds an OS lock on `<run>/.lock` while a process trains there, so a second
  `resume` of the same run stops at once instead of writing over the first one's results. The OS
  drops the lock when the process ends, however it ends (`kill -9` too): a lock is never stale.
"""
from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from nncli.errors import ConfigError, RunError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here; runs are then not guarded against a second process
    fcntl = None

LOCK_FILE = ".lock"


class RunLock:
    """The lock on one run directory, held until `release` (or the process's end)."""

    def __init__(self, fd: int | None, run_dir: Path) -> None:
        self.fd, self.run_dir = fd, run_dir

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the file drops its lock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _locked(fd: int) -> bool:
    """Take the lock on `fd` without waiting; False when another process holds it. POSIX record
    locks (lockf), not flock: a forked child (a DataLoader worker) does not inherit them, so the
    lock goes the moment the training process dies."""
    if fcntl is None:
        return True
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    return True


def _holder(run_dir: Path) -> str:
    """'process 1234 on host h', as the holder wrote it into the lock file."""
    try:
        pid, _, host = (run_dir / LOCK_FILE).read_text().strip().partition(" ")
    except OSError:
        return "another process"
    return f"process {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


def _in_use(run_dir: Path) -> RunError:
    return RunError(f"the run is in use: {_holder(run_dir)} is training in it", file=str(run_dir),
                    hint="Wait for it to finish, or stop it (Ctrl-C) and resume again.")


def check_not_in_use(run_dir: Path) -> None:
    """Stop at once when another process trains in the run directory; changes nothing (the lock
    is tried and let go). `lock_run_dir` takes it for good before the first write."""
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR)
    except OSError:
        return  # no lock file (a run of an earlier nncli), or not writable: lock_run_dir says so
    try:
        if fcntl is not None:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno in (errno.EACCES, errno.EAGAIN):
                    raise _in_use(run_dir) from None
                raise
    finally:
        os.close(fd)


def lock_run_dir(run_dir: Path) -> RunLock:
    """Lock an existing run directory for this process, or stop, touching nothing, when another
    process trains in it (exit 1) or it cannot be written (exit 2)."""
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise ConfigError(f"cannot write in the run directory: {err.strerror or err}", file=str(run_dir),
                          hint="Resume it from a copy in a folder you can write to.") from None
    if not _locked(fd):
        os.close(fd)
        raise _in_use(run_dir)
    if not os.access(run_dir, os.W_OK):
        os.close(fd)
        raise ConfigError("cannot write in the run directory (it is read-only)", file=str(run_dir),
                          hint="Resume it from a copy in a folder you can write to.")
    return RunLock(fd, run_dir)


def claim_run_dir(base: Path, name: str) -> tuple[Path, RunLock]:
    """`<base>/<name>`, else `<name>-2`, `<name>-3`, ...: the first that this process can claim, and
    its lock. A directory is claimed by creating its lock file, which only one process can do; an
    existing directory is taken only while empty, so an earlier run is never overwritten."""
    n = 1
    while True:
        candidate = base / (name if n == 1 else f"{name}-{n}")
        n += 1
        try:
            candidate.mkdir(parents=True)
        except FileExistsError:
            if not base.is_dir():  # a file where a folder above the run directory should be
                raise _not_a_folder(candidate) from None
            if not candidate.is_dir() or any(candidate.iterdir()):
                continue  # a file, an earlier run, or a directory claimed a moment ago
        except NotADirectoryError:
            raise _not_a_folder(candidate) from None
        except OSError as err:  # a place the user cannot write to is bad input; a full disk is not
            error = (ConfigError if err.errno in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS)
                     else RunError)
            raise error(f"cannot create the run directory: {err.strerror or err}", file=str(candidate),
                        hint="Give --out (or checkpoint.dir) a folder you can write to."
                        if error is ConfigError else None) from None
        try:
            fd = os.open(candidate / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue  # another run claimed it first
        except OSError as err:
            raise ConfigError(f"cannot write in the run directory: {err.strerror or err}",
                              file=str(candidate)) from None
        _locked(fd)  # nobody else can hold it yet: the file is new
        return candidate, RunLock(fd, candidate)


def _not_a_folder(candidate: Path) -> ConfigError:
    blocker = next((p for p in [candidate, *candidate.parents] if p.exists() and not p.is_dir()), candidate)
    return ConfigError(f"cannot create the run directory {candidate}: {blocker} is a file",
                       file=str(blocker), hint="Give --out (or checkpoint.dir) a folder.")
