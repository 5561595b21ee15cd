"""``none`` / ``off`` / ``-`` mean no token reduction in every command, also on a checkpoint trained with one
(``docs/reduction-settings.md``): eval, viz, export and bench measure the unreduced model, never the
checkpoint's own reduction."""
import csv
import json

import pytest
from checkpoint_helpers import classifier_checkpoint, segmenter_checkpoint
from cli_helpers import cli, cli_error, one_line_error


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """An EViT-trained classifier (keep rate 0.5) and a ToMe-trained segmenter, as `leanvit train` records them."""
    root = tmp_path_factory.mktemp("none")
    classifier_checkpoint(root / "cls.pth", {"method": "evit", "keep_rate": 0.5})
    segmenter_checkpoint(root / "seg.pth", {"method": "tome", "r": 6, "restore": "unmerge"})
    return root


def _eval(capsys, tmp_path, ckpt, data, *extra):
    out = tmp_path / "e.json"
    rc, text, err = cli(capsys, "eval", "--checkpoint", ckpt, "--data", data, "--no-progress", "--max-batches", "1",
                        "--batch-size", "4", "--output", out, *extra)
    assert rc == 0, err
    return text, json.loads(out.read_text())


@pytest.mark.parametrize("word", ["none", "off", "-"])
def test_eval_none_on_a_reduced_classifier_is_unreduced(ckpts, tmp_path, capsys, word):
    text, res = _eval(capsys, tmp_path, ckpts / "cls.pth", "digits", "--reduction", word)
    assert "keep_rate" not in text and res["reduction"] is None and res["keep_rate"] is None
    text, own = _eval(capsys, tmp_path, ckpts / "cls.pth", "digits")
    assert "keep_rate=0.5" in text and own["reduction"]["keep_rate"] == 0.5


def test_eval_none_on_a_reduced_segmenter_equals_tome_0(ckpts, tmp_path, capsys):
    _, none = _eval(capsys, tmp_path, ckpts / "seg.pth", "digits-seg", "--reduction", "none")
    _, zero = _eval(capsys, tmp_path, ckpts / "seg.pth", "digits-seg", "--reduction", "tome:0")
    _, own = _eval(capsys, tmp_path, ckpts / "seg.pth", "digits-seg")
    assert none["val_pixel_acc"] == zero["val_pixel_acc"] and none["val_miou"] == zero["val_miou"]
    assert none["reduction"] is None and own["reduction"]["method"] == "tome"


def test_none_with_keep_rate_or_restore_is_one_line(ckpts, capsys):
    for extra, needle in ((["--keep-rate", "0.5"], "--keep-rate"), (["--restore", "keep"], "--restore")):
        rc, err = cli_error(capsys, "eval", "--checkpoint", ckpts / "seg.pth", "--data", "digits-seg",
                            "--reduction", "none", *extra)
        one_line_error(rc, err, "none", needle)


def test_viz_none_on_a_reduced_classifier_draws_nothing_reduced(ckpts, tmp_path, capsys):
    """viz draws the reduction's tokens: with `none` there is none to draw, so it says so (not the EViT ones)."""
    rc, err = cli_error(capsys, "viz", "--checkpoint", ckpts / "cls.pth", "--data", "digits", "--num-images", "1",
                        "--reduction", "none", "--output", tmp_path / "v")
    one_line_error(rc, err, "does not reduce tokens")


def test_export_none_on_a_reduced_classifier(ckpts, tmp_path, capsys):
    rc, out, err = cli(capsys, "export", "--checkpoint", ckpts / "cls.pth", "--reduction", "none", "--format", "pt2",
                       "--output", tmp_path / "m.pt2", "--no-verify")
    assert rc == 0, err
    assert "is fixed in this file" not in out and "evit" not in out
    rc, out, err = cli(capsys, "export", "--checkpoint", ckpts / "cls.pth", "--format", "pt2",
                       "--output", tmp_path / "m2.pt2", "--no-verify")
    assert rc == 0 and "is fixed in this file" in out


def test_bench_none_on_an_evit_model_is_unreduced(tmp_path, capsys):
    rc, _, err = cli(capsys, "bench", "--models", "evit_deit_tiny_patch16_224", "--img-sizes", "32",
                     "--num-classes", "3", "--reduction", "none", "evit:0.5", "--batch-size", "2", "--threads",
                     "1", "--repeats", "1", "--warmup", "0", "--latency-repeats", "0", "--no-progress",
                     "--no-memory", "--output", tmp_path / "b")
    assert rc == 0, err
    with open(tmp_path / "b" / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["reduction"], r["strength"]) for r in rows] == [("-", "-"), ("evit", "0.5")]


def test_flops_none_on_an_evit_model_counts_the_unreduced_model(capsys):
    rc, none, err = cli(capsys, "flops", "evit_deit_tiny_patch16_224", "--reduction", "none")
    assert rc == 0, err
    rc, plain, err = cli(capsys, "flops", "deit_tiny_patch16_224")
    assert rc == 0, err
    assert "(no token reduction)" in none and none.split(": ")[1] == plain.split(": ")[1]
    rc, own, err = cli(capsys, "flops", "evit_deit_tiny_patch16_224")
    assert "evit keep_rate=" in own and own.split(": ")[1] != plain.split(": ")[1]
