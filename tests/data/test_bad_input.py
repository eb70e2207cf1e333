"""Bad data input ends with a clear error that names the file, column or class: never "aborted",
never a bare traceback, never a model trained on data that cannot teach it anything."""

import bz2
import gzip
import lzma
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from PIL import Image

import hpcml
from hpcml.config import DataConfig
from hpcml.data.files import read_table
from hpcml.data.user import DataWarning, load_user_dataset
from hpcml.errors import HpcmlError, UsageError


def _csv(path, n=60, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    rows = [f"{a:.4f},{b:.4f},{i % classes}" for i, (a, b) in enumerate(rng.normal(size=(n, 2)))]
    path.write_text("a,b,y\n" + "\n".join(rows) + "\n")
    return path


def _cut(src, dst, compress=gzip.compress):
    """`dst`: `src` compressed, then cut in half, as an interrupted download or copy leaves it."""
    raw = compress(src.read_bytes())
    dst.write_bytes(raw[: len(raw) // 2])
    return dst


def _cfg(data, **over):
    cfg = {
        "data": {"name": str(data), "target": "y"},
        "model": {"name": "mlp", "kwargs": {"hidden": 16}},
        "epochs": 1,
        "threads": 1,
        "precision": "fp32",
    }
    return cfg | over


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A good CSV, its gzip cut in half, and a model dir trained on the good CSV."""
    d = tmp_path_factory.mktemp("bad-input")
    good = _csv(d / "good.csv")
    cut = _cut(good, d / "cut.csv.gz")
    run = hpcml.train(_cfg(good), out=d / "run")
    return {"dir": d, "good": good, "cut": cut, "model": run.dir / "model"}


# ------------------------------------------------------------------------- truncated / corrupt files


@pytest.mark.parametrize("command", ["train", "pack", "predict", "evaluate"])
def test_cut_csv_gz_is_an_error_naming_the_file_in_the_cli(cli, files, command):
    cut, d = str(files["cut"]), files["dir"]
    args = {
        "train": ["train", "--data", cut, "--target", "y", "--epochs", "1", "--out", str(d / f"r-{command}")],
        "pack": ["data", "pack", cut, "--out", str(d / "store"), "--target", "y"],
        "predict": ["predict", str(files["model"]), "--input", cut, "--output", str(d / "p.csv")],
        "evaluate": ["evaluate", str(files["model"]), "--data", cut],
    }[command]
    r = cli(*args)
    assert r.returncode == 1, r.stderr  # was 130 with "aborted": click turned gzip's EOFError into Abort
    assert "cut.csv.gz: truncated or corrupt gzip file" in r.stderr
    assert "aborted" not in r.stderr and "Traceback" not in r.stderr and "EOFError" not in r.stderr
    assert not (d / "store").exists() and not (d / "p.csv").exists()


def test_cut_csv_gz_is_an_hpcml_error_in_the_api(files, tmp_path):
    cut = files["cut"]
    with pytest.raises(HpcmlError, match=r"cut\.csv\.gz: truncated or corrupt gzip file"):
        hpcml.train(_cfg(cut), out=tmp_path / "run")
    with pytest.raises(HpcmlError, match=r"cut\.csv\.gz: truncated or corrupt gzip file"):
        hpcml.predict(files["model"], str(cut))
    with pytest.raises(HpcmlError, match=r"cut\.csv\.gz: truncated or corrupt gzip file"):
        hpcml.evaluate(files["model"], str(cut))
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.parametrize(
    ("suffix", "compress", "kind"),
    [(".gz", gzip.compress, "gzip"), (".bz2", bz2.compress, "bz2"), (".xz", lzma.compress, "xz")],
)
def test_cut_or_garbled_compressed_csv_is_named(tmp_path, suffix, compress, kind):
    big = _csv(tmp_path / "big.csv", n=200_000)  # > one 4 MB read block: the cut is found mid-stream
    cut = _cut(big, tmp_path / f"cut.csv{suffix}", compress)
    with pytest.raises(HpcmlError, match=rf"cut\.csv\{suffix}: truncated or corrupt {kind} file"):
        read_table(cut, target="y")
    raw = bytearray(compress(_csv(tmp_path / "small.csv").read_bytes()))
    raw[len(raw) // 2 : len(raw) // 2 + 4] = b"\xff\x00\xff\x00"  # flipped bytes in the middle
    bad = tmp_path / f"bad.csv{suffix}"
    bad.write_bytes(bytes(raw))
    with pytest.raises(HpcmlError, match=rf"bad\.csv\{suffix}: truncated or corrupt {kind} file"):
        read_table(bad, target="y")
    plain = tmp_path / f"plain.csv{suffix}"  # not compressed at all, despite its name
    plain.write_bytes(b"a,b,y\n1,2,0\n")
    with pytest.raises(HpcmlError, match=rf"plain\.csv\{suffix}: truncated or corrupt {kind} file"):
        read_table(plain, target="y")


def test_cli_reports_an_escaped_eoferror_as_an_error_not_an_abort(tmp_path):
    # Defense in depth: an EOFError that escapes any command (click turns it into Abort) is exit 1
    # with its message, not "aborted" / 130. A throwaway command in a fresh process raises one.
    code = textwrap.dedent(
        """
        import sys
        from hpcml import cli

        @cli.app.command("boom")
        def boom() -> None:
            raise EOFError("Compressed file ended before the end-of-stream marker was reached")

        sys.exit(cli.main(["boom"]))
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "hpcml: error: unexpected end of input: Compressed file ended" in r.stderr
    assert "aborted" not in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------ classes


def test_one_class_target_is_refused(cli, tmp_path):
    one = tmp_path / "one.csv"
    one.write_text("a,b,y\n" + "".join(f"{i},{i * 2 % 5},yes\n" for i in range(20)))
    with pytest.raises(UsageError, match=r"one\.csv: target column 'y' has only one class \('yes'\)"):
        hpcml.train(_cfg(one), out=tmp_path / "run")
    assert not (tmp_path / "run" / "report.json").exists()  # was trained, with test accuracy 1.0
    r = cli("train", "--data", str(one), "--target", "y", "--epochs", "1", "--out", str(tmp_path / "r"))
    assert r.returncode == 2, r.stderr
    assert "one.csv: target column 'y' has only one class ('yes')" in r.stderr
    assert "Traceback" not in r.stderr


def _rare(tmp_path):
    """Classes a and b with 9 rows each, class c with a single row: the split may put it in test."""
    p = tmp_path / "rare.csv"
    rows = [f"{i},{i % 7},{'ab'[i % 2]}" for i in range(18)] + ["5,5,c"]
    p.write_text("a,b,y\n" + "\n".join(rows) + "\n")
    return p


def test_class_missing_from_the_training_split_warns(tmp_path):
    rare = _rare(tmp_path)
    warned = []
    for seed in range(12):
        cfg = DataConfig(name=str(rare), target="y", data_seed=seed)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            ds = load_user_dataset(cfg)
        ours = [w for w in record if issubclass(w.category, DataWarning)]
        c = ds.classes.index("c")
        missing = c not in ds.y_train
        assert bool(ours) == missing, seed  # a warning exactly when class c has no training row
        if missing:
            warned.append(seed)
            assert "rare.csv: class(es) 'c' (1 row) of target 'y' have no rows in the training split" in str(
                ours[0].message
            )
            assert ds.report["classes_missing_from_train"] == ["c"]
    assert warned and len(warned) < 12  # both cases were seen


def test_class_missing_from_the_training_split_warns_in_the_cli(cli, tmp_path):
    rare = _rare(tmp_path)

    def c_in_train(seed: int) -> bool:
        ds = load_user_dataset(DataConfig(name=str(rare), target="y", data_seed=seed))
        return ds.classes.index("c") in ds.y_train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        seed = next(s for s in range(50) if not c_in_train(s))
    r = cli(
        "train", "--data", str(rare), "--target", "y", "--epochs", "1", "--threads", "1", "--quiet",
        "--set", f"data.data_seed={seed}", "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "hpcml: warning: " in r.stderr and "class(es) 'c' (1 row)" in r.stderr


# ----------------------------------------------------------------------------------------- messages


def test_all_missing_column_is_named(tmp_path):
    p = tmp_path / "holes.csv"
    p.write_text("a,b,c,y\n" + "".join(f"{i},,{'NaN' if i % 2 else ''},{i % 2}\n" for i in range(10)))
    with pytest.raises(UsageError, match=r"holes\.csv: column\(s\) 'b', 'c' hold no values") as err:
        read_table(p, target="y")
    assert "'a'" not in str(err.value)


def test_too_few_rows_for_a_split_says_how_many_and_what_is_needed(tmp_path):
    p = tmp_path / "tiny.csv"
    p.write_text("a,b,y\n1,2,0.5\n")
    with pytest.raises(
        UsageError,
        match=r"tiny\.csv: 1 row after cleaning is too few for a test split: it needs at least 2 rows",
    ):
        load_user_dataset(DataConfig(name=str(p), target="y"))
    p.write_text("a,b,y\n1,2,0.5\n3,4,1.5\n")  # 2 rows: 20% rounds to 0 test rows, yet 1 + 1 works
    ds = load_user_dataset(DataConfig(name=str(p), target="y"))
    assert (len(ds.x_train), len(ds.x_test)) == (1, 1)
    with pytest.raises(
        UsageError, match=r"tiny\.csv: 1 row left after the test split is too few for a validation split"
    ):
        load_user_dataset(DataConfig(name=str(p), target="y", val_fraction=0.1))
    p.write_text("a,b,y\n" + "".join(f"{i},{i % 3},{i / 2}\n" for i in range(10)))
    with pytest.raises(
        UsageError,
        match=r"tiny\.csv: a validation split of 6 rows leaves none of the 5 rows left after the test",
    ):
        load_user_dataset(DataConfig(name=str(p), target="y", test_fraction=0.5, val_fraction=0.6))


def test_corrupt_png_names_the_file_not_a_python_object(tmp_path):
    root = tmp_path / "pics"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / cls / "ok.png")
    (root / "b" / "junk.png").write_bytes(b"not a png at all")
    with pytest.raises(UsageError) as err:
        read_table(root)
    assert str(err.value).startswith(f"{root}/b/junk.png: not a readable PNG/JPEG image")
    assert "object at 0x" not in str(err.value) and "fsspec" not in str(err.value)


@pytest.mark.parametrize("command", ["info", "verify"])
def test_data_info_on_a_file_says_it_takes_a_store(cli, files, command):
    r = cli("data", command, str(files["good"]))
    assert r.returncode == 2, r.stderr
    assert f"{files['good']}: is a file, not an hpcml store" in r.stderr
    assert "hpcml data pack" in r.stderr and "NotADirectoryError" not in r.stderr
