"""Dense training through the engine and the CLI: tiny runs (a few steps on small scenes)."""
import json

import pytest
import torch
from cli_helpers import cli, cli_error, one_line_error

from leanvit.errors import LeanvitError
from leanvit.train import train

TINY = {"depths": [1, 1, 1, 1], "embed_dims": [64, 32, 32, 32], "num_heads": [2, 2, 2, 2],
        "mlp_ratios": [1, 1, 1, 1]}
SCENES = {"canvas_size": 64, "min_digit": 10, "max_digit": 28, "max_objects": 3, "val_fraction": 0.02}


def _cfg(task: str, out, **kw):
    cfg = dict(task=task, model="shunted_t", model_kwargs=TINY, img_size=64, min_size=64, max_size=64,
               data="digits-det" if task == "detection" else "digits-seg", digits_dense=SCENES, hflip=0.0,
               epochs=2, batch_size=4, max_train_batches=2, opt="adamw", lr=1e-3, warmup_epochs=0, loss="ce",
               mixup=0.0, cutmix=0.0, three_augment=False, workers=0, output=str(out), seed=0)
    if task == "detection":
        cfg.update(detector="fcos", head_kwargs={"fpn_channels": 64, "head_convs": 1, "out_indices": [1, 2, 3]})
    else:
        cfg.update(segmenter="semantic_fpn", head_kwargs={"fpn_channels": 16, "channels": 16}, schedule="poly")
    cfg.update(kw)
    return cfg


@pytest.fixture(scope="module")
def det_run(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("det")
    res = train(_cfg("detection", out), device="cpu", progress=False)
    return out, res


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("seg")
    res = train(_cfg("segmentation", out), device="cpu", progress=False)
    return out, res


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_detection_run_logs_coco_metrics_and_keeps_best(det_run):
    out, res = det_run
    assert res["task"] == "detection" and res["main_metric"] == "val_map"
    rows = _rows(out)
    assert [r["epoch"] for r in rows] == [0, 1]
    for key in ("val_map", "val_map50", "val_map_small", "val_map_medium", "val_map_large"):
        assert key in rows[-1]
    assert 0.0 <= rows[-1]["val_map50"] <= 1.0
    assert "val_map50" in (out / "metrics.csv").read_text().splitlines()[0]
    best = torch.load(out / "best.pth", weights_only=True)
    assert best["val_map"] == pytest.approx(max(r["val_map"] for r in rows))
    assert best["model_spec"]["task"] == "detection" and best["model_spec"]["head"] == "fcos"
    last = torch.load(out / "last.pth", weights_only=True)  # the best so far, named for what it measures
    assert last["main_metric"] == "val_map" and last["best_metric"] == pytest.approx(best["val_map"])
    assert "best_top1" not in last


def test_detection_run_resumes(det_run, tmp_path):
    out, res = det_run
    import shutil

    run = tmp_path / "det"
    shutil.copytree(out, run)
    res2 = train(_cfg("detection", run, epochs=3), device="cpu", progress=False, resume=True)
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    last = torch.load(run / "last.pth", weights_only=True)
    assert last["epoch"] == 3 and last["step"] == 6
    assert res2["history"][-1]["epoch"] == 2


def test_segmentation_run_logs_miou_with_poly_schedule(seg_run):
    out, res = seg_run
    rows = _rows(out)
    assert res["main_metric"] == "val_miou"
    for key in ("val_miou", "val_miou_all", "val_pixel_acc"):
        assert 0.0 <= rows[-1][key] <= 1.0
    assert rows[-1]["lr"] < 1e-3  # the poly schedule decays
    assert (out / "best.pth").exists()


def test_eval_cli_prints_dense_metrics(det_run, seg_run, capsys, tmp_path):
    out, _ = det_run
    rc, text, err = cli(capsys, "eval", "--checkpoint", out / "best.pth", "--data", "digits-det", "--no-progress",
                        "--output", tmp_path / "r.json")
    assert rc == 0, err
    assert "map50" in text and "map_small" in text
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["task"] == "detection" and 0 <= r["val_map50"] <= 1
    best = torch.load(out / "best.pth", weights_only=True)
    assert r["val_map"] == pytest.approx(best["val_map"], abs=1e-6)  # the same images as training's validation
    sout, _ = seg_run
    rc, text, err = cli(capsys, "eval", "--checkpoint", sout / "best.pth", "--data", "digits-seg", "--no-progress")
    assert rc == 0 and "mIoU" in text, err


def test_eval_cli_task_mismatch_is_one_line_error(det_run, capsys):
    out, _ = det_run
    rc, err = cli_error(capsys, "eval", "--checkpoint", out / "best.pth", "--data", "digits-seg")
    one_line_error(rc, err, "segmentation data", "detection")


def test_viz_cli_draws_boxes(det_run, seg_run, capsys, tmp_path):
    out, _ = det_run
    rc, text, err = cli(capsys, "viz", "--checkpoint", out / "best.pth", "--data", "digits-det", "--num-images", "3",
                        "--output", tmp_path / "v", "--score-thresh", "0.0")
    assert rc == 0, err
    pngs = sorted(p.name for p in (tmp_path / "v").glob("*.png"))
    assert len(pngs) == 4 and "predictions.png" in pngs
    sout, _ = seg_run
    rc, text, err = cli(capsys, "viz", "--checkpoint", sout / "best.pth", "--data", "digits-seg", "--num-images", "2",
                        "--output", tmp_path / "s")
    assert rc == 0, err
    assert (tmp_path / "s" / "predictions.png").exists()


@pytest.mark.parametrize("over,needle", [
    ({"detector": None}, "needs detector"),
    ({"data": "digits"}, "is classification data"),
    ({"mixup": 0.8}, "mixup/cutmix"),
    ({"schedule": "step"}, "schedule must be"),
])
def test_bad_dense_settings_are_clear_errors(tmp_path, over, needle):
    with pytest.raises(LeanvitError, match=needle):
        train(_cfg("detection", tmp_path / "x", **over), device="cpu", progress=False)


def test_train_cli_runs_a_dense_recipe(capsys, tmp_path):
    torch.manual_seed(0)
    rc, text, err = cli(capsys, "train", "--recipe", "shunted_t_fcos_demo", "--output", tmp_path / "r",
                        "--epochs", "1", "--max-train-batches", "1", "--batch-size", "2", "--no-progress",
                        "--set", "digits_dense.val_fraction=0.02", "--set", "digits_dense.canvas_size=64",
                        "--img-size", "64", "--min-size", "64", "--max-size", "64")
    assert rc == 0, err
    assert "best val_map" in text


def test_coco_and_ade20k_folders_train_and_evaluate(tmp_path, capsys):
    """The on-disk layouts through the same engine: resized inputs, predictions scored in original coordinates."""
    from test_dense_data import _ade_tree, _coco_tree

    root = tmp_path / "coco"
    for split in ("train2017", "val2017"):
        _coco_tree(root, split=split)
    torch.manual_seed(0)
    res = train(_cfg("detection", tmp_path / "c", data=str(root), batch_size=2, epochs=1, min_size=64, max_size=96),
                device="cpu", progress=False)
    assert res["history"][-1]["val_map"] >= 0.0
    assert any("kept as negatives" in n for n in res["data_notes"])
    rc, text, err = cli(capsys, "eval", "--checkpoint", tmp_path / "c" / "best.pth", "--data", root, "--no-progress")
    assert rc == 0 and "map50" in text and "note: 1 box(es) with no width" in text, err
    ade = _ade_tree(tmp_path / "ade")
    res = train(_cfg("segmentation", tmp_path / "s", data=str(ade), batch_size=2, epochs=1, min_size=64,
                     crop_size=64, hflip=0.5), device="cpu", progress=False)
    assert 0.0 <= res["history"][-1]["val_miou"] <= 1.0


def test_train_cli_bad_coco_is_one_line_error(tmp_path, capsys):
    from test_dense_data import _coco_tree

    root = tmp_path / "coco"
    _coco_tree(root, split="train2017", drop_file="002.png")
    _coco_tree(root, split="val2017")
    rc, err = cli_error(capsys, "train", "--recipe", "shunted_t_fcos_demo", "--data", root, "--output", tmp_path / "o")
    one_line_error(rc, err, "instances_train2017.json", "missing from", "002.png")


@pytest.mark.slow
def test_demo_detect_quick(tmp_path, capsys):
    rc, text, err = cli(capsys, "demo", "--task", "detect", "--quick", "--output", tmp_path, "--no-progress")
    assert rc == 0, err
    report = (tmp_path / "detect" / "report.md").read_text()
    assert "PVT v2 baseline" in report and "AP small" in report and "At equal training" in report
    assert (tmp_path / "detect" / "boxes_shunted_t_fcos_demo" / "predictions.png").exists()


@pytest.mark.slow
def test_torchrun_two_processes_detection(tmp_path, capsys):
    """DDP: the loss through DistributedDataParallel, validation sharded and gathered: the run's val mAP is
    the one a single process computes on the whole validation set."""
    import os
    import subprocess
    import sys

    import yaml

    cfg = _cfg("detection", tmp_path / "ddp", epochs=1)
    cfg.pop("output")
    recipe = tmp_path / "tiny_det.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
           "-m", "leanvit.cli", "train", "--recipe", str(recipe), "--output", str(tmp_path / "ddp"),
           "--no-progress", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "x 2 process(es)" in r.stdout and r.stdout.count("epoch 1/1:") == 1
    row = _rows(tmp_path / "ddp")[-1]
    rc, text, err = cli(capsys, "eval", "--checkpoint", tmp_path / "ddp" / "best.pth", "--data", "digits-det",
                        "--no-progress", "--output", tmp_path / "e.json")
    assert rc == 0, err
    assert json.loads((tmp_path / "e.json").read_text())["val_map"] == pytest.approx(row["val_map"], abs=1e-6)


def test_maskrcnn_trains_on_instance_masks_with_amp(tmp_path):
    torch.manual_seed(0)
    # fewer sampled RoIs and proposals than torchvision's defaults (512 / 2000): bf16 autocast on a CPU
    # without bf16 units emulates it, and the mask head's 256-channel convolutions ran 8 s a step
    small = {"box_batch_size_per_image": 64, "rpn_post_nms_top_n_train": 200, "rpn_post_nms_top_n_test": 100,
             "box_detections_per_img": 20}
    res = train(_cfg("detection", tmp_path / "m", epochs=1, detector="maskrcnn", amp=True,
                     head_kwargs={"fpn_channels": 32, **small}), device="cpu", progress=False)
    row = res["history"][-1]
    assert torch.isfinite(torch.tensor(row["train_loss"])) and "val_map" in row
    assert 0.0 <= row["val_mask_map"] <= 1.0 and "val_mask_map50" in row  # mask AP beside box AP
    assert torch.load(tmp_path / "m" / "best.pth", weights_only=True)["config"]["detector"] == "maskrcnn"


def test_finetune_loads_a_classification_checkpoint_into_the_backbone(tmp_path):
    from leanvit import create_model, save_checkpoint
    from leanvit.tasks.dense import load_dense_model

    torch.manual_seed(1)
    clf = create_model("shunted_t", num_classes=10, img_size=64, **TINY)
    save_checkpoint({"model": clf.state_dict()}, tmp_path / "clf.pth")
    train(_cfg("segmentation", tmp_path / "ft", epochs=1, max_train_batches=1, lr=1e-9, warmup_lr=1e-9,
               finetune=str(tmp_path / "clf.pth")), device="cpu", progress=False)
    seg, *_ = load_dense_model(tmp_path / "ft" / "last.pth")
    got = seg.state_dict()
    name = next(k for k, v in clf.state_dict().items() if v.ndim == 4)  # the first conv of the stem
    match = [k for k in got if k.endswith("." + name)]
    assert match, (name, list(got)[:5])
    assert torch.allclose(got[match[0]], clf.state_dict()[name], atol=1e-6)  # lr ~0: still the checkpoint's


def test_iterations_budget_and_bad_mask_in_a_worker_is_one_line(tmp_path, capsys):
    from test_dense_data import _ade_tree

    res = train(_cfg("segmentation", tmp_path / "it", iterations=3, epochs=1), device="cpu", progress=False)
    assert len(res["history"]) == 2  # 3 steps at 2 per epoch: 2 whole epochs
    ade = _ade_tree(tmp_path / "ade", bad="value")
    rc, err = cli_error(capsys, "train", "--recipe", "shunted_t_semfpn_demo", "--data", ade, "--output",
                        tmp_path / "o", "--batch-size", "2", "--workers", "1", "--img-size", "64",
                        "--min-size", "64", "--crop-size", "64", "--epochs", "1", "--no-progress")
    one_line_error(rc, err, "a1.png", "holds value 151")


def test_finetune_takes_the_backbone_of_another_head_or_task(seg_run, tmp_path):
    """A dense checkpoint of another head or task on the same backbone initializes the backbone only (a
    Semantic FPN run's ViT under a detector, a linear head...); another backbone is a one-line error."""
    from leanvit.dense.reduction import dense_backbone_of
    from leanvit.tasks import get_task
    from leanvit.tasks.dense import load_dense_model
    from leanvit.train.recipes import resolve_config

    out, res = seg_run
    task = get_task("detection")
    cfg = resolve_config(None, _cfg("detection", tmp_path / "det"))
    det, spec, note = task.build_model(cfg, 10, finetune=res["last"])
    assert "backbone initialized from the semantic_fpn segmentation checkpoint" in note
    seg, *_ = load_dense_model(res["last"])
    theirs = dense_backbone_of(seg).state_dict()
    mine = dense_backbone_of(det).state_dict()
    assert mine and set(mine) <= set(theirs)
    for k, v in mine.items():
        assert torch.equal(v, theirs[k]), k
    other = resolve_config(None, _cfg("detection", tmp_path / "det2", model="deit3_small_patch16_224",
                                      model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}))
    with pytest.raises(LeanvitError, match="not on this run's backbone deit3_small_patch16_224"):
        task.build_model(other, 10, finetune=res["last"])
