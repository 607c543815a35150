"""Data augmentation on whole batches, on the training device: torchvision.transforms.v2's
names, arguments and semantics, applied per sample without a Python loop over the samples.

Every transform is a small plain class. Its constructor takes torchvision.transforms.v2's
arguments (names, defaults, annotations that nncli checks a config against); calling it applies
it to a batch::

    crop = RandomCrop(32, padding=4)
    crop.check((3, 32, 32))        # before training: ValueError for a crop larger than the image
    x = crop(x, generator)         # x: (N, C, H, W) float, on any device

Randomness: every random number is drawn from `generator`, a `torch.Generator` on the CPU (the
run's own, seeded and saved in checkpoints), then the few small parameter tensors (offsets,
masks, factors) are moved to `x`'s device. So the CPU and a GPU draw the same parameters, a run
touches neither torch's global generator nor the GPU's, and restoring the generator's state
(`get_state()` / `set_state()`) replays the same augmentation: resume stays bit-exact. How many
numbers a batch draws depends on its shape only, never on its values or device.

Why plain classes and not `nn.Module`s: a transform has no weights or buffers to save, move or
train (its state is the run's generator), and it must never end up in a model's `state_dict`,
its `.to()`, or its train/eval switch; nncli applies a `Pipeline` to training batches only.

MixUp and CutMix are batch-level (`batch_level = True`): they take the labels too and return soft
targets, class probabilities of shape (N, classes), which `nn.CrossEntropyLoss` accepts.

`TRANSFORMS` maps each name to its class; each class carries its facts (`batch_level`,
`needs_images`, `draws_random`) as class attributes. `create_pipeline` builds a config's
`data.augment` list through the `AUGMENTATIONS` registry, checked as every other section is.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from nncli.arguments import create
from nncli.registry import Registry

if TYPE_CHECKING:
    from nncli.config import Config

Shape = tuple[int, ...]  # one sample's shape, without the batch dimension


class AugmentationError(ValueError):
    """A transform that cannot apply to this data or these arguments. `key` names the argument at
    fault when there is one ("size", "p"), and `index` the transform's place in a `Pipeline`, so
    that the caller can point at the config's line."""

    def __init__(self, message: str, key: str | None = None, index: int | None = None) -> None:
        super().__init__(message)
        self.key, self.index = key, index


# --- the base classes -------------------------------------------------------------------------

class Transform:
    """A per-sample transform: `transform(x, generator)` -> the batch with each sample transformed
    independently (its own random parameters)."""

    batch_level = False  # True: mixes samples and labels, called as (x, y, generator, num_classes)
    needs_images = True  # samples must be images (C, H, W)
    draws_random = True  # draws from the generator (Normalize does not)

    @property
    def name(self) -> str:
        return type(self).__name__

    def check(self, shape: Shape, num_classes: int | None = None) -> Shape:
        """Raise an AugmentationError when the transform cannot apply to samples of `shape`
        (without the batch dimension; `num_classes`: the model's, for MixUp and CutMix); return
        the samples' shape after it."""
        if self.needs_images and len(shape) != 3:
            raise AugmentationError(
                f"{self.name} needs images, samples of shape (channels, height, width); this data's "
                f"samples have shape {tuple(shape)}")
        return tuple(shape)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        # the constructor's arguments, as stored (normalized: size 32 shows as (32, 32))
        args = ", ".join(f"{n}={getattr(self, n)!r}" for n in inspect.signature(type(self)).parameters
                         if hasattr(self, n))
        return f"{self.name}({args})"


class BatchTransform(Transform):
    """A batch-level transform: mixes samples and their labels (MixUp, CutMix)."""

    batch_level = True

    def __init__(self, alpha: float, num_classes: int | None) -> None:
        if not (isinstance(alpha, (int, float)) and alpha > 0 and math.isfinite(alpha)):
            raise AugmentationError(f"{self.name}'s alpha must be a positive number, got {alpha!r}", "alpha")
        if num_classes is not None and not num_classes > 0:
            raise AugmentationError(f"{self.name}'s num_classes must be positive, got {num_classes!r}",
                                    "num_classes")
        self.alpha, self.num_classes = float(alpha), num_classes

    def check(self, shape: Shape, num_classes: int | None = None) -> Shape:
        shape = super().check(shape)
        if num_classes is None and self.num_classes is None:
            raise AugmentationError(f"{self.name} mixes class labels: it needs a classification "
                                    "task (CrossEntropyLoss) and its number of classes")
        if num_classes is not None and self.num_classes is not None and num_classes != self.num_classes:
            raise AugmentationError(f"{self.name}'s num_classes is {self.num_classes} but the model "
                                    f"has {num_classes} classes", "num_classes")
        return shape

    def __call__(self, x: Tensor, y: Tensor, generator: torch.Generator,  # type: ignore[override]
                 num_classes: int | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _soft_targets(self, y: Tensor, num_classes: int | None, dtype: torch.dtype) -> Tensor:
        """Labels as class probabilities (N, classes): class indices become one-hot rows; soft
        targets already (from an earlier MixUp, say) are kept."""
        if y.dim() == 2 and y.is_floating_point():
            return y.to(dtype)
        classes = num_classes or self.num_classes
        if y.dim() != 1 or y.is_floating_point() or classes is None:
            raise AugmentationError(f"{self.name} needs class indices (N,) and the number of classes, "
                                    f"or soft targets (N, classes); got labels of shape {tuple(y.shape)} "
                                    f"and type {y.dtype}")
        # scatter, not F.one_hot: one_hot checks the labels' range, a wait for the GPU every batch
        return torch.zeros(len(y), classes, dtype=dtype, device=y.device).scatter_(1, y[:, None], 1.0)


# --- helpers ------------------------------------------------------------------------------------

def _pair(value: int | Sequence[int], name: str, owner: str) -> tuple[int, int]:
    """torchvision's size convention: an int is a square, a sequence is (height, width)."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) == 1:
        pair = (pair[0], pair[0])
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise AugmentationError(f"{owner}'s {name} must be a positive integer or a list of 2, got {value!r}",
                                name)
    return pair


def _probability(p: float, owner: str) -> float:
    if not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 1):
        raise AugmentationError(f"{owner}'s p must be a probability between 0 and 1, got {p!r}", "p")
    return float(p)


def _range(value: Sequence[float], name: str, owner: str, low: float = 0.0,
           high: float = math.inf) -> tuple[float, float]:
    """A (min, max) argument such as scale or ratio. torchvision only warns when it is reversed;
    nncli refuses it, as it refuses any other config mistake."""
    pair = tuple(value)
    numbers = len(pair) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair)
    if not numbers or not low <= pair[0] <= pair[1] <= high:
        bounds = f" within [{low:g}, {high:g}]" if math.isfinite(high) else f" from {low:g} up"
        raise AugmentationError(f"{owner}'s {name} must be (min, max) with min <= max{bounds}, "
                                f"got {value!r}", name)
    return float(pair[0]), float(pair[1])


def _uniform(generator: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> Tensor:
    """float32 draws in [low, high), as torchvision's `torch.empty(1).uniform_(low, high)`."""
    return torch.empty(shape).uniform_(low, high, generator=generator)


def _integers_below(generator: torch.Generator, bound: Tensor) -> Tensor:
    """One uniform integer in [0, bound[n]) per sample, for bounds that differ between samples
    (torch.randint takes one bound only). float64, so the bias is negligible for image sizes."""
    return (torch.rand(bound.shape, generator=generator, dtype=torch.float64) * bound).floor().long()


def _first_valid_attempt(valid: Tensor) -> tuple[Tensor, Tensor]:
    """torchvision tries up to 10 random boxes per sample and keeps the first that fits; here all
    10 are drawn at once (N, 10). Returns the index of the first valid attempt, and whether any was."""
    return valid.int().argmax(1), valid.any(1)  # argmax returns the first of equal maxima


def _fold(index: Tensor, size: int, mode: str) -> Tensor:
    """Map positions outside [0, size) back into the image, as padding of that mode would:
    'edge' repeats the border pixel, 'reflect' mirrors without repeating it (d c b | a b c d),
    'symmetric' mirrors repeating it (c b a | a b c d)."""
    if mode == "edge" or size == 1:
        return index.clamp(0, size - 1)
    if mode == "reflect":
        period = 2 * (size - 1)
        index = index.abs() % period
        return torch.where(index >= size, period - index, index)
    period = 2 * size  # symmetric
    index = torch.where(index < 0, -index - 1, index) % period
    return torch.where(index >= size, period - 1 - index, index)


def _gather_rows_cols(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """out[n, c, a, b] = x[n, c, rows[n, a], cols[n, b]]: a per-sample crop (or flip, or padding
    by index) by two gathers, rows then columns."""
    n, c = x.shape[:2]
    x = x.gather(2, rows[:, None, :, None].expand(n, c, rows.shape[1], x.shape[3]))
    return x.gather(3, cols[:, None, None, :].expand(n, c, rows.shape[1], cols.shape[1]))


def _on(t: Tensor, x: Tensor) -> Tensor:
    """A small tensor made on the CPU (drawn parameters), on x's device, in x's dtype if floating.
    To a GPU through pinned memory, without blocking: a plain .to() from pageable memory makes
    the CPU wait for the GPU's queued work, every transform of every batch."""
    dtype = x.dtype if t.is_floating_point() else t.dtype
    if x.device.type == "cuda":
        return t.to(dtype).pin_memory().to(x.device, non_blocking=True)
    return t.to(x.device, dtype)


def _per_sample(mask: Tensor, x: Tensor) -> Tensor:
    """A per-sample (N,) tensor shaped to broadcast against x (N, ...), on x's device."""
    return _on(mask, x).view(-1, *([1] * (x.dim() - 1)))


# --- geometric transforms -------------------------------------------------------------------

PADDING_MODES = ("constant", "edge", "reflect", "symmetric")


class RandomCrop(Transform):
    """Crop each sample at a random place, after padding it (torchvision.transforms.v2.RandomCrop).

    As torchvision: `padding` is one int for all sides, (left/right, top/bottom) or (left, top,
    right, bottom); `pad_if_needed` pads an image smaller than `size` by the difference on both
    sides; the top offset, then the left one, is uniform over the positions where the crop fits
    the padded image. Differs: `fill` is one number (torchvision also takes one per channel).
    Padding other than 'constant' is done by index arithmetic, without a padded copy.
    """

    def __init__(self, size: int | tuple[int, int],
                 padding: int | tuple[int, int] | tuple[int, int, int, int] | None = None,
                 pad_if_needed: bool = False, fill: float = 0, padding_mode: str = "constant") -> None:
        self.size = _pair(size, "size", self.name)
        self.padding = padding if padding is None or isinstance(padding, int) else tuple(padding)
        pads = [] if padding is None else [padding] if isinstance(padding, int) else list(padding)
        if len(pads) not in (0, 1, 2, 4) or not all(isinstance(v, int) and v >= 0 for v in pads):
            raise AugmentationError(f"RandomCrop's padding must be an integer >= 0 or a list of 1, 2 or 4 of "
                                    f"them, got {padding!r}", "padding")
        if padding_mode not in PADDING_MODES:
            raise AugmentationError(f"RandomCrop's padding_mode must be one of {', '.join(PADDING_MODES)}, "
                                    f"got {padding_mode!r}", "padding_mode")
        if len(pads) == 1:  # (left, top, right, bottom), torchvision's order
            pads = pads * 4
        elif len(pads) == 2:  # (left and right, top and bottom)
            pads = [pads[0], pads[1], pads[0], pads[1]]
        self._pads = tuple(pads) if pads else (0, 0, 0, 0)
        self.pad_if_needed, self.fill, self.padding_mode = pad_if_needed, float(fill), padding_mode

    def _padding_for(self, height: int, width: int) -> tuple[int, int, int, int]:
        left, top, right, bottom = self._pads
        h, w = self.size
        if self.pad_if_needed:  # as torchvision: the missing rows (columns) added on both sides
            missing_h, missing_w = max(0, h - (height + top + bottom)), max(0, w - (width + left + right))
            top, bottom = top + missing_h, bottom + missing_h
            left, right = left + missing_w, right + missing_w
        return left, top, right, bottom

    def check(self, shape: Shape, num_classes: int | None = None) -> Shape:
        channels, height, width = super().check(shape)
        left, top, right, bottom = self._padding_for(height, width)
        h, w = self.size
        if h > height + top + bottom or w > width + left + right:
            padded = f" ({height}x{width} with padding)" if any(self._pads) else ""
            raise AugmentationError(f"RandomCrop's size {h}x{w} is larger than the image, "
                                    f"{height + top + bottom}x{width + left + right}{padded}", "size")
        if self.padding_mode == "reflect" and (max(top, bottom) >= height or max(left, right) >= width):
            raise AugmentationError(f"RandomCrop's reflect padding must be smaller than the image "
                                    f"({height}x{width}), got {self._pads}", "padding")
        return channels, h, w

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        n, _, height, width = x.shape
        left, top, right, bottom = self._padding_for(height, width)
        h, w = self.size
        i = torch.randint(0, height + top + bottom - h + 1, (n,), generator=generator)
        j = torch.randint(0, width + left + right - w + 1, (n,), generator=generator)
        rows, cols = i[:, None] + torch.arange(h), j[:, None] + torch.arange(w)  # in the padded image
        if self.padding_mode == "constant":
            x = F.pad(x, (left, right, top, bottom), value=self.fill)
        else:  # the padded image's rows and columns as the original's, by index arithmetic
            rows = _fold(rows - top, height, self.padding_mode)
            cols = _fold(cols - left, width, self.padding_mode)
        return _gather_rows_cols(x, _on(rows, x), _on(cols, x))


class RandomHorizontalFlip(Transform):
    """Mirror each sample left-right with probability p (torchvision.transforms.v2.RandomHorizontalFlip)."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = _probability(p, self.name)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        flip = torch.rand(x.shape[0], generator=generator) < self.p
        return torch.where(_per_sample(flip, x), x.flip(-1), x)


class RandomVerticalFlip(Transform):
    """Mirror each sample upside down with probability p (torchvision.transforms.v2.RandomVerticalFlip)."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = _probability(p, self.name)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        flip = torch.rand(x.shape[0], generator=generator) < self.p
        return torch.where(_per_sample(flip, x), x.flip(-2), x)


INTERPOLATIONS = ("bilinear", "nearest")


class RandomResizedCrop(Transform):
    """Crop a random box of each sample and resize it to `size`
    (torchvision.transforms.v2.RandomResizedCrop).

    The box, as torchvision: up to 10 attempts of an area fraction uniform in `scale` and an
    aspect ratio log-uniform in `ratio`; the first that fits the image is placed uniformly; when
    none fits, the central crop of the ratio nearest the image's. The resize: exactly what
    `F.interpolate(crop, size, mode=interpolation, align_corners=False, antialias=antialias)`
    gives (torchvision's resize of float images), computed for all samples at once as two
    per-sample resampling matrices, rows (N, h, H) and columns (N, w, W): out = Rows @ x @ Colsᵀ.
    Each matrix row holds the interpolation weights of one output pixel, so the antialias filter,
    whose width depends on each sample's scale, needs no per-sample code.

    Differs: `interpolation` is 'bilinear' (the default) or 'nearest' only; the matrices cost
    O(H·W·(H+W)) per channel, fine for small images (10 ms for 512 x 3 x 32 x 32 on 2 CPU
    cores), slow for large ones on a CPU. The result equals F.interpolate's up to float rounding (1e-6).
    """

    def __init__(self, size: int | tuple[int, int], scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0), interpolation: str = "bilinear",
                 antialias: bool = True) -> None:
        self.size = _pair(size, "size", self.name)
        self.scale = _range(scale, "scale", self.name, 0.0, 1.0)
        self.ratio = _range(ratio, "ratio", self.name)
        if self.ratio[0] <= 0:
            raise AugmentationError(f"RandomResizedCrop's ratio must be positive, got {ratio!r}", "ratio")
        if str(interpolation).lower() not in INTERPOLATIONS:
            raise AugmentationError(f"RandomResizedCrop's interpolation must be one of "
                                    f"{', '.join(INTERPOLATIONS)}, got {interpolation!r}", "interpolation")
        self.interpolation, self.antialias = str(interpolation).lower(), bool(antialias)

    def check(self, shape: Shape, num_classes: int | None = None) -> Shape:
        channels, _, _ = super().check(shape)
        return channels, *self.size

    def boxes(self, n: int, height: int, width: int, generator: torch.Generator) -> tuple[Tensor, ...]:
        """Each sample's crop box (top, left, height, width), int64 tensors (N,) on the CPU."""
        area = height * width
        # torchvision computes in Python floats (float64) from float32 draws; so does this
        target_area = area * _uniform(generator, (n, 10), *self.scale).double()
        log_ratio = torch.log(torch.tensor(self.ratio))
        aspect = torch.exp(_uniform(generator, (n, 10), log_ratio[0].item(), log_ratio[1].item())).double()
        w = torch.round(torch.sqrt(target_area * aspect)).long()
        h = torch.round(torch.sqrt(target_area / aspect)).long()
        first, found = _first_valid_attempt((w > 0) & (w <= width) & (h > 0) & (h <= height))
        h, w = h.gather(1, first[:, None])[:, 0], w.gather(1, first[:, None])[:, 0]
        top, left = _integers_below(generator, height - h + 1), _integers_below(generator, width - w + 1)
        # no attempt fitted: torchvision's fallback, the central crop of the ratio nearest the image's
        in_ratio = width / height
        fw, fh = width, height
        if in_ratio < self.ratio[0]:
            fh = round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            fw = round(height * self.ratio[1])
        h, w = torch.where(found, h, fh), torch.where(found, w, fw)
        top, left = torch.where(found, top, (height - fh) // 2), torch.where(found, left, (width - fw) // 2)
        return top, left, h, w

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        n, _, height, width = x.shape
        top, left, h, w = (_on(t, x) for t in self.boxes(n, height, width, generator))
        dtype = torch.promote_types(x.dtype, torch.float32)  # weights in float32 at least (half on a GPU)
        rows = self._weights(top, h, self.size[0], height, dtype)   # (N, out_h, H)
        cols = self._weights(left, w, self.size[1], width, dtype)   # (N, out_w, W)
        # out[n, c] = rows[n] @ x[n, c] @ cols[n]ᵀ; einsum picks the cheapest order of the products
        return torch.einsum("nyh,nchw,nxw->ncyx", rows, x.to(dtype), cols).to(x.dtype)

    def _weights(self, start: Tensor, length: Tensor, out: int, size: int, dtype: torch.dtype) -> Tensor:
        """(N, out, size): row o holds the weights F.interpolate gives the input pixels (along one
        axis) for output pixel o, when resizing pixels [start, start + length) to `out` of them."""
        # torch computes the scale and the source positions in float32 (see UpSample.h); so does this
        scale = (length.float() / out)[:, None, None]                     # (N, 1, 1)
        o = torch.arange(out, device=start.device, dtype=torch.float32)[None, :, None]
        k = (torch.arange(size, device=start.device) - start[:, None])[:, None, :]  # pixel, from the box
        inside = (k >= 0) & (k < length[:, None, None])
        k = k.float()
        if self.interpolation == "nearest":  # torch's 'nearest': floor(o * scale), no antialias
            src = torch.minimum(torch.floor(o * scale), length[:, None, None].float() - 1)
            return (k == src).to(dtype)
        if self.antialias:
            # torch's antialiased bilinear: a triangle filter as wide as the scale when shrinking,
            # centred on (o + 0.5) * scale, cut at the box's edges and normalized
            support = scale.clamp(min=1.0)
            weights = (1 - ((k - scale * (o + 0.5) + 0.5) / support).abs()).clamp(min=0) * inside
            return (weights / weights.sum(-1, keepdim=True)).to(dtype)
        # plain bilinear (align_corners=False): source position clamped into the box
        src = (scale * (o + 0.5) - 0.5).clamp(min=0)
        src = torch.minimum(src, length[:, None, None].float() - 1)
        return ((1 - (k - src).abs()).clamp(min=0) * inside).to(dtype)


# --- erasing ----------------------------------------------------------------------------------

class RandomErasing(Transform):
    """With probability p, fill a random rectangle of each sample with `value`
    (torchvision.transforms.v2.RandomErasing).

    The rectangle, as torchvision: up to 10 attempts of an area fraction uniform in `scale` and
    an aspect ratio log-uniform in `ratio`; the first strictly smaller than the image is placed
    uniformly; when none is, the sample is left as it is. `value`: a number, one per channel, or
    'random' (standard normal noise per pixel). Differs: `inplace` is accepted and changes
    nothing: the batch is never modified in place (it may be the data set's own tensor).
    """

    def __init__(self, p: float = 0.5, scale: tuple[float, float] = (0.02, 0.33),
                 ratio: tuple[float, float] = (0.3, 3.3), value: float | tuple[float, ...] | str = 0.0,
                 inplace: bool = False) -> None:
        self.p = _probability(p, self.name)
        self.scale = _range(scale, "scale", self.name, 0.0, 1.0)
        self.ratio = _range(ratio, "ratio", self.name)
        if self.ratio[0] <= 0:
            raise AugmentationError(f"RandomErasing's ratio must be positive, got {ratio!r}", "ratio")
        if isinstance(value, str) and value != "random":
            raise AugmentationError(f"RandomErasing's value must be a number, a list of them or 'random', "
                                    f"got {value!r}", "value")
        self.value = value if isinstance(value, (str, int, float)) else tuple(float(v) for v in value)
        self.inplace = inplace

    def check(self, shape: Shape, num_classes: int | None = None) -> Shape:
        shape = super().check(shape)
        if isinstance(self.value, tuple) and len(self.value) not in (1, shape[0]):
            raise AugmentationError(f"RandomErasing's value has {len(self.value)} numbers but the images "
                                    f"have {shape[0]} channels", "value")
        return shape

    def rectangles(self, n: int, height: int, width: int, generator: torch.Generator) -> tuple[Tensor, ...]:
        """Each sample's rectangle (top, left, height, width) and whether it is erased; CPU tensors (N,)."""
        erase = torch.rand(n, generator=generator) < self.p  # torchvision draws p first
        area = height * width
        erase_area = area * _uniform(generator, (n, 10), *self.scale).double()
        log_ratio = torch.log(torch.tensor(self.ratio))
        aspect = torch.exp(_uniform(generator, (n, 10), log_ratio[0].item(), log_ratio[1].item())).double()
        h = torch.round(torch.sqrt(erase_area * aspect)).long()
        w = torch.round(torch.sqrt(erase_area / aspect)).long()
        first, found = _first_valid_attempt((h < height) & (w < width))
        h, w = h.gather(1, first[:, None])[:, 0], w.gather(1, first[:, None])[:, 0]
        top, left = _integers_below(generator, height - h + 1), _integers_below(generator, width - w + 1)
        return top, left, h, w, erase & found

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        n, _, height, width = x.shape
        top, left, h, w, erase = (_on(t, x) for t in self.rectangles(n, height, width, generator))
        rows = torch.arange(height, device=x.device) - top[:, None]        # (N, H), from the top edge
        cols = torch.arange(width, device=x.device) - left[:, None]
        inside = (((rows >= 0) & (rows < h[:, None]))[:, :, None]
                  & ((cols >= 0) & (cols < w[:, None]))[:, None, :])
        mask = (inside & erase[:, None, None])[:, None]                    # (N, 1, H, W)
        if self.value == "random":  # drawn for every pixel, on the CPU, so that devices agree
            value = _on(torch.randn(x.shape, generator=generator), x)
        elif isinstance(self.value, tuple):
            value = _on(torch.tensor(self.value), x).view(-1, 1, 1)
        else:
            value = _on(torch.tensor(float(self.value)), x)
        return torch.where(mask, value, x)


# --- colour -----------------------------------------------------------------------------------

def _grayscale(x: Tensor) -> Tensor:
    """torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma), (N, 1, H, W)."""
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b)[:, None]


def _jitter_range(value: float | Sequence[float] | None, name: str) -> tuple[float, float] | None:
    """torchvision's ColorJitter._check_input for brightness, contrast and saturation: a number v
    means [max(0, 1 - v), 1 + v]; (min, max) is taken as it is; None, or a range that is exactly
    (1, 1), means off."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise AugmentationError(f"ColorJitter's {name} must be >= 0, got {value!r}", name)
        value = (max(1.0 - value, 0.0), 1.0 + value)
    low, high = _range(value, name, "ColorJitter")
    return None if low == high == 1.0 else (low, high)


class ColorJitter(Transform):
    """Change each sample's brightness, contrast and saturation by random factors, in a random
    order per sample (torchvision.transforms.v2.ColorJitter).

    As torchvision, for float images in [0, 1]: each operation blends the image with a
    reference by its factor f, f * x + (1 - f) * reference, clamped to [0, 1] (torchvision's
    _blend): brightness with black (so it multiplies by f), contrast with the mean of the
    sample's grayscale, saturation with its grayscale (a 1-channel image is left alone). Put it
    before Normalize: the clamp assumes pixels in [0, 1]. Differs: `hue` is not supported yet
    (it raises).
    """

    def __init__(self, brightness: float | tuple[float, float] | None = None,
                 contrast: float | tuple[float, float] | None = None,
                 saturation: float | tuple[float, float] | None = None,
                 hue: float | tuple[float, float] | None = None) -> None:
        self.brightness = _jitter_range(brightness, "brightness")
        self.contrast = _jitter_range(contrast, "contrast")
        self.saturation = _jitter_range(saturation, "saturation")
        if hue not in (None, 0, (0, 0)):
            raise AugmentationError("ColorJitter's hue is not supported by nncli yet; leave it out", "hue")
        self.hue = None
        self._ops = [(name, r) for name, r in (("brightness", self.brightness), ("contrast", self.contrast),
                                               ("saturation", self.saturation)) if r is not None]

    def check(self, shape: Shape, num_classes: int | None = None) -> Shape:
        shape = super().check(shape)
        if shape[0] not in (1, 3):  # as torchvision: grayscale needs 1 or 3 (RGB) channels
            raise AugmentationError(f"ColorJitter needs images of 1 or 3 channels, got {shape[0]}")
        return shape

    def factors(self, n: int, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        """Each sample's order of the operations (N, ops) and factors {name: (N,)}, on the CPU."""
        order = torch.rand(n, len(self._ops), generator=generator).argsort(1)  # a uniform permutation
        return order, {name: _uniform(generator, (n,), *r) for name, r in self._ops}

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        order, factors = self.factors(x.shape[0], generator)
        if not self._ops:
            return x
        names = [name for name, _ in self._ops]
        # the factor of the operation each sample applies at each step (N, steps)
        step_factors = torch.stack([factors[name] for name in names], 1).gather(1, order)
        order, step_factors = _on(order, x), _on(step_factors, x)
        for step in range(len(names)):
            op, f = _per_sample(order[:, step], x), _per_sample(step_factors[:, step], x)
            # one blend per step, with each sample's own reference: no pass per operation
            reference = torch.zeros((), dtype=x.dtype, device=x.device)  # black: brightness
            if "contrast" in names or "saturation" in names:
                gray = _grayscale(x) if x.shape[1] == 3 else x
                if "contrast" in names:
                    reference = torch.where(op == names.index("contrast"), gray.mean((1, 2, 3), keepdim=True),
                                            reference)
                if "saturation" in names:
                    reference = torch.where(op == names.index("saturation"), gray, reference)
            blended = (f * x + (1 - f) * reference).clamp(0, 1)
            if "saturation" in names and x.shape[1] == 1:  # torchvision leaves a grayscale image as it is
                blended = torch.where(op == names.index("saturation"), x, blended)
            x = blended
        return x


class Normalize(Transform):
    """(x - mean[c]) / std[c] per channel (torchvision.transforms.v2.Normalize); draws nothing.
    `mean` and `std` are one number per channel, or one for all. Differs: `inplace` is accepted
    and changes nothing (the batch is never modified in place)."""

    draws_random = False

    def __init__(self, mean: float | tuple[float, ...], std: float | tuple[float, ...],
                 inplace: bool = False) -> None:
        self.mean = (float(mean),) if isinstance(mean, (int, float)) else tuple(float(m) for m in mean)
        self.std = (float(std),) if isinstance(std, (int, float)) else tuple(float(s) for s in std)
        if not self.mean or not self.std:
            raise AugmentationError("Normalize's mean and std need at least one number",
                                    "mean" if not self.mean else "std")
        if any(s == 0 for s in self.std):  # torchvision raises too: division by zero
            raise AugmentationError(f"Normalize's std cannot be 0, got {std!r}", "std")
        self.inplace = inplace

    def check(self, shape: Shape, num_classes: int | None = None) -> Shape:
        shape = super().check(shape)
        for key, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, shape[0]):
                raise AugmentationError(f"Normalize's {key} has {len(values)} numbers but the images have "
                                        f"{shape[0]} channels", key)
        return shape

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        mean = _on(torch.tensor(self.mean), x).view(-1, 1, 1)
        std = _on(torch.tensor(self.std), x).view(-1, 1, 1)
        return (x - mean) / std


# --- batch-level: MixUp and CutMix ------------------------------------------------------------

def _beta(alpha: float, generator: torch.Generator) -> float:
    """One draw from Beta(alpha, alpha), from `generator`: torch.distributions.Beta takes no
    generator (it draws from torch's global one), so it is built from two Gamma draws, G1 / (G1 + G2).
    torch._standard_gamma is private but is what torch.distributions.Gamma itself calls."""
    g = torch._standard_gamma(torch.full((2,), alpha, dtype=torch.float64), generator=generator)
    total = float(g.sum())
    return float(g[0]) / total if total > 0 else 0.5  # both underflowed (tiny alpha): an even mix


class MixUp(BatchTransform):
    """Blend the batch with itself shifted by one sample, labels too
    (torchvision.transforms.v2.MixUp): lam ~ Beta(alpha, alpha), one per batch;
    x = lam * x + (1 - lam) * x.roll(1, 0), and the same for the one-hot labels.

    As torchvision; differs: no `labels_getter` (nncli gives the labels), and labels that are
    soft targets already (N, classes) are accepted, so that MixUp and CutMix can both be listed
    (torchvision takes class indices only). Works on any data, not only images.
    """

    needs_images = False

    def __init__(self, alpha: float = 1.0, num_classes: int | None = None) -> None:
        super().__init__(alpha, num_classes)

    def __call__(self, x: Tensor, y: Tensor, generator: torch.Generator,  # type: ignore[override]
                 num_classes: int | None = None) -> tuple[Tensor, Tensor]:
        y = self._soft_targets(y, num_classes, x.dtype if x.is_floating_point() else torch.float32)
        lam = _beta(self.alpha, generator)
        return x.roll(1, 0) * (1 - lam) + x * lam, y.roll(1, 0) * (1 - lam) + y * lam


class CutMix(BatchTransform):
    """Paste a box of the batch shifted by one sample into each sample, mixing the labels by the
    area pasted (torchvision.transforms.v2.CutMix): lam ~ Beta(alpha, alpha), one box per batch,
    centred uniformly, of sides sqrt(1 - lam) times the image's (cut at the image's edges); the
    labels get the weight 1 - (box area / image area) for the sample's own, the rest for the pasted.

    As torchvision; differs as MixUp (no `labels_getter`, soft targets accepted).
    """

    def __init__(self, alpha: float = 1.0, num_classes: int | None = None) -> None:
        super().__init__(alpha, num_classes)

    def box(self, height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
        """The pasted box (y1, x1, y2, x2), torchvision's draws and arithmetic."""
        lam = _beta(self.alpha, generator)
        r_x = int(torch.randint(width, (), generator=generator))
        r_y = int(torch.randint(height, (), generator=generator))
        r = 0.5 * math.sqrt(1.0 - lam)
        r_w_half, r_h_half = int(r * width), int(r * height)
        return (max(r_y - r_h_half, 0), max(r_x - r_w_half, 0),
                min(r_y + r_h_half, height), min(r_x + r_w_half, width))

    def __call__(self, x: Tensor, y: Tensor, generator: torch.Generator,  # type: ignore[override]
                 num_classes: int | None = None) -> tuple[Tensor, Tensor]:
        y = self._soft_targets(y, num_classes, x.dtype if x.is_floating_point() else torch.float32)
        height, width = x.shape[-2:]
        y1, x1, y2, x2 = self.box(height, width, generator)
        out = x.clone()
        out[..., y1:y2, x1:x2] = x[..., y1:y2, x1:x2].roll(1, 0)
        lam = 1.0 - (x2 - x1) * (y2 - y1) / (width * height)  # the weight of each sample's own label
        return out, y.roll(1, 0) * (1 - lam) + y * lam


# --- the registry and the pipeline ------------------------------------------------------------

TRANSFORMS: dict[str, type[Transform]] = {cls.__name__: cls for cls in (
    RandomCrop, RandomHorizontalFlip, RandomVerticalFlip, RandomResizedCrop, RandomErasing,
    ColorJitter, Normalize, MixUp, CutMix)}


class Pipeline:
    """The transforms of `data.augment`, applied in order to training batches:
    `pipeline(x, y, generator) -> (x, y)`. Per-sample transforms change x only; batch-level ones
    (MixUp, CutMix) turn y into soft targets (N, num_classes): `soft_targets` says whether they do.
    """

    def __init__(self, transforms: Sequence[Transform], num_classes: int | None = None) -> None:
        self.transforms, self.num_classes = list(transforms), num_classes

    @property
    def soft_targets(self) -> bool:
        """Whether training targets come out as class probabilities (N, classes)."""
        return any(t.batch_level for t in self.transforms)

    def check(self, sample_shape: Shape) -> None:
        """Before training: an AugmentationError (with `index`, the transform's place in the list)
        when a transform cannot apply to samples of `sample_shape`, or when the list changes the
        samples' shape: validation, evaluation and predict see the samples unaugmented, so the
        model would get other shapes there."""
        shape, normalized = tuple(sample_shape), False
        for index, transform in enumerate(self.transforms):
            try:
                if isinstance(transform, ColorJitter) and normalized:
                    raise AugmentationError("ColorJitter clamps pixels to [0, 1]: put it before Normalize")
                shape = transform.check(shape, self.num_classes)
            except AugmentationError as err:
                err.index = index
                raise
            normalized |= isinstance(transform, Normalize)
            if shape != tuple(sample_shape):
                raise AugmentationError(
                    f"{transform.name} changes the samples' shape from {tuple(sample_shape)} to {shape}; "
                    "augmentation applies to training batches only, so validation and predict would give "
                    f"the model {tuple(sample_shape)}. Crop to the images' size", "size", index)

    def __call__(self, x: Tensor, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise TypeError("augmentation draws from a torch.Generator on the CPU (the run's own), "
                            f"got {generator!r}")
        if not x.is_floating_point():
            raise TypeError(f"augmentation needs float inputs, got {x.dtype}")
        for transform in self.transforms:
            if transform.batch_level:
                x, y = transform(x, y, generator, self.num_classes)
            else:
                x = transform(x, generator)
        return x, y

    def __repr__(self) -> str:
        return f"Pipeline({self.transforms!r})"


# --- from a config: data.augment ----------------------------------------------------------------

@dataclass(frozen=True)
class TransformEntry:
    """A transform's registry entry: its class, which carries its facts (`batch_level`,
    `needs_images`, `draws_random`)."""

    factory: type[Transform]


AUGMENTATIONS = Registry("transform", lambda registry: [registry.add(name, TransformEntry(cls))
                                                        for name, cls in TRANSFORMS.items()],
                         list_hint=f"The transforms: {', '.join(TRANSFORMS)}.")


def create_pipeline(config: Config, sample_shape: Shape, num_classes: int | None) -> Pipeline | None:
    """`data.augment`'s transforms, each built with its arguments checked against its signature
    (nncli.arguments.create), then checked against the samples (`Pipeline.check`): an error at the
    item's line. `num_classes`: the model's, for a classifier (MixUp and CutMix need it). None
    when the config augments nothing."""
    specs = config["data"]["augment"]
    if not specs:
        return None
    transforms = []
    for i, spec in enumerate(specs):
        transform = create(AUGMENTATIONS, spec, config.error, "data", "augment", i)
        if not transform.draws_random:
            raise config.error(f"{transform.name} draws nothing at random: in data.augment it would change "
                               "training batches only, and validation, eval and predict would give the model "
                               "other inputs", "data", "augment", i,
                               hint="Use normalize: channel: the training set's statistics, applied to "
                                    "every input.")
        transforms.append(transform)
    pipeline = Pipeline(transforms, num_classes)
    try:
        pipeline.check(sample_shape)
    except AugmentationError as err:
        spec = specs[err.index]
        key = [err.key] if isinstance(spec, dict) and err.key in spec else []
        raise config.error(str(err), "data", "augment", err.index, *key) from None
    return pipeline
