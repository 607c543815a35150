"""Write the 8x8 digits bundled with nncli as a folder of PNG images, one folder per class named by
the digit's word (`eight/`, `five/`, ... `zero/`), for configs/images_folder.yaml:

    python configs/data/digits_to_png.py            # writes configs/data/digits_png/
    python configs/data/digits_to_png.py OUT        # writes OUT/

Words rather than digits, so that the class names nncli reads from the folders show in `predict`
and `eval` (sorted by name, `eight` is class 0). Needs numpy and Pillow (`pip install 'nncli[images]'`).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

DIGITS = Path(__file__).resolve().parents[2] / "nncli" / "datasets" / "digits.npz"
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write_digits(out: Path) -> Path:
    """Every digit as out/<word>/<index>.png (grayscale, its 17 levels of ink as 0 to 255)."""
    arrays = np.load(DIGITS)
    pixels = np.round(arrays["images"][:, 0] * 255).astype(np.uint8)
    for word in WORDS:
        (out / word).mkdir(parents=True, exist_ok=True)
    for index, (image, label) in enumerate(zip(pixels, arrays["labels"])):
        Image.fromarray(image, mode="L").save(out / WORDS[label] / f"{index:04d}.png")
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "digits_png"
    print(f"wrote {len(list(write_digits(target).rglob('*.png')))} images to {target}")
