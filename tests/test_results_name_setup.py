"""Every result names what was measured: the model, its token reduction and restoration, the data with its
options, the input size, and the machine load where anything was timed (eval's line and JSON, sweep rows,
bench rows)."""
import csv
import json

import pytest
from checkpoint_helpers import classifier_checkpoint, segmenter_checkpoint
from cli_helpers import cli

FAST = ("--batch-size", "2", "--threads", "1", "--repeats", "1", "--warmup", "0", "--latency-repeats", "1",
        "--no-progress")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("named")
    classifier_checkpoint(root / "cls.pth", {"method": "evit", "keep_rate": 0.5})
    segmenter_checkpoint(root / "seg.pth", {"method": "tome", "r": 6, "restore": "unmerge"})
    return root


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_dense_eval_names_reduction_restoration_data_options_and_load(ckpts, tmp_path, capsys):
    out = tmp_path / "e.json"
    rc, text, err = cli(capsys, "eval", "--checkpoint", ckpts / "seg.pth", "--data", "digits-seg", "--no-progress",
                        "--max-batches", "1", "--batch-size", "4", "--output", out)
    assert rc == 0, err
    res = json.loads(out.read_text())
    assert res["reduction"]["method"] == "tome" and res["reduction"]["r"] == 6 and res["restore"] == "unmerge"
    assert res["data_options"]["canvas_size"] == 32 and res["img_size"] == "32x32" and res["split"] == "val"
    assert res["machine_load"].startswith("machine load")
    assert "tome:6 (" in text and "restore unmerge" in text and "canvas_size=32" in text and "machine load" in text
    rc, text, err = cli(capsys, "eval", "--checkpoint", ckpts / "seg.pth", "--data", "digits-seg", "--no-progress",
                        "--max-batches", "1", "--batch-size", "4", "--reduction", "none", "--output", out)
    assert rc == 0, err
    assert "no token reduction" in text
    res = json.loads(out.read_text())
    assert res["reduction"] is None and res["restore"] is None


def test_classification_eval_says_when_there_is_no_reduction(ckpts, tmp_path, capsys):
    rc, text, err = cli(capsys, "eval", "--checkpoint", ckpts / "cls.pth", "--data", "digits", "--no-progress",
                        "--max-batches", "1", "--batch-size", "4", "--reduction", "none")
    assert rc == 0, err
    assert "no token reduction" in text and "machine load" in text


def test_sweep_rows_name_model_data_restoration_and_load(ckpts, tmp_path, capsys):
    rc, _, err = cli(capsys, "sweep", "--checkpoint", ckpts / "seg.pth", "--data", "digits-seg", "--reduction",
                     "tome:2", "--restore", "unmerge", "--limit-images", "4", "--eval-batch-size", "4",
                     *FAST, "--output", tmp_path / "s")
    assert rc == 0, err
    rows = _rows(tmp_path / "s" / "sweep.csv")
    assert [(r["reduction"], r["restore"]) for r in rows] == [("none", "-"), ("tome/unmerge", "unmerge")]
    for r in rows:
        assert r["model"] == "deit3_small_patch16_224" and r["data"] == "digits-seg" and r["img_size"] == "32x32"
        assert json.loads(r["data_options"])["canvas_size"] == 32 and r["machine_load"].startswith("machine load")


def test_bench_rows_name_the_machine_load(ckpts, tmp_path, capsys):
    rc, _, err = cli(capsys, "bench", "--models", ckpts / "cls.pth", "--reduction", "tome:2", *FAST, "--no-memory",
                     "--output", tmp_path / "b")
    assert rc == 0, err
    rows = _rows(tmp_path / "b" / "bench.csv")
    assert rows and all(r["machine_load"].startswith("machine load") and r["img_size"] == "32x32" for r in rows)
