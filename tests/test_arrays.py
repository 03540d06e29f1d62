"""The memory-mapped row arrays (jointkl.data.arrays): reads equal NumPy's, shards join in
file-name order, bad files are refused in one line naming the file."""

import numpy as np
import pytest
import torch

from jointkl.data.arrays import RowArray, open_rows
from jointkl.data.tables import PrecisionWarning
from jointkl.errors import InputError


@pytest.fixture
def sharded(tmp_path):
    rng = np.random.default_rng(0)
    whole = rng.standard_normal((23, 3))
    folder = tmp_path / "shards"
    folder.mkdir()
    for name, (lo, hi) in zip(
        ["part-02.npy", "part-00.npy", "part-01.npy"], [(15, 23), (0, 7), (7, 15)], strict=True
    ):
        np.save(folder / name, whole[lo:hi])
    (folder / "README.txt").write_text("not a shard")
    return folder, whole


def test_one_file_reads_like_numpy(tmp_path):
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    np.save(tmp_path / "x.npy", x)
    a = open_rows(tmp_path / "x.npy")
    assert isinstance(a, RowArray)
    assert a.shape == (10, 4) and len(a) == 10 and a.dtype == np.float32 and a.ndim == 2
    assert np.array_equal(a[2:7], x[2:7]) and np.array_equal(a[:], x)
    assert np.array_equal(a[3], x[3]) and np.array_equal(a[-1], x[-1])
    idx = np.array([9, 0, 3, 3, 5])
    assert np.array_equal(a[idx], x[idx])
    assert np.array_equal(a[torch.tensor(idx)], x[idx])
    assert np.array_equal(a[::3], x[::3]) and np.array_equal(a[2:5, 1], x[2:5, 1])
    t = a.tensor(torch.tensor([4, 1]))
    assert t.dtype == torch.float32 and torch.equal(t, torch.from_numpy(x[[4, 1]]))


def test_shards_join_in_name_order_across_boundaries(sharded):
    folder, whole = sharded
    a = open_rows(folder)
    assert a.shape == whole.shape and a.dtype == np.float64
    assert [p.name for p in a.paths] == ["part-00.npy", "part-01.npy", "part-02.npy"]
    assert np.array_equal(a[5:17], whole[5:17])  # spans all three shards
    idx = np.random.default_rng(1).integers(0, 23, 50)
    assert np.array_equal(a[idx], whole[idx])
    starts = [s for s, _ in a.blocks(rows=6)]
    assert starts == [0, 6, 12, 18]
    assert np.array_equal(np.concatenate([b for _, b in a.blocks(rows=6)]), whole)
    assert np.array_equal(a.spread(5), whole[[0, 6, 11, 16, 22]])


def test_cast_keeps_or_narrows_as_asked(tmp_path):
    x = np.random.default_rng(0).standard_normal((8, 2))
    np.save(tmp_path / "x.npy", x)
    a = open_rows(tmp_path / "x.npy")
    assert a[:].dtype == np.float64  # float64 stays float64
    b = a.astype(torch.float32)
    assert b[:].dtype == np.float32 and np.array_equal(b[:], x.astype(np.float32))
    assert b.tensor(slice(0, 2)).dtype == torch.float32
    np.save(tmp_path / "big.npy", np.array([[1e300], [1.0]]))
    with pytest.raises(InputError, match="exceeds float32's range"):
        open_rows(tmp_path / "big.npy").astype(np.float32)
    np.save(tmp_path / "close.npy", np.array([1.0, 1.0 + 1e-12]))
    with pytest.warns(PrecisionWarning, match="merges 2 distinct values"):
        open_rows(tmp_path / "close.npy").astype(np.float32)
    np.save(tmp_path / "ints.npy", np.array([3, 1, 2], dtype=np.int32))
    ints = open_rows(tmp_path / "ints.npy").astype(np.float32)
    assert ints[:].dtype == np.int64  # category ids stay integers
    np.save(tmp_path / "flags.npy", np.array([True, False]))
    assert open_rows(tmp_path / "flags.npy")[:].dtype == np.float64
    np.save(tmp_path / "be.npy", np.arange(4, dtype=">f8"))
    assert open_rows(tmp_path / "be.npy").tensor(slice(None)).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda d: np.save(d / "a.npy", np.array([[1.0, np.nan]])),
            r"a\.npy: 1 NaN/inf value\(s\) in rows 0-0, the first at index \(0, 1\)",
        ),
        (lambda d: np.save(d / "a.npy", np.zeros((0, 2))), r"a\.npy: has no rows"),
        (lambda d: np.save(d / "a.npy", np.array(["x"])), r"a\.npy: has dtype <U1"),
        (lambda d: np.save(d / "a.npy", np.asfortranarray(np.ones((3, 2)))), "Fortran order"),
        (lambda d: (d / "a.npy").write_bytes(b"not numpy"), r"a\.npy: cannot read as \.npy"),
    ],
)
def test_bad_file_is_one_line_naming_it(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(InputError, match=message) as e:
        open_rows(tmp_path / "a.npy")
    assert "\n" not in str(e.value)


def test_bad_shards_are_named(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((2, 3)))
    np.save(tmp_path / "b.npy", np.ones((2, 4)))
    with pytest.raises(InputError, match=r"b\.npy: dtype float64 and row shape \(4,\); expected"):
        open_rows(tmp_path)
    (tmp_path / "b.npy").unlink()
    np.save(tmp_path / "b.npy", np.ones((2, 3), dtype=np.float32))
    with pytest.raises(InputError, match=r"b\.npy: dtype float32"):
        open_rows(tmp_path)
    (tmp_path / "b.npy").unlink()
    np.save(tmp_path / "b.npy", np.array([[1.0, 2.0, np.inf]]))
    with pytest.raises(
        InputError, match=r"b\.npy: 1 NaN/inf .* index \(0, 2\) \(row 2 of the whole"
    ):
        open_rows(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no .npy files"):
        open_rows(empty)
    with pytest.raises(InputError, match="not found"):
        open_rows(tmp_path / "missing.npy")


def test_fingerprint_sees_a_changed_file_without_reading_it(tmp_path):
    x = np.random.default_rng(0).standard_normal((100, 2))
    np.save(tmp_path / "x.npy", x)
    first = open_rows(tmp_path / "x.npy").fingerprint()
    assert first == open_rows(tmp_path / "x.npy").fingerprint()
    assert first["shape"] == [100, 2] and first["dtype"] == "float64"
    x[-1, 1] += 1.0
    np.save(tmp_path / "x.npy", x)
    assert open_rows(tmp_path / "x.npy").fingerprint()["digest"] != first["digest"]
