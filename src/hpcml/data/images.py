"""Image folders -> a table source: one subfolder per class, PNG/JPEG files read with Pillow.

    root/
      cat/  a.png  b.jpg  nested/c.jpeg     class "cat" (files found at any depth below it)
      dog/  d.png
      README.txt                            not an image: ignored, counted in the report

Classes are the subfolder names (hidden ones, starting with ".", are skipped), sorted like every
other source's labels: numerically when all are integers ("2" before "10"), else as text.
Extensions .png/.jpg/.jpeg in any case; every other file is ignored and counted.

Size: `image_size` (an int for square, or (H, W)) resizes every image with Pillow (bilinear). Without
it the first image's size is the size and every other image must match; a mismatch is an error that
names the file and both sizes, since silently resizing would change the data.
Channels: grayscale ("L", 1 channel) when every image is grayscale (modes 1, L, LA, I, I;16, F),
else RGB (3 channels); alpha is dropped. `mode="L"` or `"RGB"` forces one.

Pixels stay uint8 (0-255) laid out (C, H, W): the source is a TableSource with one Arrow
`fixed_shape_tensor<uint8>[C, H, W]` column `image` plus a string `label` column, so a packed store
holds N*C*H*W bytes before compression (a float32 column per pixel, as before, took 4x that), and
`read_table`, `store.pack` and a packed store all give the same uint8 arrays. Conversion to float and
normalization happen on the device, per batch (data/augment.py). Raw tensors rather than PNG/JPEG
bytes: decoding is then a memcpy, not per-image codec work in every epoch, and zstd still compresses
the shards (see the closing figures in README). Images whose mode differs from the chosen one are
converted and counted (`images_converted`).

Headers are read in a first pass (cheap: Pillow opens lazily) to fix the mode and size and fail
early; pixels are decoded in a second, batched pass, so packing a folder larger than memory works.
"""

from __future__ import annotations

import posixpath
import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from hpcml.errors import UsageError

__all__ = ["IMAGE_EXTENSIONS", "MODES", "is_image_folder", "open_images"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
IMAGE = "image"
MODES = ("auto", "L", "RGB")
LABEL = "label"
_GRAY = {"1", "L", "LA", "I", "I;16", "F"}
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")  # e.g. <...LocalFileOpener object at 0x7f..>
_BATCH_BYTES = 32 << 20  # cap on one decoded batch: 65,536 rows of 224x224 RGB would be 9.9 GB


def is_image_folder(fs: Any, path: str) -> bool:
    """True for a folder with at least one non-hidden subfolder (a class folder, maybe empty)."""
    return any(e["type"] == "directory" for e in _ls(fs, path))


def open_images(
    fs: Any,
    path: str,
    name: str,
    *,
    target: str | None = None,
    features: list[str] | None = None,
    image_size: int | tuple[int, int] | list[int] | None = None,
    mode: str = "auto",
    batch_rows: int = 65_536,
    shuffle: bool = False,
) -> tuple[Any, dict]:
    """(TableSource, extra report fields) for the image folder at `path` on `fs`. `shuffle`: rows in
    a fixed pseudo-random order (seed 0) instead of class by class; `store.pack` uses it, so every
    shard mixes the classes (whole shards form a streamed store's test split and shuffle unit)."""
    from hpcml.data.files import TableSource

    files, ignored = _scan(fs, path, name)  # first: "not an image folder" says the most
    if shuffle:
        files = [files[i] for i in np.random.default_rng(0).permutation(len(files))]
    if features is not None:
        raise UsageError(f"{name}: image folders have no named columns; features= cannot be used")
    if target not in (None, "", LABEL):
        raise UsageError(f"{name}: an image folder's labels are its subfolder names; target= cannot be used")
    if mode not in MODES:
        raise UsageError(f"image mode {mode!r}; valid: {', '.join(MODES)}")
    size = _parse_size(image_size)
    Image = _pillow()
    first_size, modes, resized = None, Counter(), 0
    for f, _ in files:  # pass 1: headers only, so a bad or mismatched file fails before any decoding
        with _open(fs, f, _rel(f, path, name), Image) as img:
            modes[img.mode] += 1
            got = (img.height, img.width)
        resized += size is not None and got != size
        if size is None:
            if first_size is None:
                first_size = (got, f)
            elif got != first_size[0]:
                raise UsageError(
                    f"{_rel(f, path, name)}: image is {got[0]}x{got[1]} (HxW) but "
                    f"{_rel(first_size[1], path, name)} is {first_size[0][0]}x{first_size[0][1]}; "
                    "pass image_size (--image-size) to resize every image to one size"
                )
    out_size = size or first_size[0]
    out_mode = mode if mode != "auto" else ("L" if set(modes) <= _GRAY else "RGB")
    shape = [1 if out_mode == "L" else 3, *out_size]
    n_values = int(np.prod(shape))
    tensor = pa.fixed_shape_tensor(pa.uint8(), shape)
    schema = pa.schema([pa.field(IMAGE, tensor), pa.field(LABEL, pa.string())])
    rows = max(1, min(batch_rows, _BATCH_BYTES // n_values))

    def batches() -> Iterator[pa.RecordBatch]:
        for s in range(0, len(files), rows):
            chunk = files[s : s + rows]
            x = np.empty((len(chunk), *shape), np.uint8)
            for i, (f, _) in enumerate(chunk):
                shown = _rel(f, path, name)
                with _open(fs, f, shown, Image) as img:
                    x[i] = _pixels(img, shown, out_mode, size, Image)
            images = pa.ExtensionArray.from_storage(
                tensor, pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), n_values)
            )
            labels = pa.array([lb for _, lb in chunk], pa.string())
            yield pa.RecordBatch.from_arrays([images, labels], schema=schema)

    extra = {
        "images": len(files),
        "files_ignored": ignored,
        "image_mode": out_mode,
        "image_size": list(out_size),
        "images_resized": resized,
        "images_converted": sum(n for m, n in modes.items() if not _same_mode(m, out_mode)),
        "image_order": "shuffled (seed 0)" if shuffle else "by class, then path",
    }
    src = TableSource(name, "image", schema, batches(), LABEL, [IMAGE], shape)
    return src, extra


def _parse_size(size: Any) -> tuple[int, int] | None:
    if size is None:
        return None
    hw = (size, size) if isinstance(size, int | np.integer) else tuple(size)
    if len(hw) != 2 or not all(isinstance(v, int | np.integer) and v > 0 for v in hw):
        raise UsageError(f"image_size={size!r}; give a positive int or (height, width)")
    return int(hw[0]), int(hw[1])


def _ls(fs: Any, path: str) -> list[dict]:
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return [e for e in entries if not posixpath.basename(e["name"].rstrip("/")).startswith(".")]


def _scan(fs: Any, path: str, name: str) -> tuple[list[tuple[str, str]], int]:
    """([(file, class name)] sorted by class then path, count of ignored non-image files)."""
    entries = _ls(fs, path)
    dirs = sorted(e["name"].rstrip("/") for e in entries if e["type"] == "directory")
    ignored = sum(1 for e in entries if e["type"] != "directory")
    if not dirs:
        what = "it is empty" if not entries else "it has no class subfolders"
        raise UsageError(
            f"{name}: is a folder but not an image folder ({what}); give a file, an hpcml store "
            "(a folder with manifest.json) or a folder with one subfolder per class of .png/.jpg/.jpeg"
        )
    files: list[tuple[str, str]] = []
    empty = []
    for d in dirs:
        label = posixpath.basename(d)
        found = sorted(fs.find(d))
        hidden = [f for f in found if "/." in f[len(d) :]]
        images = [f for f in found if f.lower().endswith(IMAGE_EXTENSIONS) and f not in hidden]
        ignored += len(found) - len(hidden) - len(images)
        if not images:
            empty.append(label)
        files += [(f, label) for f in images]
    if empty:
        raise UsageError(
            f"{name}: class folder(s) {', '.join(repr(e) for e in empty[:10])} hold no .png/.jpg/.jpeg "
            "files; remove them or add images"
        )
    return files, ignored


def _pillow():
    try:
        from PIL import Image
    except ImportError as err:
        raise UsageError(f"image folders need Pillow ({err}); pip install 'hpcml[data]'") from None
    return Image


class _open:
    """Pillow's Image.open on an fsspec file, with every decode failure named by file."""

    def __init__(self, fs: Any, f: str, shown: str, Image: Any):
        self.fs, self.f, self.shown, self.Image = fs, f, shown, Image

    def __enter__(self):
        self.fh = self.fs.open(self.f, "rb")
        try:
            return self.Image.open(self.fh)
        except Exception as err:  # UnidentifiedImageError, DecompressionBombError, OSError ...
            self.fh.close()
            raise _bad(self.shown, err) from None

    def __exit__(self, *exc) -> None:
        self.fh.close()


def _same_mode(mode: str, out: str) -> bool:
    """True when an image of `mode` needs no conversion to `out` beyond dropping alpha."""
    return mode in (("L", "LA") if out == "L" else ("RGB", "RGBA"))


def _pixels(img: Any, shown: str, mode: str, size, Image) -> np.ndarray:
    """(C, H, W) uint8. Decoding happens here (Pillow is lazy), so errors are named here."""
    try:
        if img.mode in ("I", "I;16", "F") and mode == "L":
            # 16/32-bit grayscale: scale to 8 bits by the type's range instead of clipping at 255
            a = np.asarray(img, np.float64) / (65535.0 if img.mode.startswith("I") else 1.0)
            img = Image.fromarray(np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        img = img.convert(mode)
        if size is not None and (img.height, img.width) != size:
            img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        a = np.asarray(img, np.uint8)
    except Exception as err:  # truncated or corrupt data is only found when the pixels are decoded
        raise _bad(shown, err) from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _bad(shown: str, err: Exception) -> UsageError:
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    if msg.startswith("cannot identify image file"):  # Pillow names the file by its object's repr
        msg = "unknown format or corrupt header"
    msg = _OBJECT_REPR.sub(shown, msg)
    return UsageError(f"{shown}: not a readable PNG/JPEG image ({msg})")


def _rel(f: str, root: str, name: str) -> str:
    """The file as the user would write it: their folder name (a URL keeps its scheme) + the rest."""
    return name.rstrip("/") + f[len(root.rstrip("/")) :] if f.startswith(root.rstrip("/")) else f
