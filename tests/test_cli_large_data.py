"""`jointkl fit --data file.npy` / `--data folder/`: memory-mapped rows, streamed by SVI with a
batch size (the same fit as from a CSV), read into memory otherwise; the run records a
fingerprint of the files, and --resume refuses changed data."""

import json
import os

import numpy as np
import pytest
import torch

from jointkl.cli import main
from jointkl.fit import Fit


def argv(data, out, steps=12, *extra):
    return [
        "fit", "gmm", "--engine", "svi", "--data", str(data), "--out", str(out),
        "--set", "n_components=2", "--set", "covariance=diag", "--set", f"steps={steps}",
        "--set", "checkpoint_every=4", "--set", "progress=false", "--draws", "2", *extra,
    ]  # fmt: skip


@pytest.fixture
def points(tmp_path):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-3, 1, (60, 2)), rng.normal(3, 1, (60, 2))])
    np.save(tmp_path / "x.npy", x)
    np.savetxt(tmp_path / "x.csv", x, delimiter=",")
    folder = tmp_path / "shards"
    folder.mkdir()
    for i, part in enumerate(np.array_split(x, 4)):
        np.save(folder / f"part-{i:02d}.npy", part)
    return x


def test_streamed_npy_and_shards_fit_as_the_csv_does(tmp_path, points, capsys):
    batch = ("--set", "batch_size=16")
    assert main(argv(tmp_path / "x.csv", tmp_path / "csv", 12, *batch)) == 0
    assert main(argv(tmp_path / "x.npy", tmp_path / "npy", 12, *batch)) == 0
    assert main(argv(tmp_path / "shards", tmp_path / "dir", 12, *batch)) == 0
    ref = Fit.load(tmp_path / "csv")
    for run in ("npy", "dir"):
        fit = Fit.load(tmp_path / run)
        assert fit.history == ref.history, run
        for k in ref.params:
            assert torch.equal(fit.params[k], ref.params[k]), (run, k)
        assert fit.info["data_held"] == {"rows": 120, "of": 120, "how": "evenly spaced"}
        config = json.loads((tmp_path / run / "config.json").read_text())
        fp = config["data_fingerprint"]
        assert fp["shape"] == [120, 2] and fp["dtype"] == "float32"  # SVI's float32
        assert fp["stored_dtype"] == "float64" and config["data_digest"] == fp["digest"]
    assert [f["name"] for f in fp["files"]] == [f"part-{i:02d}.npy" for i in range(4)]
    assert (tmp_path / "npy" / "inference_data.nc").is_file()


def test_npy_for_an_engine_that_does_not_stream_is_read_into_memory(tmp_path, points):
    assert main(argv(tmp_path / "x.npy", tmp_path / "npy")) == 0  # no batch_size: full batch
    assert main(argv(tmp_path / "x.csv", tmp_path / "csv")) == 0
    a, b = Fit.load(tmp_path / "npy"), Fit.load(tmp_path / "csv")
    assert a.history == b.history and "data_held" not in a.info
    assert "data_fingerprint" not in json.loads((tmp_path / "npy" / "config.json").read_text())


def test_resume_of_a_streamed_run_continues_and_refuses_changed_data(tmp_path, points, capsys):
    batch = ("--set", "batch_size=16")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(argv(tmp_path / "x.npy", whole, 12, *batch)) == 0
    assert main(argv(tmp_path / "x.npy", cut, 8, *batch)) == 0
    resume = ["fit", "gmm", "--out", str(cut), "--resume", "--set", "steps=12", "--draws", "2"]
    assert main(resume) == 0  # the run's own data file, found again from config.json
    a, b = Fit.load(whole), Fit.load(cut)
    assert a.history == b.history
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k]), k
    changed = points.copy()
    changed[-1, 0] += 1.0  # the last row: inside the hashed tail
    np.save(tmp_path / "x.npy", changed)
    capsys.readouterr()
    assert main([*resume[:-2], "--set", "steps=16", "--draws", "2"]) == 2
    err = capsys.readouterr().err
    assert "the data" in err and "differ from the run's" in err and len(err.splitlines()) == 1
    # the same bytes written again (a new mtime) are refused too: the fingerprint is cheap,
    # not content-complete, and says so in docs/large-data.md
    np.save(tmp_path / "x.npy", points)
    os.utime(tmp_path / "x.npy", ns=(1, 1))
    assert main([*resume[:-2], "--set", "steps=16", "--draws", "2"]) == 2


def test_bad_shard_folder_is_one_line_exit_2(tmp_path, points, capsys):
    np.save(tmp_path / "shards" / "part-09.npy", np.ones((3, 5)))
    assert main(argv(tmp_path / "shards", tmp_path / "run", 4, "--set", "batch_size=8")) == 2
    err = capsys.readouterr().err
    assert "part-09.npy" in err and "expected float64 and (2,)" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "config.json").exists()
