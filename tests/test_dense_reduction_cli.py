"""Dense models with a token reduction through the engine and the commands: a reduced fine-tune of a dense
run (recipe ``reduction:`` with its ramp), ``eval --reduction/--restore`` of dense checkpoints, the dense
sweep over methods x restorations, and the errors."""
import json

import pytest
import torch
from cli_helpers import cli, cli_error, one_line_error

from leanvit.checkpoints import read_checkpoint
from leanvit.train import train

VIT = {"patch_size": 8, "embed_dim": 48, "depth": 5, "num_heads": 3, "init_values": 0.1}
SCENES = {"canvas_size": 48, "min_digit": 10, "max_digit": 24, "max_objects": 2, "val_fraction": 0.02}


def _cfg(out, **kw):
    cfg = dict(task="segmentation", model="deit3_small_patch16_224", model_kwargs=VIT, img_size=48, min_size=48,
               max_size=48, data="digits-seg", digits_dense=SCENES, hflip=0.0, epochs=1, batch_size=4,
               max_train_batches=2, opt="adamw", lr=1e-3, warmup_epochs=0, loss="ce", mixup=0.0, cutmix=0.0,
               three_augment=False, workers=0, output=str(out), seed=0, segmenter="upernet",
               head_kwargs={"channels": 16})
    cfg.update(kw)
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("dred")
    base = train(_cfg(root / "base"), device="cpu", progress=False)
    reduced = train(_cfg(root / "evit", finetune=base["best"], epochs=2,
                         reduction={"method": "evit", "keep_rate": 0.5, "restore": "fused", "start_epoch": 0,
                                    "epochs": 1}),
                    device="cpu", progress=False)
    return root, base, reduced


def test_reduced_finetune_records_the_reduction_and_ramps(runs):
    root, base, reduced = runs
    ck = read_checkpoint(reduced["best"])
    spec = ck["model_spec"]["kwargs"]["reduction"]
    assert spec["method"] == "evit" and spec["keep_rate"] == 0.5 and spec["restore"] == "fused"
    # the whole model came from the unreduced run (same weights before training moved them)
    b = read_checkpoint(base["best"])["model"]
    assert set(b) == set(ck["model"])
    from leanvit.tasks.dense import load_dense_model
    model, *_ = load_dense_model(reduced["last"])
    bb = model.backbone
    assert bb.restoration().name == "fused" and bb.vit.keep_rate == 0.5  # the ramp ended at the target


def test_eval_applies_or_changes_the_reduction(runs, capsys, tmp_path):
    root, base, reduced = runs
    results = {}
    for name, extra in (("plain", []), ("evit", ["--reduction", "evit:0.5"]),
                        ("tome", ["--reduction", "tome:6", "--restore", "reactivate"])):
        rc, text, err = cli(capsys, "eval", "--checkpoint", base["best"], "--data", "digits-seg", "--no-progress",
                            "--output", tmp_path / f"{name}.json", *extra)
        assert rc == 0, err
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert results["evit"]["val_pixel_acc"] != results["plain"]["val_pixel_acc"]  # applied, not ignored
    rc, text, err = cli(capsys, "eval", "--checkpoint", reduced["best"], "--data", "digits-seg", "--no-progress",
                        "--restore", "keep")
    assert rc == 0, err
    for args, needle in ((["--reduction", "tome:abc"], "abc"), (["--reduction", "evit:0.5", "--restore", "unmerge"],
                                                                "unmerge"),
                         (["--reduction", "evit:1.5"], "1.5"), (["--restore", "bogus"], "bogus")):
        rc, err = cli_error(capsys, "eval", "--checkpoint", base["best"], "--data", "digits-seg", *args)
        one_line_error(rc, err, needle)


def _csv(path):
    import csv
    with open(path) as f:
        return list(csv.DictReader(f))


def test_dense_sweep_over_methods_and_restorations(runs, capsys, tmp_path):
    root, base, _ = runs
    rc, text, err = cli(capsys, "sweep", "--checkpoint", base["best"], "--data", "digits-seg", "--reduction",
                        "evit:0.5", "tome:6", "--batch-size", "2", "--eval-batch-size", "8", "--repeats", "1",
                        "--latency-repeats", "1", "--warmup", "0", "--limit-images", "8", "--no-progress",
                        "--output", tmp_path / "sw", "--max-drop", "1")
    assert rc == 0, err
    rows = _csv(tmp_path / "sw" / "sweep.csv")
    got = {(r["reduction"], r["strength"]) for r in rows}
    assert got == {("none", "-"), ("evit/keep", "0.5"), ("evit/fused", "0.5"), ("evit/reactivate:1", "0.5"),
                   ("tome/unmerge", "6"), ("tome/reactivate:1", "6")}
    assert all(r["gmacs"] for r in rows)
    assert (tmp_path / "sw" / "pareto.png").exists()
    assert "--restore" in text  # the chosen point's command line names its restoration
    rc, text, err = cli(capsys, "sweep", "--checkpoint", base["best"], "--data", "digits-seg", "--reduction",
                        "tome:6", "--restore", "unmerge", "--batch-size", "2", "--repeats", "1", "--latency-repeats",
                        "1", "--warmup", "0", "--limit-images", "4", "--no-progress", "--output", tmp_path / "sw2")
    assert rc == 0, err
    assert [r["reduction"] for r in _csv(tmp_path / "sw2" / "sweep.csv")] == ["none", "tome/unmerge"]


def test_restore_on_a_classifier_and_dense_data_mismatch_are_one_line_errors(runs, capsys):
    root, base, _ = runs
    rc, err = cli_error(capsys, "eval", "--model", "deit_tiny_patch16_224", "--data", "digits", "--img-size", "32",
                        "--reduction", "evit:0.5", "--restore", "keep")
    one_line_error(rc, err, "restore")
    rc, err = cli_error(capsys, "sweep", "--checkpoint", base["best"], "--data", "digits", "--reduction", "evit:0.5")
    one_line_error(rc, err, "digits")


@pytest.mark.slow
def test_demo_segment_quick(tmp_path, capsys):
    rc, text, err = cli(capsys, "demo", "--task", "segment", "--quick", "--no-progress", "--output", tmp_path)
    assert rc == 0, err
    report = (tmp_path / "segment" / "report.md").read_text()
    assert "Restorations at the same strength" in report and "| evit | 0.5 |" in report
    assert "evit/reactivate 0.5, blocks 1-2" in report and (tmp_path / "segment" / "pareto.png").exists()
    # every figure says where it comes from, and equals what `leanvit eval` prints for the same checkpoint
    import re
    assert "throughput at batch 16" in report and "batch 64" not in report and "machine load" in report
    linear, fpn = (float(v) for v in re.search(r"linear head ([\d.]+) vs Semantic FPN ([\d.]+)", report).groups())
    for recipe, figure in (("vit_linear_seg_demo", linear), ("vit_semfpn_seg_demo", fpn)):
        out = tmp_path / f"{recipe}.json"
        rc, _, err = cli(capsys, "eval", "--checkpoint", tmp_path / "segment" / recipe / "best.pth", "--data",
                         "digits-seg", "--no-progress", "--output", out)
        assert rc == 0, err
        assert round(json.loads(out.read_text())["val_miou"], 4) == figure
    assert re.search(r"its mIoU on 16 validation images, a subset", report)
