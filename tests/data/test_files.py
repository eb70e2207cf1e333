"""Reading user files: CSV, Parquet, NumPy, local and fsspec URLs; cleaning is counted, errors name things."""

import gzip

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpcml.data.files import read_table, redact_url
from hpcml.errors import UsageError

CSV = """a,b,c,label
1,2,7,cat
3,4,7,dog
1,2,7,cat
5,,7,dog
inf,6,7,cat
8,9,7,
2,1,7,bird
"""


@pytest.fixture
def csv_path(tmp_path):
    p = tmp_path / "animals.csv"
    p.write_text(CSV)
    return p


def test_csv_drop_counts_everything(csv_path):
    x, y, classes, report = read_table(csv_path, target="label")
    assert classes == ["bird", "cat", "dog"]  # text labels sorted as text
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert np.array_equal(x, np.array([[1, 2, 7], [3, 4, 7], [1, 2, 7], [2, 1, 7]], np.float32))
    assert y.tolist() == [1, 2, 1, 0]
    assert report["rows_read"] == 7 and report["rows"] == 4 and report["rows_dropped"] == 3
    assert report["rows_nonfinite"] == 2  # the empty b and the inf
    assert report["rows_missing_label"] == 1
    assert report["duplicate_rows"] == 1
    assert report["constant_columns"] == ["c"] and report["constant_column_count"] == 1
    assert report["class_counts"] == [1, 2, 1] and report["kind"] == "tabular"


@pytest.mark.parametrize(("how", "a_fill", "b_fill"), [("mean", 2.4, 3.0), ("median", 2.0, 2.0)])
def test_csv_imputes_per_column(csv_path, how, a_fill, b_fill):
    x, y, _, report = read_table(csv_path, target="label", missing=how)
    # the row without a label is still dropped (a label cannot be imputed); the fill values come from
    # the finite values of the labelled rows: a = 1,3,1,5,2 and b = 2,4,2,6,1
    assert report["rows"] == 6 and report["values_imputed"] == 2 and report["rows_missing_label"] == 1
    assert x[3, 1] == pytest.approx(b_fill) and x[4, 0] == pytest.approx(a_fill)
    assert np.isfinite(x).all() and y.tolist() == [1, 2, 1, 2, 1, 0]


def test_csv_missing_error_names_row_line_and_column(csv_path):
    with pytest.raises(UsageError, match=r"animals\.csv: row 4 \(line 5\): column 'b' is nan"):
        read_table(csv_path, target="label", missing="error")


def test_integer_labels_sort_numerically(tmp_path):
    p = tmp_path / "n.csv"
    p.write_text("f,y\n0.5,10\n1.5,2\n2.5,1\n3.5,2\n")
    _, y, classes, _ = read_table(p, target="y")
    assert classes == ["1", "2", "10"] and y.tolist() == [2, 1, 0, 1]


def test_regression_target(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("f,y\n1,0.5\n2,1.25\n3,nan\n")
    _, y, classes, report = read_table(p, target="y")
    assert classes is None and report["task"] == "regression"
    assert y.dtype == np.float32 and y.tolist() == [0.5, 1.25] and report["rows_missing_label"] == 1


def test_non_numeric_feature_names_column_value_and_line(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("a,b,label\n1,2,x\n3,abc,y\n")
    with pytest.raises(UsageError, match=r"bad\.csv: column 'b' is not numeric: found 'abc' \(line 3\)"):
        read_table(p, target="label")


def test_missing_target_lists_columns(csv_path):
    with pytest.raises(
        UsageError, match=r"target column 'species' not found; available columns: a, b, c, label"
    ):
        read_table(csv_path, target="species")
    with pytest.raises(UsageError, match="no target column given; available columns: a, b, c, label"):
        read_table(csv_path)


def test_malformed_csv_names_file_and_line(tmp_path):
    p = tmp_path / "ragged.csv"
    p.write_text("a,b,label\n1,2,x\n3,4,y\n5,6,7,8\n")
    with pytest.raises(UsageError, match=r"ragged\.csv: malformed CSV at line 4: Expected 3 columns, got 4"):
        read_table(p, target="label")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.csv", "", "empty.csv: empty file"),
        ("header.csv", "a,b,label\n", "header.csv: no data rows"),
        (
            "data.txt",
            "a\n1\n",
            "data.txt: unknown file type; expected one of .csv, .parquet, .pq, .npz, .npy",
        ),
        ("fake.parquet", "not parquet at all", "fake.parquet: not a readable Parquet file"),
    ],
)
def test_bad_files(tmp_path, name, content, message):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(UsageError, match=message.replace(".", r"\.")):
        read_table(p, target="label")


def test_missing_file_and_unknown_scheme(tmp_path):
    with pytest.raises(UsageError, match="nope.csv: file not found"):
        read_table(tmp_path / "nope.csv", target="y")
    with pytest.raises(UsageError, match=r"foo://bucket/x\.csv: unknown URL scheme"):
        read_table("foo://bucket/x.csv", target="y")
    with pytest.raises(UsageError, match="is a folder"):
        read_table(tmp_path, target="y")


def test_parquet_matches_csv(tmp_path, csv_path):
    import pyarrow.csv as pacsv

    table = pacsv.read_csv(csv_path, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    pq.write_table(table, tmp_path / "animals.parquet")
    a = read_table(csv_path, target="label")
    b = read_table(tmp_path / "animals.parquet", target="label")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert {k: v for k, v in a[3].items() if k not in ("source", "format")} == {
        k: v for k, v in b[3].items() if k not in ("source", "format")
    }


def test_parquet_text_feature_names_column_and_sample(tmp_path):
    pq.write_table(pa.table({"a": [1.0, 2.0], "city": [None, "Oslo"], "y": [0, 1]}), tmp_path / "t.parquet")
    with pytest.raises(
        UsageError, match=r"feature column 'city' is not numeric \(type string\), e\.g\. 'Oslo'"
    ):
        read_table(tmp_path / "t.parquet", target="y")
    x, _, _, _ = read_table(tmp_path / "t.parquet", target="y", features=["a"])
    assert x.tolist() == [[1.0], [2.0]]


def test_memory_url(csv_path):
    fs = fsspec.filesystem("memory")
    fs.pipe("/hpcml-test/animals.csv", csv_path.read_bytes())
    try:
        a = read_table("memory://hpcml-test/animals.csv", target="label")
    finally:
        fs.rm("/hpcml-test", recursive=True)
    b = read_table(csv_path, target="label")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_gzipped_csv(tmp_path, csv_path):
    p = tmp_path / "animals.csv.gz"
    p.write_bytes(gzip.compress(csv_path.read_bytes()))
    assert np.array_equal(read_table(p, target="label")[0], read_table(csv_path, target="label")[0])


def test_npz_keeps_image_shape(tmp_path):
    x = np.arange(4 * 1 * 2 * 3, dtype=np.float64).reshape(4, 1, 2, 3)
    np.savez(tmp_path / "imgs.npz", x=x, y=np.array([3, 1, 3, 2]))
    xs, y, classes, report = read_table(tmp_path / "imgs.npz")
    assert xs.shape == (4, 1, 2, 3) and np.array_equal(xs, x.astype(np.float32))
    assert classes == ["1", "2", "3"] and y.tolist() == [2, 0, 2, 1] and report["kind"] == "image"


def test_npy_pair(tmp_path):
    np.save(tmp_path / "feat.npy", np.array([[1, 2], [3, 4], [5, 6]], np.int32))
    with pytest.raises(UsageError, match=r"labels file .*feat\.labels\.npy not found"):
        read_table(tmp_path / "feat.npy")
    np.save(tmp_path / "feat.labels.npy", np.array(["b", "a", "b"]))
    x, y, classes, _ = read_table(tmp_path / "feat.npy")
    assert x.tolist() == [[1, 2], [3, 4], [5, 6]] and classes == ["a", "b"] and y.tolist() == [1, 0, 1]


def test_numpy_object_arrays_are_refused(tmp_path):
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}, 2], dtype=object), y=np.array([0, 1]))
    with pytest.raises(UsageError, match=r"obj\.npz: holds Python objects \(pickle\); hpcml never unpickles"):
        read_table(tmp_path / "obj.npz")
    np.savez(tmp_path / "nokeys.npz", features=np.zeros((2, 2)))
    with pytest.raises(UsageError, match=r"no array 'x' in the \.npz; it holds features"):
        read_table(tmp_path / "nokeys.npz")


def test_urls_lose_their_credentials_in_messages():
    assert redact_url("https://bob:s3cret@host:8080/d.csv") == "https://host:8080/d.csv"
    assert redact_url("s3://bucket/d@1.csv") == "s3://bucket/d@1.csv"
    with pytest.raises(UsageError) as err:
        read_table("foo://bob:s3cret@host/d.csv", target="y")
    assert "s3cret" not in str(err.value) and "foo://host/d.csv" in str(err.value)


def test_repeated_rows_marks_later_copies_only():
    from hpcml.data.clean import repeated_rows

    x = np.array([[1, 2], [3, 4], [1, 2], [1, 2], [5, 6], [3, 4]], np.float32)
    y = np.array([0, 1, 0, 1, 0, 1])
    # row 2 repeats row 0; row 3 has the same features but another label; row 5 repeats row 1
    assert repeated_rows(x, y).tolist() == [False, False, True, False, False, True]
