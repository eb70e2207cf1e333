"""Image folders: one subfolder per class, read with Pillow, (N, C, H, W) in [0, 1]; bad input named."""

import json

import fsspec
import numpy as np
import pytest
from PIL import Image

from hpcml.data import store
from hpcml.data.files import read_table
from hpcml.errors import HpcmlError, UsageError


def _img(path, a, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, **kw)
    return a


@pytest.fixture
def rgb_dir(tmp_path):
    """2 classes, 5 RGB 4x6 PNGs (one nested, one .PNG), plus files that must be ignored."""
    rng = np.random.default_rng(0)
    root = tmp_path / "pets"
    arrays = {}
    for rel in ["dog/b.png", "cat/a.png", "cat/sub/c.PNG", "dog/a.png", "cat/z.png"]:
        arrays[rel] = _img(root / rel, rng.integers(0, 256, (4, 6, 3), dtype=np.uint8))
    (root / "README.txt").write_text("not an image")
    (root / "cat" / "labels.csv").write_text("a,b\n")
    (root / ".hidden").mkdir()  # hidden folders are not classes
    return root, arrays


def test_rgb_folder_pixels_labels_and_report(rgb_dir):
    root, arrays = rgb_dir
    x, y, classes, report = read_table(root)
    assert classes == ["cat", "dog"]
    order = ["cat/a.png", "cat/sub/c.PNG", "cat/z.png", "dog/a.png", "dog/b.png"]  # class, then path
    assert x.dtype == np.uint8 and x.shape == (5, 3, 4, 6) and y.dtype == np.int64  # raw bytes
    assert y.tolist() == [0, 0, 0, 1, 1]
    want = np.stack([arrays[k].transpose(2, 0, 1) for k in order])
    assert np.array_equal(x, want)
    assert report["kind"] == "image" and report["format"] == "image" and report["feature_shape"] == [3, 4, 6]
    assert report["rows"] == report["rows_read"] == report["images"] == 5 and report["rows_dropped"] == 0
    assert report["files_ignored"] == 2 and report["image_mode"] == "RGB" and report["image_size"] == [4, 6]
    assert report["images_converted"] == 0
    assert report["class_counts"] == [3, 2] and report["task"] == "classification"


def test_grayscale_one_channel_mixed_is_rgb(tmp_path):
    g = _img(tmp_path / "g" / "0" / "a.png", np.arange(12, dtype=np.uint8).reshape(3, 4) * 20)
    _img(tmp_path / "g" / "1" / "b.jpeg", np.full((3, 4), 7, np.uint8))
    x, _, _, report = read_table(tmp_path / "g")
    assert x.shape == (2, 1, 3, 4) and report["image_mode"] == "L" and report["images_converted"] == 0
    assert np.array_equal(x[0, 0], g)
    _img(tmp_path / "g" / "1" / "c.png", np.zeros((3, 4, 3), np.uint8))  # one colour image -> all RGB
    x, _, _, report = read_table(tmp_path / "g")
    assert x.shape == (3, 3, 3, 4) and report["image_mode"] == "RGB"
    assert report["images_converted"] == 2  # the two grayscale ones, counted
    assert np.array_equal(x[0, 0], x[0, 2]) and np.array_equal(x[0, 1], g)  # gray -> RGB
    x, *_ = read_table(tmp_path / "g", image_mode="L")  # forced
    assert x.shape == (3, 1, 3, 4)


def test_image_size_resizes_every_image_with_pillow(tmp_path):
    rng = np.random.default_rng(1)
    big = _img(tmp_path / "r" / "a" / "big.png", rng.integers(0, 256, (10, 8, 3), dtype=np.uint8))
    _img(tmp_path / "r" / "b" / "small.jpg", rng.integers(0, 256, (3, 3, 3), dtype=np.uint8), quality=95)
    x, _, _, report = read_table(tmp_path / "r", image_size=(5, 7))
    assert x.shape == (2, 3, 5, 7) and report["images_resized"] == 2 and report["image_size"] == [5, 7]
    want = np.asarray(Image.fromarray(big).resize((7, 5), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    assert np.array_equal(x[0], want)
    assert read_table(tmp_path / "r", image_size=4)[0].shape == (2, 3, 4, 4)


def test_mismatched_sizes_name_the_file_and_both_sizes(tmp_path):
    _img(tmp_path / "m" / "a" / "1.png", np.zeros((4, 6), np.uint8))
    _img(tmp_path / "m" / "b" / "2.png", np.zeros((5, 6), np.uint8))
    with pytest.raises(
        UsageError, match=r"m/b/2\.png: image is 5x6 \(HxW\) but .*m/a/1\.png is 4x6.*--image-size"
    ):
        read_table(tmp_path / "m")


def test_undecodable_images_are_named(tmp_path):
    _img(tmp_path / "bad" / "a" / "ok.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "bad" / "a" / "junk.png").write_bytes(b"this is not a png")
    with pytest.raises(UsageError, match=r"bad/a/junk\.png: not a readable PNG/JPEG image"):
        read_table(tmp_path / "bad")
    (tmp_path / "bad" / "a" / "junk.png").unlink()
    good = (tmp_path / "bad" / "a" / "ok.png").read_bytes()
    (tmp_path / "bad" / "a" / "cut.png").write_bytes(good[: len(good) // 2 + 10])  # header fine, data cut
    with pytest.raises(UsageError, match=r"bad/a/cut\.png: not a readable PNG/JPEG image"):
        read_table(tmp_path / "bad")
    with pytest.raises(UsageError, match="cut.png"):  # and packing leaves nothing behind
        store.pack(tmp_path / "bad", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_folders_that_are_not_image_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"empty: is a folder but not an image folder \(it is empty\)"):
        read_table(tmp_path / "empty")
    (tmp_path / "flat").mkdir()
    _img(tmp_path / "flat" / "a.png", np.zeros((2, 2), np.uint8))
    with pytest.raises(UsageError, match=r"flat: is a folder but not an image folder \(it has no class sub"):
        read_table(tmp_path / "flat")
    _img(tmp_path / "flat" / "cls" / "a.png", np.zeros((2, 2), np.uint8))
    (tmp_path / "flat" / "nothing").mkdir()
    with pytest.raises(UsageError, match=r"class folder\(s\) 'nothing' hold no \.png/\.jpg/\.jpeg files"):
        read_table(tmp_path / "flat")
    (tmp_path / "flat" / "nothing").rmdir()
    with pytest.raises(UsageError, match="image_size="):
        read_table(tmp_path / "flat", image_size=(0, 3))
    with pytest.raises(UsageError, match="target= cannot be used"):
        read_table(tmp_path / "flat", target="species")


def test_integer_class_names_sort_numerically(tmp_path):
    for c in ("10", "2", "1"):
        _img(tmp_path / "n" / c / "a.png", np.full((2, 2), int(c), np.uint8))
    x, y, classes, _ = read_table(tmp_path / "n")
    assert classes == ["1", "2", "10"] and y.tolist() == [0, 2, 1]  # files sorted by folder name as text
    assert x[:, 0, 0, 0].tolist() == [1, 10, 2]


def test_pack_round_trips_and_reads_from_a_url(rgb_dir, tmp_path):
    root, _ = rgb_dir
    direct = read_table(root)
    m = store.pack(root, tmp_path / "s", shard_rows=2)
    assert m["feature_shape"] == [3, 4, 6] and m["classes"] == ["cat", "dog"] and m["target"] == "label"
    assert m["source"]["format"] == "image" and m["source"]["files_ignored"] == 2 and len(m["shards"]) == 3
    packed = store.read_store(tmp_path / "s")
    assert store.verify(tmp_path / "s")["ok"] and packed[3]["kind"] == "image"
    # pack stores the images in a fixed shuffled order (shards mix the classes): the same rows
    order = np.random.default_rng(0).permutation(5)
    assert m["source"]["image_order"] == "shuffled (seed 0)"
    for a, b in zip(direct[:2], packed[:2], strict=True):
        assert np.array_equal(a[order], b) and a.dtype == b.dtype
    assert store.read_data(root)[0].shape == (5, 3, 4, 6)  # read_data: image folder or store
    fs = fsspec.filesystem("memory")
    try:
        for p in root.rglob("*"):
            if p.is_file():
                fs.pipe(f"/hpcml-imgs/{p.relative_to(root)}", p.read_bytes())
        via_url = read_table("memory://hpcml-imgs")
        assert np.array_equal(via_url[0], direct[0]) and via_url[2] == direct[2]
    finally:
        fs.rm("/hpcml-imgs", recursive=True)


def test_cli_pack_image_folder(rgb_dir, tmp_path, capsys):
    import hpcml.cli as cli
    from hpcml.cli_data import data_app

    if not any(g.name == "data" for g in cli.app.registered_groups):
        cli.app.add_typer(data_app, name="data")
    root, _ = rgb_dir
    out = tmp_path / "cli"
    assert cli.main(["data", "pack", str(root), "--out", str(out), "--image-size", "3x2", "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)["manifest"]
    assert manifest["feature_shape"] == [3, 3, 2] and manifest["source"]["images_resized"] == 5
    assert store.read_store(out)[0].shape == (5, 3, 3, 2)
    assert cli.main(["data", "pack", str(root), "--out", str(tmp_path / "o2"), "--image-size", "3y"]) == 2
    assert "--image-size '3y'" in capsys.readouterr().err


def test_store_folder_is_not_an_image_folder(rgb_dir, tmp_path):
    root, _ = rgb_dir
    store.pack(root, tmp_path / "s")
    with pytest.raises(HpcmlError, match="is an hpcml store"):
        read_table(tmp_path / "s")
