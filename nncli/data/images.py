"""Image files: a folder of class folders (`root/<class>/<image>`, the `images` source), and the
files `predict` is given, decoded with Pillow (the `images` extra).

Decoded once, in threads (Pillow releases the GIL while it decodes and resizes), into one uint8
array (N, C, H, W): a quarter of float32's size, converted to floats in [0, 1] a batch at a time
on the training device. With a cache, the array is written to an `.npy` file beside the folder
as it is decoded (so the folder may be larger than memory) and mapped from it, read again
while no file of the folder has changed.
"""
from __future__ import annotations

import hashlib
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nncli.data.samples import map_npy, usable_cpus
from nncli.errors import first_line
from nncli.files import commit, remove_quietly, temporary_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
CHANNELS = {"RGB": 3, "L": 1}  # Pillow's modes: what each image is converted to
PROGRESS_FROM = 1000  # images: fewer decode in about a second, without a progress bar
IMAGES_PER_TASK = 64  # a thread's share at a time: few enough tasks, an even spread
CACHE_VERSION = 1  # part of the cache's key: a new layout of the file makes old caches stale


class ImageProblem(ValueError):
    """Images that cannot be read as asked: a missing Pillow, a folder without class folders, a
    file that does not decode. `hint` says what to do; the caller names the config key or option."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


def pillow() -> Any:
    """PIL.Image; an ImageProblem naming the extra that installs it when Pillow is missing."""
    try:
        from PIL import Image
    except ImportError:
        raise ImageProblem("reading images needs Pillow, which is not installed",
                           hint="Install it with: pip install 'nncli[images]'.") from None
    return Image


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def images_under(folder: Path) -> list[Path]:
    """The image files in `folder` and its subfolders, hidden ones left out, sorted by path."""
    found = []
    for parent, folders, files in os.walk(folder, followlinks=True):
        folders[:] = [name for name in folders if not name.startswith(".")]
        found += [Path(parent) / name for name in files if is_image_file(Path(name))]
    return sorted(found)


@dataclass
class Folder:
    """An image folder's listing: its classes (the folder names, sorted) and each image's class."""

    root: Path
    classes: list[str]
    files: list[Path]
    labels: list[int]  # an index into `classes` per file


def list_folder(root: Path) -> Folder:
    """The class folders of `root` and the images in each (in their subfolders too), sorted."""
    if not root.is_dir():
        raise ImageProblem(f"{root} is not a folder" if root.exists() else f"folder {root} not found",
                           hint="Give the folder that holds one folder per class (paths are relative to "
                                "the config file).")
    classes = sorted(entry.name for entry in root.iterdir()
                     if entry.is_dir() and not entry.name.startswith("."))
    loose = [entry for entry in root.iterdir() if entry.is_file() and is_image_file(entry)]
    if not classes:
        found = f" ({len(loose)} images lie in it directly)" if loose else ""
        raise ImageProblem(f"{root} has no class folders{found}; expected one folder per class, "
                           f"{root}/<class>/<image>", hint="Put each class's images in a folder named "
                                                            "after the class.")
    if loose:
        warnings.warn(f"{root}: {len(loose)} image files lie outside the class folders and are left out "
                      f"(e.g. {loose[0].name})")
    files, labels = [], []
    for index, name in enumerate(classes):
        images = images_under(root / name)
        if not images:
            raise ImageProblem(f"class folder {root / name} holds no images ({', '.join(IMAGE_SUFFIXES)})",
                               hint="Remove the folder, or add its images.")
        files += images
        labels += [index] * len(images)
    return Folder(root, classes, files, labels)


def image_shape(files: Sequence[Path], mode: str, size: tuple[int, int] | None) -> tuple[int, int, int]:
    """(channels, height, width) of the decoded images: `size` (height, width) when given, else
    the first file's (read from its header)."""
    if size is None:
        with _opened(files[0]) as image:
            size = (image.height, image.width)
    return (CHANNELS[mode], *size)


def decode_images(files: Sequence[Path], mode: str, size: tuple[int, int] | None,
                  out: np.ndarray | None = None) -> np.ndarray:
    """Every file decoded, converted to `mode` and resized to `size` (height, width; None: each
    must have the first one's size) into `out` (a new array, or a memory map being written):
    uint8 (N, C, H, W). In threads, with a progress bar on a terminal for large folders."""
    shape = image_shape(files, mode, size)
    if out is None:
        out = np.empty((len(files), *shape), dtype=np.uint8)

    def decode_range(start: int) -> int:
        end = min(start + IMAGES_PER_TASK, len(files))
        for i in range(start, end):
            out[i] = decode_file(files[i], mode, shape[1:], resize=size is not None, first=files[0])
        return end - start

    starts = range(0, len(files), IMAGES_PER_TASK)
    with _progress(len(files)) as advance, ThreadPoolExecutor(min(len(starts), usable_cpus())) as pool:
        pending = {pool.submit(decode_range, start) for start in starts}
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            failed = [future for future in done if future.exception() is not None]
            if failed:  # the rest are not decoded: say what is wrong at once
                for future in pending:
                    future.cancel()
                raise failed[0].exception()
            advance(sum(future.result() for future in done))
    return out


def decode_file(path: Path, mode: str, size: tuple[int, int], *, resize: bool,
                first: Path | None = None) -> np.ndarray:
    """One image as uint8 (C, H, W) in `mode`: resized to `size` (height, width) when `resize`,
    else it must have that size (the size of `first`, for the message)."""
    with _opened(path) as image:
        image = image.convert(mode)  # decodes the file
        if (image.height, image.width) != tuple(size):
            if not resize:
                raise ImageProblem(f"{path} is {image.height}x{image.width} (height x width) but "
                                   f"{first or 'the model'} is {size[0]}x{size[1]}",
                                   hint="Add size: [height, width] to resize every image as it is read.")
            image = image.resize((size[1], size[0]), pillow().Resampling.BILINEAR)
        pixels = np.asarray(image)
    return pixels.transpose(2, 0, 1) if pixels.ndim == 3 else pixels[None]


@contextmanager
def _opened(path: Path) -> Iterator[Any]:
    """A Pillow image of `path`; whatever fails while it is open (Pillow raises
    UnidentifiedImageError, OSError, SyntaxError, ... for a damaged file) names the file."""
    try:
        with pillow().open(path) as image:
            yield image
    except ImageProblem:
        raise
    except Exception as err:
        raise ImageProblem(f"{path} cannot be decoded as an image ({first_line(err)})",
                           hint="Remove or replace the file.") from None


@contextmanager
def _progress(total: int) -> Iterator[Callable[[int], None]]:
    """A transient progress bar on stderr while a large folder decodes (on a terminal only: a log
    gets nothing); yields the function that advances it."""
    if total < PROGRESS_FROM or not sys.stderr.isatty():
        yield lambda done: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(f"decoding {total:,} images", total=total)
        yield lambda done: progress.advance(task, done)


# --- the cache beside a folder ----------------------------------------------------------------------

def cache_key(folder: Folder, mode: str, size: tuple[int, int] | None) -> str:
    """What the decoded array depends on: every file's path, size and modification time, the
    mode and the size asked for. Another value means the cache is stale."""
    digest = hashlib.sha256(f"{CACHE_VERSION} {mode} {size}\n".encode())
    for path in folder.files:
        stat = path.stat()
        digest.update(f"{path.relative_to(folder.root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def cache_path(root: Path, key: str) -> Path:
    return root.with_name(f"{root.name}.nncli-cache-{key}.npy")


def cached_images(folder: Folder, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    """The folder's images, memory-mapped from the cache beside it: the one written for the same
    files and settings, else a new one, decoded straight into the file, replacing older caches of
    the folder. A folder beside which nothing can be written is decoded into memory, with a warning."""
    key = cache_key(folder, mode, size)
    path = cache_path(folder.root, key)
    shape = (len(folder.files), *image_shape(folder.files, mode, size))
    if path.is_file():
        try:
            images = map_npy(path)
            if images.shape == shape and images.dtype == np.uint8:
                return images
        except (OSError, ValueError):  # a damaged cache is decoded again
            pass
    tmp = temporary_path(path)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
    except OSError as err:
        warnings.warn(f"cannot write the image cache {path} ({err.strerror or err}); the images are "
                      "decoded into memory instead")
        return decode_images(folder.files, mode, size)
    try:
        decode_images(folder.files, mode, size, out)
        out.flush()
        del out
        commit(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    prefix = f"{folder.root.name}.nncli-cache-"
    for stale in folder.root.parent.iterdir():
        if stale.name.startswith(prefix) and stale.suffix == ".npy" and stale != path:
            remove_quietly(stale)
    return map_npy(path)
