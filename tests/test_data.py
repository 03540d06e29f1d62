import numpy as np
import pytest
import torch

from jointkl import InputError
from jointkl.data import bind_arguments, load_table


def model_xy(x, y):
    pass


def model_one(data):
    pass


def test_csv_header_binds_columns_to_arguments_by_name(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("y,x\n1,10\n2,20\n")
    args, kwargs = bind_arguments(load_table(p), model_xy)
    assert args == ()
    assert torch.equal(kwargs["x"], torch.tensor([10.0, 20.0]))
    assert torch.equal(kwargs["y"], torch.tensor([1.0, 2.0]))


def test_csv_without_header_is_the_first_argument(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("1,10\n2,20\n3,30\n")
    args, kwargs = bind_arguments(load_table(p), model_xy)
    assert kwargs == {} and args[0].shape == (3, 2)


def test_header_not_naming_arguments_gives_the_whole_table(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("a,b\n1,10\n2,20\n")
    (table,), _ = bind_arguments(load_table(p), model_one)
    assert table.shape == (2, 2)


def test_partial_name_match_is_an_error(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("x,z\n1,10\n")
    with pytest.raises(InputError, match=r"columns \['z'\] name no argument"):
        bind_arguments(load_table(p), model_xy)


def test_npy_and_npz(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(6.0).reshape(3, 2))
    (a,), _ = bind_arguments(load_table(tmp_path / "a.npy"), model_xy)
    assert a.shape == (3, 2)
    np.savez(tmp_path / "b.npz", x=np.arange(3.0), y=np.ones(3))
    _, kw = bind_arguments(load_table(tmp_path / "b.npz"), model_xy)
    assert set(kw) == {"x", "y"}
    # integer columns stay integer (counts, labels)
    np.savez(tmp_path / "c.npz", x=np.arange(3), y=np.ones(3))
    _, kw = bind_arguments(load_table(tmp_path / "c.npz"), model_xy)
    assert kw["x"].dtype == torch.int64


@pytest.mark.parametrize(
    "content, needle",
    [
        ("", "empty"),
        ("a,b\n", "no data rows"),
        ("1,2\n3,x\n", "non-numeric"),
        ("a,a\n1,2\n", "duplicate column"),
    ],
)
def test_malformed_csv_errors_name_the_problem(tmp_path, content, needle):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(InputError, match=needle):
        bind_arguments(load_table(p), model_one)


def test_unknown_format_and_corrupt_npz(tmp_path):
    (tmp_path / "d.txt").write_text("1")
    with pytest.raises(InputError, match="unknown format"):
        load_table(tmp_path / "d.txt")
    (tmp_path / "e.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="cannot read"):
        load_table(tmp_path / "e.npz")
