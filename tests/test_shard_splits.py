"""Which shards validate a run: named explicitly (`val_data`) or found by whole words (`val`, `validation`),
never the training shards; and a path holding `[`, `*` or `?` that exists is that path, not a glob."""
import shutil

import pytest
from cli_helpers import cli_error, image_tree, one_line_error
from data_helpers import color_tree, write_shards

from leanvit.data import create_dataset, dataset_options
from leanvit.errors import LeanvitError


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return color_tree(tmp_path_factory.mktemp("sp") / "tree", per_class=(8, 4), size=16)


def test_val_is_a_whole_word_in_folder_mode(tree, tmp_path):
    sh = write_shards(tree, tmp_path / "r", shards=(2, 1), names=("retrieval-train", "retrieval-val"))
    assert len(create_dataset(str(sh), "train")) == 32
    assert len(create_dataset(str(sh), "val")) == 16  # not the 'retrieval-train' shards as well
    only_train = tmp_path / "t"
    only_train.mkdir()
    for f in sh.glob("*train*.tar"):
        shutil.copy(f, only_train)
    with pytest.raises(LeanvitError, match="no val shards.*'val' or 'validation'"):
        create_dataset(str(only_train), "val")


def test_training_pattern_never_validates_the_run(tree, tmp_path, capsys):
    sh = write_shards(tree, tmp_path / "s", shards=(2, 1))
    pattern = str(sh / "data-train-*.tar")
    with pytest.raises(LeanvitError, match="val_data"):
        create_dataset(pattern, "val", options=dataset_options(pattern, {"data": pattern}))
    rc, err = cli_error(capsys, "train", "--recipe", "deit3_demo", "--data", pattern, "--output", tmp_path / "o",
                        "--no-progress", "--img-size", "16", "--epochs", "1",
                        "--set", "model_kwargs={embed_dim: 16, depth: 1, num_heads: 1, patch_size: 8}")
    one_line_error(rc, err, "--val-data", "data-train-*.tar")
    assert not (tmp_path / "o" / "best.pth").exists()
    # named validation shards are used; a pattern given to eval is that pattern
    val = str(sh / "data-validation-*.tar")
    opts = dataset_options(pattern, {"data": pattern, "val_data": val})
    assert len(create_dataset(pattern, "val", options=opts)) == 16
    assert len(create_dataset(val, "val", options=opts)) == 16


@pytest.mark.parametrize("name", ["exp [1]", "exp*", "what?"])
def test_existing_paths_with_glob_characters_are_paths(tree, tmp_path, name):
    sh = write_shards(tree, tmp_path / name / "data", shards=(2, 1))
    assert len(create_dataset(str(sh), "val")) == 16
    one = sorted(sh.glob("*validation*.tar"))[0]
    assert len(create_dataset(str(one), "val")) == 16
    folder = image_tree(tmp_path / name / "imgs", per_class=2, size=8)
    assert len(create_dataset(str(folder), "val")) == 4


def test_val_data_none_trains_without_validation_and_records_it(tree, tmp_path, capsys, caplog):
    import logging

    from leanvit.checkpoints import read_checkpoint
    from leanvit.cli import main

    sh = write_shards(tree, tmp_path / "s", shards=(2, 1))
    pattern = str(sh / "data-train-*.tar")
    with caplog.at_level(logging.INFO):
        rc = main(["train", "--recipe", "deit3_demo", "--data", pattern, "--val-data", "none", "--output",
                   str(tmp_path / "o"), "--no-progress", "--img-size", "16", "--epochs", "1", "--batch-size", "8",
                   "--set", "max_train_batches=2",
                   "--set", "model_kwargs={embed_dim: 16, depth: 1, num_heads: 1, patch_size: 8}"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "no validation images (val_data none)" in out + err + caplog.text, out + err
    ck = read_checkpoint(tmp_path / "o" / "last.pth")
    assert ck["config"]["val_data"] == "none" and not (tmp_path / "o" / "best.pth").exists()
    assert all("val_top1" not in row for row in ck["history"])
