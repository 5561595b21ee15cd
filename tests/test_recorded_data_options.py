"""The data options a run was trained with travel with its checkpoint: eval, viz and sweep read the data as
training did (Hugging Face columns and split, shard class maps), `--set KIND.OPTION=VALUE` overrides one;
Hugging Face labels are class indices or class names, anything else a one-line error; the class-name
mismatch message reads."""
import json

import numpy as np
import pytest
from checkpoint_helpers import classifier_checkpoint
from cli_helpers import cli, cli_error, one_line_error
from PIL import Image

from leanvit.data import create_dataset
from leanvit.errors import LeanvitError

HF = {"image_column": "pic", "label_column": "fine", "val_split": "holdout"}


def _png(seed):
    import io
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((12, 12, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _hf(path, fine=None, coarse=None, n=6):
    import datasets
    feats = datasets.Features({"pic": datasets.Image(), "fine": datasets.ClassLabel(names=["a", "b", "c"]),
                               "coarse": datasets.Value("string")})
    parts = {split: datasets.Dataset.from_dict(
        {"pic": [_png(i) for i in range(n)], "fine": fine or [i % 3 for i in range(n)],
         "coarse": coarse or ["x" if i % 2 else "y" for i in range(n)]}, features=feats)
        for split in ("train", "holdout")}
    datasets.DatasetDict(parts).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("opts")
    data = _hf(root / "hf")
    cfg = {"data": str(data), "hf": HF, "img_size": 32}
    classifier_checkpoint(root / "ck.pth", num_classes=3, config=cfg, classes=["a", "b", "c"])
    classifier_checkpoint(root / "other.pth", num_classes=3, config=cfg, classes=["a", "b", "zz"])
    return root, data


def test_eval_and_viz_read_the_data_as_training_did(setup, tmp_path, capsys):
    root, data = setup
    out = tmp_path / "e.json"
    rc, text, err = cli(capsys, "eval", "--checkpoint", root / "ck.pth", "--data", data, "--no-progress",
                        "--output", out)
    assert rc == 0, err
    res = json.loads(out.read_text())
    assert res["images"] == 6 and res["data_options"]["label_column"] == "fine"
    assert "val_split=holdout" in text
    rc, _, err = cli(capsys, "viz", "--checkpoint", root / "ck.pth", "--data", data, "--num-images", "2",
                     "--reduction", "evit:0.5", "--output", tmp_path / "v")
    assert rc == 0, err


def test_set_overrides_a_recorded_data_option(setup, capsys):
    root, data = setup
    rc, err = cli_error(capsys, "eval", "--checkpoint", root / "ck.pth", "--data", data,
                        "--set", "hf.label_column=coarse")
    one_line_error(rc, err, "3 classes", "has 2")  # the text column: two class names, x and y
    for bad, needle in (("hf.nope=1", "nope"), ("colour=red", "no data option"), ("hf.label_column", "KIND.OPTION")):
        rc, err = cli_error(capsys, "eval", "--checkpoint", root / "ck.pth", "--data", data, "--set", bad)
        one_line_error(rc, err, needle)
    from leanvit.data import with_data_overrides
    assert with_data_overrides({"hf": {"a": 1}}, None) == {"hf": {"a": 1}}


def test_class_name_mismatch_message_reads(setup, capsys):
    root, data = setup
    rc, err = cli_error(capsys, "eval", "--checkpoint", root / "other.pth", "--data", data)
    one_line_error(rc, err, "differ from those", "1 of its classes are not in the data ('zz')",
                   "1 of the data's classes are not among its classes ('c')")
    assert "than those" not in err


def test_hf_text_none_and_float_labels(tmp_path):
    from leanvit.data.hf import read_labels
    assert read_labels([2, 0], "label", "d") == ([2, 0], None)
    assert read_labels(["dog", "cat", "dog"], "label", "d") == ([1, 0, 1], ["cat", "dog"])
    assert read_labels(["dog"], "label", "d", classes=["ant", "cat", "dog"]) == ([2], ["ant", "cat", "dog"])
    for values, needle in (([1, None], "row 1 holds None"), ([1.0, 2.7], "row 0 holds 1.0 (float)"),
                           ([1, "cat"], "mixes"), (["emu"], "'emu'")):
        with pytest.raises(LeanvitError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            read_labels(values, "label", "d", classes=["cat"] if values == ["emu"] else None)
    # a dataset whose label column holds class names: the classes are those names, sorted
    data = _hf(tmp_path / "hf")
    ds = create_dataset(str(data), "val", options={**HF, "label_column": "coarse"})
    assert ds.classes == ["x", "y"] and list(ds.targets) == [1, 0, 1, 0, 1, 0]
