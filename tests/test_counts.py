"""Counts that must not vanish: images skipped in DataLoader worker processes, samples of a shard that
reuse a key, a shard cut short at a member boundary; and an undecodable shard image named by its key."""
import io
import logging
import tarfile

import numpy as np
import pytest
import torch
from cli_helpers import image_tree
from data_helpers import png_bytes

from leanvit.data import create_dataset
from leanvit.data.shards import ShardDataset, index_shard
from leanvit.errors import LeanvitError


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_skips_in_loader_workers_are_counted(tmp_path):
    root = image_tree(tmp_path / "t", per_class=4, size=8)
    (root / "train" / "a" / "1.png").write_bytes(b"not a png")
    (root / "train" / "b" / "2.png").write_bytes(b"not a png either")
    ds = create_dataset(str(root), "train", transform=lambda im: torch.zeros(1), skip_corrupt=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    assert sum(len(y) for _, y in loader) == 8  # (each worker warns in its own process)
    assert ds.num_skipped == 2  # skipped in the workers, counted here


def test_duplicate_keys_in_a_shard_are_kept_and_counted(tmp_path, caplog):
    img = png_bytes()
    path = _tar(tmp_path / "d-train-0.tar", [("a.png", img), ("a.cls", b"0"), ("b.png", img), ("b.cls", b"1"),
                                             ("a.png", img), ("a.cls", b"1")])
    with caplog.at_level(logging.WARNING, logger="leanvit.data.shards"):
        rows = index_shard(str(path))
    assert [(k, lab) for k, _, _, lab in rows] == [("a", 0), ("b", 1), ("a#2", 1)]
    assert "1 sample(s) reuse the key of an earlier one (e.g. a)" in caplog.text


def test_a_shard_cut_at_a_member_boundary_is_noted(tmp_path, caplog):
    img = png_bytes()
    path = _tar(tmp_path / "c-train-0.tar", [(f"{k}.{e}", img if e == "png" else b"0")
                                             for k in ("a", "b", "c") for e in ("png", "cls")])
    with tarfile.open(path) as tar:
        cut = [m for m in tar][4].offset  # where c.png's header starts: a and b are whole
    data = path.read_bytes()[:cut]
    path.write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="leanvit.data.shards"):
        rows = index_shard(str(path))
    assert [k for k, *_ in rows] == ["a", "b"]
    assert "ends without tar's end-of-archive blocks" in caplog.text and "read 2 sample(s)" in caplog.text
    caplog.clear()
    whole = _tar(tmp_path / "w-train-0.tar", [("a.png", img), ("a.cls", b"0")])
    with caplog.at_level(logging.WARNING, logger="leanvit.data.shards"):
        index_shard(str(whole))
    assert "end-of-archive" not in caplog.text


def test_an_undecodable_shard_image_is_named_by_its_key(tmp_path):
    path = _tar(tmp_path / "u-train-0.tar", [("k1.png", b"garbage"), ("k1.cls", b"0")])
    ds = ShardDataset([str(path)])
    with pytest.raises(LeanvitError) as e:
        ds.load(0)
    assert "u-train-0.tar:k1" in str(e.value) and "BytesIO" not in str(e.value)
    assert np.asarray(ds.targets).tolist() == [0]
