"""nncli.data.augment: each batched transform against the same thing written by hand, per sample, in
plain PyTorch; per-sample randomness, determinism and the generator's state; the checks made
before training; MixUp and CutMix's soft targets. No torchvision or kornia needed."""
from __future__ import annotations

import inspect
import math
import typing

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nncli.data.augment import (
    TRANSFORMS,
    AugmentationError,
    ColorJitter,
    CutMix,
    MixUp,
    Normalize,
    Pipeline,
    RandomCrop,
    RandomErasing,
    RandomHorizontalFlip,
    RandomResizedCrop,
    RandomVerticalFlip,
    _beta,
)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int = 16, c: int = 3, h: int = 10, w: int = 12, seed: int = 1) -> torch.Tensor:
    """Random pixels: every crop position of every sample is distinguishable."""
    return torch.rand(n, c, h, w, generator=generator(seed))


# --- each transform against a hand-written per-sample version ---------------------------------

def pad_by_hand(img: torch.Tensor, left: int, top: int, right: int, bottom: int, mode: str,
                fill: float) -> torch.Tensor:
    """One sample padded as torchvision pads: F.pad for three modes, numpy for 'symmetric'."""
    if mode == "symmetric":
        return torch.from_numpy(np.pad(img.numpy(), ((0, 0), (top, bottom), (left, right)), mode="symmetric"))
    torch_mode = {"constant": "constant", "edge": "replicate", "reflect": "reflect"}[mode]
    return F.pad(img[None], (left, right, top, bottom), mode=torch_mode,
                 **({"value": fill} if mode == "constant" else {}))[0]


@pytest.mark.parametrize("mode", ["constant", "edge", "reflect", "symmetric"])
@pytest.mark.parametrize("padding, size",
                         [(4, (10, 12)), ((1, 2), (8, 8)), ((1, 2, 3, 4), (13, 14)), (None, (7, 5))])
def test_random_crop_is_the_drawn_window_of_the_padded_sample(mode, padding, size) -> None:
    x = images()
    crop = RandomCrop(size, padding=padding, fill=0.25, padding_mode=mode)
    left, top, right, bottom = crop._pads
    g = generator()
    out = crop(x, g)
    # the documented draws: the top offsets of all samples, then the left ones
    g = generator()
    n, _, h, w = x.shape
    tops = torch.randint(0, h + top + bottom - size[0] + 1, (n,), generator=g)
    lefts = torch.randint(0, w + left + right - size[1] + 1, (n,), generator=g)
    for k in range(n):
        padded = pad_by_hand(x[k], left, top, right, bottom, mode, 0.25)
        i, j = int(tops[k]), int(lefts[k])
        assert torch.equal(out[k], padded[:, i:i + size[0], j:j + size[1]]), (k, i, j)


def test_random_crop_pads_an_image_smaller_than_the_size_when_asked() -> None:
    x = images(h=6, w=9)
    crop = RandomCrop(10, pad_if_needed=True)
    assert crop.check((3, 6, 9)) == (3, 10, 10)
    out = crop(x, generator())
    # 4 rows are missing, padded on both sides: 14 rows, 5 positions; 1 column: 11, 2 positions
    g = generator()
    tops, lefts = torch.randint(0, 5, (16,), generator=g), torch.randint(0, 2, (16,), generator=g)
    for k in range(16):
        padded = F.pad(x[k], (1, 1, 4, 4))
        assert torch.equal(out[k], padded[:, tops[k]:tops[k] + 10, lefts[k]:lefts[k] + 10])


@pytest.mark.parametrize("cls, dim", [(RandomHorizontalFlip, -1), (RandomVerticalFlip, -2)])
def test_flips_mirror_the_samples_whose_draw_is_below_p(cls, dim) -> None:
    x = images(n=40)
    out = cls(p=0.3)(x, generator())
    flipped = torch.rand(40, generator=generator()) < 0.3
    assert 0 < flipped.sum() < 40
    for k in range(40):
        assert torch.equal(out[k], x[k].flip(dim) if flipped[k] else x[k])


@pytest.mark.parametrize("value", [0.0, 0.5, (0.1, 0.2, 0.3), "random"])
def test_random_erasing_fills_each_samples_rectangle(value) -> None:
    x = images(n=64, h=16, w=20)
    erasing = RandomErasing(p=0.7, value=value)
    top, left, h, w, erased = erasing.rectangles(64, 16, 20, generator())
    out = erasing(x, generator())
    noise = None
    if value == "random":  # drawn after the rectangles, for the whole batch
        g = generator()
        erasing.rectangles(64, 16, 20, g)
        noise = torch.randn(x.shape, generator=g)
    assert 20 < erased.sum() < 64
    for k in range(64):
        expected = x[k].clone()
        i, j, hh, ww = int(top[k]), int(left[k]), int(h[k]), int(w[k])
        if erased[k] and noise is not None:
            expected[:, i:i + hh, j:j + ww] = noise[k, :, i:i + hh, j:j + ww]
        elif erased[k]:
            expected[:, i:i + hh, j:j + ww] = torch.tensor(value).view(-1, 1, 1) if isinstance(value, tuple) \
                else value
        assert torch.equal(out[k], expected), k


def test_random_erasing_rectangles_follow_torchvisions_rule() -> None:
    # a rectangle strictly smaller than the image, of an area fraction in `scale` and an aspect
    # ratio in `ratio` (up to the rounding of its sides to whole pixels), placed inside the image
    erasing = RandomErasing(p=1.0, scale=(0.1, 0.3), ratio=(0.5, 2.0))
    top, left, h, w, erased = erasing.rectangles(2000, 32, 32, generator())
    assert erased.float().mean() > 0.95
    h, w, top, left = h[erased], w[erased], top[erased], left[erased]
    assert (h < 32).all() and (w < 32).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 32).all() and (left + w <= 32).all()
    area = (h * w).float() / 1024
    assert area.min() > 0.08 and area.max() < 0.33
    ratio = h.float() / w.float()
    assert ratio.min() > 0.5 * 0.8 and ratio.max() < 2.0 * 1.25
    assert len(set(zip(top.tolist(), left.tolist()))) > 300  # placed anywhere (at most 23 x 23 places here)


def test_random_erasing_leaves_a_sample_alone_when_no_rectangle_fits() -> None:
    # 10 attempts at 90-100% of the area, never strictly smaller than a 4x4 image: torchvision erases nothing
    erasing = RandomErasing(p=1.0, scale=(0.9, 1.0), ratio=(1.0, 1.0))
    x = images(h=4, w=4)
    assert torch.equal(erasing(x, generator()), x)


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
@pytest.mark.parametrize("size", [(6, 8), (24, 20), (10, 12)])
def test_random_resized_crop_resizes_each_box_as_f_interpolate(antialias, interpolation, size) -> None:
    x = images(n=24)
    rrc = RandomResizedCrop(size, scale=(0.05, 1.0), interpolation=interpolation, antialias=antialias)
    top, left, h, w = rrc.boxes(24, 10, 12, generator())
    out = rrc(x, generator())
    assert out.shape == (24, 3, *size)
    for k in range(24):
        i, j, hh, ww = int(top[k]), int(left[k]), int(h[k]), int(w[k])
        box = x[k:k + 1, :, i:i + hh, j:j + ww]
        options = {"align_corners": False, "antialias": antialias} if interpolation == "bilinear" else {}
        expected = F.interpolate(box, size=size, mode=interpolation, **options)[0]
        torch.testing.assert_close(out[k], expected, atol=1e-5, rtol=1e-5)


def test_random_resized_crop_boxes_fit_the_image_and_vary() -> None:
    rrc = RandomResizedCrop(8, scale=(0.2, 0.6))
    top, left, h, w = rrc.boxes(1000, 20, 30, generator())
    assert (h >= 1).all() and (w >= 1).all() and (top + h <= 20).all() and (left + w <= 30).all()
    area = (h * w).float() / 600
    assert 0.15 < area.min() and area.max() < 0.7
    assert len(set(zip(h.tolist(), w.tolist()))) > 30


def test_random_resized_crop_falls_back_to_torchvisions_central_crop() -> None:
    # an aspect ratio of 10 or more never fits a square image: the central crop of ratio 10
    rrc = RandomResizedCrop(4, scale=(0.9, 1.0), ratio=(10.0, 20.0))
    top, left, h, w = rrc.boxes(5, 8, 8, generator())
    assert h.tolist() == [1] * 5 and w.tolist() == [8] * 5       # w = 8, h = round(8 / 10)
    assert top.tolist() == [3] * 5 and left.tolist() == [0] * 5  # (8 - 1) // 2, (8 - 8) // 2


def gray(img: torch.Tensor) -> torch.Tensor:
    return 0.2989 * img[0] + 0.587 * img[1] + 0.114 * img[2] if img.shape[0] == 3 else img[0]


def jitter_by_hand(img: torch.Tensor, name: str, f: float) -> torch.Tensor:
    """torchvision's adjust_brightness / adjust_contrast / adjust_saturation for a float image."""
    if name == "brightness":
        return (img * f).clamp(0, 1)
    if name == "contrast":
        return (f * img + (1 - f) * gray(img).mean()).clamp(0, 1)
    if img.shape[0] == 1:
        return img
    return (f * img + (1 - f) * gray(img)).clamp(0, 1)


@pytest.mark.parametrize("channels", [1, 3])
def test_color_jitter_applies_each_samples_factors_in_its_order(channels) -> None:
    x = images(n=48, c=channels)
    jitter = ColorJitter(brightness=0.5, contrast=(0.2, 1.8), saturation=0.4)
    order, factors = jitter.factors(48, generator())
    out = jitter(x, generator())
    names = ["brightness", "contrast", "saturation"]
    assert factors["brightness"].min() >= 0.5 and factors["brightness"].max() <= 1.5
    assert factors["contrast"].min() >= 0.2 and factors["contrast"].max() <= 1.8
    assert len({tuple(o) for o in order.tolist()}) == 6  # every order occurs
    for k in range(48):
        expected = x[k]
        for op in order[k].tolist():
            expected = jitter_by_hand(expected, names[op], float(factors[names[op]][k]))
        torch.testing.assert_close(out[k], expected, atol=1e-6, rtol=1e-6)


def test_color_jitter_off_and_brightness_only() -> None:
    x = images()
    assert torch.equal(ColorJitter()(x, generator()), x)  # nothing asked: nothing done, nothing drawn
    assert torch.equal(ColorJitter(brightness=0)(x, generator()), x)
    out = ColorJitter(brightness=0.3)(x, generator())
    g = generator()
    torch.rand(16, 1, generator=g)  # the order of the one operation
    f = torch.empty(16).uniform_(0.7, 1.3, generator=g)
    torch.testing.assert_close(out, (x * f.view(-1, 1, 1, 1)).clamp(0, 1))


def test_normalize_is_per_channel_mean_and_std() -> None:
    x = images()
    out = Normalize((0.1, 0.2, 0.3), (0.5, 0.25, 2.0))(x, generator())
    for c, (m, s) in enumerate([(0.1, 0.5), (0.2, 0.25), (0.3, 2.0)]):
        torch.testing.assert_close(out[:, c], (x[:, c] - m) / s)
    torch.testing.assert_close(Normalize(0.5, 0.5)(x), (x - 0.5) / 0.5)


# --- randomness: per sample, from the generator alone, replayable -----------------------------

EVERY_PER_SAMPLE = [RandomCrop(10, padding=2), RandomHorizontalFlip(), RandomVerticalFlip(),
                    RandomResizedCrop(10), RandomErasing(p=1.0), ColorJitter(0.4, 0.4, 0.4)]


@pytest.mark.parametrize("transform", EVERY_PER_SAMPLE, ids=lambda t: t.name)
def test_samples_get_their_own_parameters(transform) -> None:
    one = torch.rand(1, 3, 10, 10, generator=generator(3))
    out = transform(one.expand(32, -1, -1, -1).contiguous(), generator())
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) > (1 if isinstance(transform, (RandomHorizontalFlip, RandomVerticalFlip)) else 8)


def pipeline() -> Pipeline:
    return Pipeline([RandomResizedCrop(10, scale=(0.5, 1.0)),
                     RandomCrop(10, padding=2, padding_mode="reflect"), RandomHorizontalFlip(),
                     RandomVerticalFlip(0.2), ColorJitter(0.3, 0.3, 0.3),
                     Normalize(0.5, 0.25), RandomErasing(p=0.5, value="random"), MixUp(0.4), CutMix(1.0)],
                    num_classes=5)


def test_the_same_generator_state_gives_the_same_batch_and_a_restorable_state() -> None:
    x, y = torch.rand(32, 3, 10, 10), torch.randint(0, 5, (32,))
    global_state = torch.get_rng_state()
    g = generator(7)
    first = pipeline()(x, y, g)
    saved = g.get_state()        # what a checkpoint stores
    second = pipeline()(x, y, g)
    g2 = torch.Generator()
    g2.set_state(saved)          # what a resume restores
    again = pipeline()(x, y, g2)
    assert torch.equal(second[0], again[0]) and torch.equal(second[1], again[1])
    assert torch.equal(g.get_state(), g2.get_state())
    assert not torch.equal(first[0], second[0])
    replay = pipeline()(x, y, generator(7))
    assert torch.equal(first[0], replay[0]) and torch.equal(first[1], replay[1])
    assert torch.equal(torch.get_rng_state(), global_state)  # torch's global generator untouched


def test_the_numbers_drawn_depend_on_the_batch_shape_only() -> None:
    # so that a resumed run draws the same whatever the data values or the device
    g1, g2 = generator(), generator()
    pipeline()(torch.rand(8, 3, 10, 10), torch.randint(0, 5, (8,)), g1)
    pipeline()(torch.zeros(8, 3, 10, 10), torch.zeros(8, dtype=torch.long), g2)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_parameters_follow_the_batch_to_its_device() -> None:
    # on the meta device, any parameter left on the CPU would raise: the same code runs on a GPU
    x, y = torch.empty(8, 3, 10, 10, device="meta"), torch.zeros(8, dtype=torch.long, device="meta")
    out, soft = pipeline()(x, y, generator())
    assert out.device.type == "meta" and soft.shape == (8, 5)


def test_the_pipeline_wants_the_runs_cpu_generator() -> None:
    x, y = torch.rand(4, 3, 10, 10), torch.zeros(4, dtype=torch.long)
    with pytest.raises(TypeError, match="torch.Generator on the CPU"):
        pipeline()(x, y, None)
    with pytest.raises(TypeError, match="float"):
        pipeline()((x * 255).long(), y, generator())


# --- the checks before training --------------------------------------------------------------

def error(transform, shape, num_classes=None) -> AugmentationError:
    with pytest.raises(AugmentationError) as info:
        transform.check(shape, num_classes)
    return info.value


def test_a_crop_larger_than_the_padded_image_is_refused() -> None:
    message = str(error(RandomCrop(12, padding=1), (1, 8, 8)))
    assert "larger than the image, 10x10 (8x8 with padding)" in message
    assert error(RandomCrop(9), (1, 8, 8)).key == "size"
    assert RandomCrop(10, padding=1).check((1, 8, 8)) == (1, 10, 10)  # the padding makes it fit
    assert RandomCrop(12, pad_if_needed=True).check((1, 8, 8)) == (1, 12, 12)
    assert error(RandomCrop(8, padding=8, padding_mode="reflect"), (1, 8, 8)).key == "padding"


@pytest.mark.parametrize("name", [n for n, cls in TRANSFORMS.items() if cls.needs_images])
@pytest.mark.parametrize("shape", [(64,), (5, 8), (1, 2, 8, 8)])
def test_image_transforms_refuse_data_that_is_not_images(name, shape) -> None:
    transform = {"RandomCrop": lambda: RandomCrop(4), "RandomResizedCrop": lambda: RandomResizedCrop(4),
                 "Normalize": lambda: Normalize(0.5, 0.5)}.get(name, TRANSFORMS[name])()
    assert "needs images" in str(error(transform, shape, num_classes=3))


def test_mixup_applies_to_any_data_with_classes() -> None:
    assert MixUp().check((64,), num_classes=3) == (64,)
    assert "needs a classification" in str(error(MixUp(), (64,)))
    assert error(CutMix(num_classes=4), (3, 8, 8), num_classes=10).key == "num_classes"


@pytest.mark.parametrize("make, key", [
    (lambda: RandomHorizontalFlip(p=1.5), "p"), (lambda: RandomVerticalFlip(p=-0.1), "p"),
    (lambda: RandomErasing(p=2), "p"), (lambda: RandomHorizontalFlip(p=True), "p"),
    (lambda: RandomErasing(scale=(0.5, 0.1)), "scale"), (lambda: RandomErasing(scale=(0.1, 1.5)), "scale"),
    (lambda: RandomErasing(value="noise"), "value"), (lambda: RandomResizedCrop(8, ratio=(0, 1)), "ratio"),
    (lambda: RandomResizedCrop(8, interpolation="bicubic"), "interpolation"), (lambda: RandomCrop(0), "size"),
    (lambda: RandomCrop(8, padding=-1), "padding"), (lambda: RandomCrop(8, padding=(1, 2, 3)), "padding"),
    (lambda: RandomCrop(8, padding_mode="wrap"), "padding_mode"),
    (lambda: ColorJitter(brightness=-1), "brightness"),
    (lambda: ColorJitter(hue=0.1), "hue"), (lambda: Normalize(0.5, 0), "std"),
    (lambda: MixUp(alpha=0), "alpha"),
])
def test_bad_arguments_are_refused_when_built(make, key) -> None:
    with pytest.raises(AugmentationError) as info:
        make()
    assert info.value.key == key


def test_arguments_that_depend_on_the_channels() -> None:
    assert error(Normalize((0.5, 0.5), (0.2, 0.2, 0.2)), (3, 8, 8)).key == "mean"
    assert error(RandomErasing(value=(1.0, 2.0)), (3, 8, 8)).key == "value"
    assert "1 or 3 channels" in str(error(ColorJitter(0.2), (4, 8, 8)))


def test_the_pipeline_names_the_transform_at_fault() -> None:
    with pytest.raises(AugmentationError) as info:
        Pipeline([RandomHorizontalFlip(), RandomCrop(9)]).check((1, 8, 8))
    assert info.value.index == 1 and info.value.key == "size"
    with pytest.raises(AugmentationError, match="validation and predict") as info:  # train-only shapes
        Pipeline([RandomHorizontalFlip(), RandomCrop(6)]).check((1, 8, 8))
    assert info.value.index == 1
    with pytest.raises(AugmentationError, match="before Normalize") as info:
        Pipeline([Normalize(0.5, 0.5), ColorJitter(0.2)]).check((3, 8, 8))
    assert info.value.index == 1
    Pipeline([RandomCrop(8, padding=1), ColorJitter(0.2), Normalize(0.5, 0.5)]).check((3, 8, 8))
    with pytest.raises(AugmentationError) as info:
        Pipeline([RandomCrop(8), MixUp()]).check((3, 8, 8))  # no classes
    assert info.value.index == 1
    Pipeline([RandomCrop(8), MixUp()], num_classes=10).check((3, 8, 8))


# --- MixUp and CutMix --------------------------------------------------------------------------

def test_mixup_blends_the_batch_with_its_neighbour_by_one_lambda() -> None:
    x, y = images(n=8), torch.arange(8)  # distinct neighbouring classes: lambda is readable off the targets
    out, soft = MixUp(alpha=0.5)(x, y, generator(), num_classes=10)
    assert soft.shape == (8, 10) and soft.dtype == x.dtype
    torch.testing.assert_close(soft.sum(1), torch.ones(8))
    lam = float(_beta(0.5, generator()))
    for k in range(8):
        assert soft[k, y[k]] == pytest.approx(lam) and soft[k, y[k - 1]] == pytest.approx(1 - lam)
        torch.testing.assert_close(out[k], lam * x[k] + (1 - lam) * x[k - 1])


def test_cutmix_weights_the_labels_by_the_area_pasted() -> None:
    for seed in range(20):
        x, y = images(n=6, h=12, w=16, seed=seed + 10), torch.arange(6)
        out, soft = CutMix()(x, y, generator(seed), num_classes=6)
        pasted = (out != x).any(1)  # (N, H, W): where the neighbour's pixels are
        torch.testing.assert_close(soft.sum(1), torch.ones(6))
        y1, x1, y2, x2 = CutMix().box(12, 16, generator(seed))
        for k in range(6):
            fraction = pasted[k].float().mean().item()
            assert fraction == pytest.approx((y2 - y1) * (x2 - x1) / (12 * 16))
            assert soft[k, y[k]] == pytest.approx(1 - fraction)
            assert soft[k, y[k - 1]] == pytest.approx(fraction, abs=1e-6)
            assert torch.equal(out[k, :, y1:y2, x1:x2], x[k - 1, :, y1:y2, x1:x2])


def test_mixup_then_cutmix_keep_probabilities() -> None:
    x, y = images(n=16), torch.randint(0, 4, (16,), generator=generator(2))
    _, soft = Pipeline([MixUp(), CutMix()], num_classes=4)(x, y, generator())
    assert soft.shape == (16, 4) and (soft >= 0).all()
    torch.testing.assert_close(soft.sum(1), torch.ones(16))
    assert torch.nn.functional.cross_entropy(torch.randn(16, 4), soft).isfinite()  # what the loss takes


def test_beta_draws_from_the_generator_with_the_right_mean_and_spread() -> None:
    g = generator()
    uniform = torch.tensor([_beta(1.0, g) for _ in range(3000)])
    assert abs(uniform.mean() - 0.5) < 0.02 and abs(uniform.var() - 1 / 12) < 0.01
    peaked = torch.tensor([_beta(0.2, g) for _ in range(3000)])  # Beta(0.2, 0.2): mostly near 0 or 1
    assert abs(peaked.var() - 0.25 / 1.4) < 0.02


# --- the registry -----------------------------------------------------------------------------

TORCHVISION_DEFAULTS = {  # torchvision.transforms.v2's constructor defaults, written down
    "RandomCrop": {"padding": None, "pad_if_needed": False, "fill": 0, "padding_mode": "constant"},
    "RandomHorizontalFlip": {"p": 0.5}, "RandomVerticalFlip": {"p": 0.5},
    "RandomResizedCrop": {"scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3), "interpolation": "bilinear",
                          "antialias": True},
    "RandomErasing": {"p": 0.5, "scale": (0.02, 0.33), "ratio": (0.3, 3.3), "value": 0.0, "inplace": False},
    "ColorJitter": {"brightness": None, "contrast": None, "saturation": None, "hue": None},
    "Normalize": {"inplace": False},
    "MixUp": {"alpha": 1.0, "num_classes": None}, "CutMix": {"alpha": 1.0, "num_classes": None},
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_registry_entries_carry_torchvisions_arguments_and_their_facts(name) -> None:
    cls = TRANSFORMS[name]
    assert cls.__name__ == name
    params = inspect.signature(cls).parameters
    defaults = {n: p.default for n, p in params.items() if p.default is not p.empty}
    assert defaults == TORCHVISION_DEFAULTS[name]
    hints = typing.get_type_hints(cls.__init__)  # nncli type-checks config values against these
    assert set(params) <= set(hints)
    assert cls.batch_level == (name in ("MixUp", "CutMix"))
    assert cls.needs_images == (name != "MixUp")
    assert cls.draws_random == (name != "Normalize")
    assert cls.__doc__ and "torchvision" in cls.__doc__


def test_arguments_from_yaml_lists_work_like_tuples() -> None:
    assert RandomCrop([8, 6], padding=[1, 2]).size == (8, 6)
    assert RandomErasing(scale=[0.1, 0.2], value=[1, 2, 3]).value == (1.0, 2.0, 3.0)
    assert Normalize([0.5], [0.25]).check((3, 4, 4)) == (3, 4, 4)
    assert not math.isnan(ColorJitter(contrast=[0.5, 1.5]).contrast[0])
