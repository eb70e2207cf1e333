"""`shapes`: a generated image classification set (nothing is downloaded), RGB uint8 at any size.

Six classes, three shapes and three textures, each drawn in a random colour at a random position
and scale on a noisy background of another random colour:

    circle, square, triangle     a filled shape covering ~15-40% of the image side
    stripes, checker, dots       a texture over the whole image at a random period and phase

Colour is no clue to the class, position and scale vary, and the noise is per pixel, so a model has
to learn shape and texture; a random horizontal flip or a small crop leaves every class unchanged.
The same seed gives the same images on every machine (NumPy's PCG64).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["CLASSES", "generate", "write_folder"]

CLASSES = ("circle", "square", "triangle", "stripes", "checker", "dots")


def generate(rows: int, size: int = 32, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(x uint8 (rows, 3, size, size), y int64 class ids): classes in turn, so they are balanced."""
    if size < 8:
        raise ValueError(f"shapes needs images of at least 8x8, got {size}")
    rng = np.random.default_rng([seed, 0x5A4E5])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    x = np.empty((rows, 3, size, size), np.uint8)
    y = np.arange(rows, dtype=np.int64) % len(CLASSES)
    for i in range(rows):
        mask = _mask(int(y[i]), yy, xx, rng)
        fg, bg = _colours(rng)
        noise = rng.normal(0.0, 18.0, (3, size, size))
        img = np.where(mask[None], fg[:, None, None], bg[:, None, None]) + noise
        x[i] = np.clip(img, 0, 255).astype(np.uint8)
    return x, y


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A foreground and a background colour at least ~100 apart (in RGB distance)."""
    while True:
        fg, bg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        if np.linalg.norm(fg - bg) > 100:
            return fg, bg


def _mask(cls: int, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    name = CLASSES[cls]
    if name in ("circle", "square", "triangle"):
        r = rng.uniform(0.15, 0.4)
        cy, cx = rng.uniform(r, 1 - r, 2)
        dy, dx = yy - cy, xx - cx
        if name == "circle":
            return dy * dy + dx * dx <= r * r
        if name == "square":
            return (np.abs(dy) <= r * 0.8) & (np.abs(dx) <= r * 0.8)
        return (dy <= r * 0.7) & (np.abs(dx) <= (dy + r * 0.9) * 0.6)  # apex up
    period = rng.uniform(0.12, 0.3)
    phase = rng.uniform(0, 1, 2)
    if name == "stripes":  # vertical or horizontal bands
        t = xx if rng.random() < 0.5 else yy
        return ((t / period + phase[0]) % 1.0) < 0.5
    a = (xx / period + phase[0]) % 1.0
    b = (yy / period + phase[1]) % 1.0
    if name == "checker":
        return (a < 0.5) ^ (b < 0.5)
    return (a - 0.5) ** 2 + (b - 0.5) ** 2 < 0.06  # dots on a grid


def write_folder(root: str | Path, rows: int, size: int = 32, *, seed: int = 0) -> Path:
    """The set as an image folder (root/<class>/<i>.png), as a user's photos would come."""
    from PIL import Image

    root = Path(root)
    x, y = generate(rows, size, seed=seed)
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(rows):
        Image.fromarray(x[i].transpose(1, 2, 0)).save(root / CLASSES[int(y[i])] / f"{i:06d}.png")
    return root
