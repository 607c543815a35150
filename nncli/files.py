"""Writing files so that a crash at any instant leaves the previous file or the new one, never a
broken one: to a temporary file beside it, fsynced, then renamed over it. Checkpoints, config.yaml
and metrics.csv are written this way."""
from __future__ import annotations

import os
import re
from pathlib import Path

from nncli.errors import RunError


def write_text_atomic(text: str, path: Path) -> None:
    """The same guarantee as `write_atomic`, for small text files (config.yaml, metrics.csv)."""
    write_atomic(text.encode("utf-8"), path)


def temporary_path(path: Path) -> Path:
    """Where `path` is written before `commit` renames it into place (`remove_stale_temporaries`
    finds what a killed writer left there)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def commit(tmp: Path, path: Path) -> None:
    """Make the finished file `tmp` (from `temporary_path(path)`) `path`: fsynced, renamed over
    it, the folder fsynced. OSError when it cannot."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(Path(path).parent)


def write_atomic(data: bytes | memoryview, path: Path) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, `os.replace` it over `path`
    and fsync the folder: `path` is always either the old or the new file."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        commit(tmp, path)
    except OSError as err:
        remove_quietly(tmp)
        raise RunError(f"cannot write {path}: {err.strerror or err}; the previous file, if any, "
                       "is unchanged", file=str(path)) from None
    except BaseException:
        remove_quietly(tmp)
        raise


def remove_quietly(path: Path) -> None:
    """Delete a temporary file if it is there. Failing to must not hide why the write failed: a
    read-only file system refuses even to delete a file that does not exist."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_TEMPORARY = re.compile(r"^\..+\.(\d+)\.tmp$")  # write_atomic's `.<name>.<pid>.tmp`


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files that a writer killed mid-write (kill -9, power loss) left in
    `folder`; files of a process still running, and every finished file, are left alone."""
    removed = []
    for path in Path(folder).glob(".*.tmp"):
        found = _TEMPORARY.match(path.name)
        if found is None or not path.is_file() or _process_exists(int(found.group(1))):
            continue
        try:
            path.unlink()
        except OSError:
            continue
        removed.append(path)
    return removed


def _process_exists(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill(pid, 0) would end the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    return True
