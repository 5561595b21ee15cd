"""Training: recipes, augmentations, BCE targets, keep-rate schedule, resume, bad data, NaN stop, torchrun."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from cli_helpers import cli_error, image_tree, one_line_error
from PIL import Image, ImageOps

from leanvit.errors import LeanvitError
from leanvit.train import list_recipes, load_recipe, resolve_config, train

TINY = dict(model="deit3_small_patch16_224",
            model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}, img_size=32, data="digits",
            digits={"val_fraction": 0.05}, crop="none", hflip=0.0, batch_size=16, max_train_batches=3, epochs=2,
            warmup_epochs=1, lr=1e-3, opt="adamw", loss="ce", mixup=0.0, cutmix=0.0, workers=0)


def _run(tmp_path, name="run", **kw):
    cfg = {**TINY, "output": str(tmp_path / name), **kw}
    return train(cfg, progress=False, device="cpu")


# ---------------------------------------------------------------- recipes
def test_every_shipped_recipe_resolves():
    names = list_recipes()
    for needed in ["deit3_s_in1k", "deit3_m_in1k", "deit3_b_in1k", "deit3_l_in1k", "deit3_h_in1k",
                   "deit3_b_ft224", "deit3_l_ft224", "deit3_h_ft224", "deit3_s_ft384", "deit3_b_ft384",
                   "deit3_l_ft384", "deit3_s_in21k", "deit3_h_in21k", "deit3_b_in21k_ft1k",
                   "evit_deit_s_finetune", "evit_deit_s_scratch", "shunted_t", "shunted_s", "shunted_b",
                   "deit3_demo", "evit_demo", "shunted_demo"]:
        assert needed in names
    for n in names:
        resolve_config(n, {"data": "digits"})


def test_recipe_values_match_the_reference():
    s = load_recipe("deit3_s_in1k")
    assert ((s["opt"], s["lr"], s["drop_path"], s["img_size"], s["epochs"], s["loss"])
            == ("lamb", 4e-3, 0.05, 224, 800, "bce"))
    assert (s["mixup"], s["cutmix"], s["smoothing"], s["weight_decay"], s["crop"]) == (0.8, 1.0, 0.0, 0.05, "rrc")
    h = load_recipe("deit3_h_in1k")
    assert (h["model"], h["img_size"], h["drop_path"], h["lr"]) == ("deit3_huge_patch14_224", 160, 0.6, 3e-3)
    ft = load_recipe("deit3_b_ft224")
    assert (ft["opt"], ft["lr"], ft["weight_decay"], ft["epochs"], ft["drop_path"]) == ("adamw", 1e-5, 0.1, 20, 0.2)
    i21 = load_recipe("deit3_h_in21k")
    assert (i21["epochs"], i21["img_size"], i21["crop"], i21["mixup"], i21["lr"]) == (90, 128, "src", 0.0, 1e-3)
    e = load_recipe("evit_deit_s_scratch")
    assert (e["keep_rate"], e["keep_rate_start_epoch"], e["keep_rate_epochs"], e["epochs"]) == (0.7, 10, 100, 300)
    f = load_recipe("evit_deit_s_finetune")
    assert (f["keep_rate_start_epoch"], f["keep_rate_epochs"], f["epochs"], f["lr"]) == (0, 0, 30, 8e-5)
    assert load_recipe("shunted_b")["clip_grad"] == 1.0 and load_recipe("shunted_t")["drop_path"] == 0.1


def test_recipe_errors_are_clear(tmp_path):
    with pytest.raises(LeanvitError, match="did you mean: deit3_demo"):
        load_recipe("deit3_dmo")
    with pytest.raises(LeanvitError, match="unknown setting 'learning_rate'"):
        resolve_config("deit3_demo", {"learning_rate": 1.0})
    with pytest.raises(LeanvitError, match="smoothing 0"):
        resolve_config("deit3_s_in1k", {"smoothing": 0.1})
    with pytest.raises(LeanvitError, match="keep_rate"):
        resolve_config("evit_demo", {"keep_rate": 1.5})
    with pytest.raises(LeanvitError, match="recipe .deit3_s_in1k. needs data"):
        train("deit3_s_in1k", progress=False)


# ---------------------------------------------------------------- augmentations
def test_three_augment_applies_exactly_one_op_uniformly():
    import random

    from leanvit.data.transforms import three_augment_ops

    rng = np.random.default_rng(0)
    arr = (rng.random((24, 24, 3)) * 255).astype(np.uint8)
    arr[:12] = 30  # flat region: blur leaves it, solarize inverts nothing below 128
    img = Image.fromarray(arr)
    solarized = np.asarray(ImageOps.solarize(img, 128))
    op = three_augment_ops()
    random.seed(0)
    counts = {"gray": 0, "solarize": 0, "blur": 0}
    for _ in range(300):
        out = np.asarray(op(img))
        if (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all():
            counts["gray"] += 1
        elif (out == solarized).all():
            counts["solarize"] += 1
        else:
            assert not (out == arr).all()  # something was applied
            counts["blur"] += 1
    assert all(60 <= c <= 140 for c in counts.values()), counts


def test_simple_random_crop_and_eval_transform():
    from leanvit.data.transforms import SimpleRandomCrop, build_eval_transform, build_train_transform

    img = Image.fromarray(np.zeros((40, 60, 3), np.uint8))
    crop = SimpleRandomCrop(32, padding=4)
    noise = (np.arange(40 * 60 * 3) % 251).reshape(40, 60, 3).astype(np.uint8)
    outs = {np.asarray(crop(Image.fromarray(noise))).tobytes() for _ in range(10)}
    assert np.asarray(crop(img)).shape == (32, 32, 3) and len(outs) > 1  # random placement
    assert build_eval_transform(32)(img).shape == (3, 32, 32)
    t = build_train_transform(32, crop="src", three_augment=True, color_jitter=0.3)
    assert t(img).shape == (3, 32, 32)
    rand_t = build_train_transform(32, crop="rrc", auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25)
    assert rand_t(img).shape == (3, 32, 32)
    with pytest.raises(LeanvitError, match="crop mode"):
        build_train_transform(32, crop="zoom")


def test_bce_targets_follow_deit3_threshold_rule():
    from timm.data import Mixup

    from leanvit.tasks.classification import build_loss as _build_loss

    torch.manual_seed(0)
    np.random.seed(0)
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8) % 4
    mixed_x, soft = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=4, label_smoothing=0.0)(x, y)
    assert ((soft > 0).sum(1) >= 1).all() and ((soft > 0) & (soft < 1)).any()
    logits = torch.randn(8, 4)
    loss = _build_loss(resolve_config(None, {"loss": "bce"}), mixing=True)(logits, soft)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, (soft > 0).float())
    assert torch.allclose(loss, expected)


# ---------------------------------------------------------------- training
def test_resume_continues_exactly(tmp_path):
    straight = _run(tmp_path, "straight", epochs=2)
    _run(tmp_path, "split", epochs=1)
    # a later run with more epochs resumes after epoch 1 (schedule defined by the final epoch count)
    _run_cfg = {**TINY, "output": str(tmp_path / "split"), "epochs": 2}
    first = torch.load(tmp_path / "split" / "last.pth", weights_only=True)
    assert first["epoch"] == 1
    train(_run_cfg, progress=False, device="cpu", resume=True)
    a = torch.load(straight["last"], weights_only=True)["model"]
    b = torch.load(tmp_path / "split" / "last.pth", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and "val_top1" in rows[-1]
    assert (tmp_path / "split" / "metrics.csv").read_text().startswith("epoch,")


def test_resume_exactness_needs_same_lr_schedule_length(tmp_path):
    """The cosine length comes from the run's epochs, so straight 2 epochs == 1 (of 2) + resume."""
    _run(tmp_path, "a", epochs=2, max_train_batches=2)
    s = torch.load(tmp_path / "a" / "last.pth", weights_only=True)
    assert s["epoch"] == 2 and s["model_spec"]["name"] == TINY["model"]
    with pytest.raises(LeanvitError, match="nothing to resume"):
        train({**TINY, "output": str(tmp_path / "nothing")}, progress=False, resume=True)


def test_keep_rate_schedule_in_training(tmp_path):
    res = _run(tmp_path, "evit", keep_rate=0.5, keep_rate_start_epoch=1, keep_rate_epochs=1, epochs=3,
               eval_every=3)
    keeps = [r["strength"] for r in res["history"]]
    from leanvit.reduction.evit import keep_rate_schedule

    assert keeps[0] == 1.0
    assert keeps[1] == pytest.approx(keep_rate_schedule(5, 0.5, 3, 3))  # last iteration of epoch 2
    assert keeps[2] == 0.5
    spec = res["model_spec"]
    assert spec["reduction"] == {"method": "evit", "keep_rate": 0.5}  # the target, not the schedule


def test_finetune_to_higher_resolution_resamples_pos_embed(tmp_path):
    base = _run(tmp_path, "base", epochs=1, max_train_batches=1)
    res = _run(tmp_path, "ft", epochs=1, max_train_batches=1, img_size=48, finetune=base["last"], keep_rate=0.7)
    sd = torch.load(res["last"], weights_only=True)["model"]
    assert sd["pos_embed"].shape[1] == 36  # 6x6 patches at 48 px (no class slot in deit3's pos_embed)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(LeanvitError, match="non-finite loss.*intact"):
        _run(tmp_path, "nan", opt="sgd", lr=1e30, warmup_epochs=0, epochs=3, max_train_batches=1)
    state = torch.load(tmp_path / "nan" / "last.pth", weights_only=True)
    assert state["epoch"] >= 1 and "pos_embed" in state["model"]  # the epoch-end checkpoint before the failure


def test_image_folder_training_and_bad_data(tmp_path):
    root = image_tree(tmp_path / "data")
    res = _run(tmp_path, "folder", data=str(root), batch_size=4, epochs=1, digits={})
    assert res["best_top1"] >= 0
    (root / "train" / "a" / "1.png").write_bytes(b"not an image")
    with pytest.raises(LeanvitError, match=r"cannot read image .*1\.png"):
        _run(tmp_path, "corrupt", data=str(root), batch_size=4, epochs=1, digits={})
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        res = _run(tmp_path, "skip", data=str(root), batch_size=4, epochs=1, digits={}, skip_corrupt=True)
    assert res["skipped_images"] == 1
    (root / "train" / "empty").mkdir()
    with pytest.raises(LeanvitError, match="empty holds no images"):
        _run(tmp_path, "empty", data=str(root), batch_size=4, epochs=1, digits={})
    (root / "train" / "empty").rmdir()
    (root / "train" / "a" / "1.png").unlink()
    (root / "val" / "c").mkdir()
    Image.new("RGB", (8, 8)).save(root / "val" / "c" / "x.png")
    with pytest.raises(LeanvitError, match="unexpected \\['c'\\]"):
        _run(tmp_path, "classes", data=str(root), batch_size=4, epochs=1, digits={})


def test_train_cli_overrides_and_errors(tmp_path, capsys):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "leanvit.cli", "train", "--recipe", "deit3_demo", "--epochs", "1",
           "--max-train-batches", "2", "--batch-size", "16", "--output", str(tmp_path / "cli"), "--no-progress",
           "--set", "model_kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
           "--set", "digits.val_fraction=0.05", "--lr", "1e-3"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cli" / "best.pth").exists() and "val top-1" in r.stdout
    cfg = (tmp_path / "cli" / "config.yaml").read_text()
    assert "lr: 0.001" in cfg and "val_fraction: 0.05" in cfg
    rc, err = cli_error(capsys, *cmd[3:6], "--learning-rate", "3")  # in this process: the same parser
    one_line_error(rc, err, "unknown setting 'learning_rate'")


def test_set_null_removes_an_inherited_value():
    """``--set reduction=null`` under a recipe whose base sets a reduction: the control run is unreduced
    (``None`` in the overrides means "not given" and leaves the recipe's value)."""
    import argparse

    from leanvit.tools.train import parse_overrides
    from leanvit.train.recipes import NULL

    assert resolve_config("vit_linear_seg_evit_demo")["reduction"] is not None
    assert resolve_config("vit_linear_seg_evit_demo", {"reduction": None})["reduction"] is not None
    assert resolve_config("vit_linear_seg_evit_demo", {"reduction": NULL, "freeze": NULL})["reduction"] is None
    nested = resolve_config("vit_linear_seg_demo", {"model_kwargs": {"init_values": NULL}})["model_kwargs"]
    assert nested["init_values"] is None and nested["patch_size"] == 8  # no LayerScale; the rest kept
    args = argparse.Namespace(set=["reduction=null", "lr=null"], finetune_partial=False)
    over = parse_overrides(args, [])
    assert over["reduction"] is NULL and over["lr"] is NULL


def test_torchrun_two_processes_gloo(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           "-m", "leanvit.cli", "train", "--recipe", "deit3_demo", "--epochs", "2", "--max-train-batches", "2",
           "--batch-size", "8", "--output", str(out), "--no-progress", "--device", "cpu",
           "--set", "model_kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
           "--set", "digits.val_fraction=0.05"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "x 2 process(es)" in r.stdout
    assert r.stdout.count("epoch 2/2:") == 1  # only rank 0 prints and writes
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[-1]["val_top1"] >= 0
    assert torch.load(out / "last.pth", weights_only=True)["epoch"] == 2


def test_deit3_pieces_together_lamb_bce_mixup_ema_repeated_aug_clip(tmp_path):
    res = _run(tmp_path, "full", opt="lamb", loss="bce", smoothing=0.0, mixup=0.8, cutmix=1.0, model_ema=True,
               model_ema_decay=0.9, repeated_aug=True, clip_grad=1.0, drop_path=0.1, three_augment=True,
               crop="src", epochs=1)
    row = res["history"][-1]
    assert np.isfinite(row["train_loss"]) and "ema_val_top1" in row
    state = torch.load(res["last"], weights_only=True)
    assert state["ema"] is not None and state["ema"].keys() == state["model"].keys()
    assert not torch.equal(state["ema"]["head.weight"], state["model"]["head.weight"])


def test_freeze_keeps_the_matching_parameters_fixed(tmp_path):
    """``freeze``: parameters matching the patterns do not move in training, the others do; a pattern that
    matches nothing, or one that freezes everything, is a clear error."""
    from leanvit.checkpoints import read_checkpoint

    _run(tmp_path, "base", epochs=1)
    start = read_checkpoint(tmp_path / "base" / "last.pth")["model"]
    _run(tmp_path, "frozen", epochs=1, finetune=str(tmp_path / "base" / "last.pth"),
         freeze=["patch_embed.*", "blocks.0.*", "cls_token"])
    end = read_checkpoint(tmp_path / "frozen" / "last.pth")["model"]
    frozen = [k for k in start if k.startswith(("patch_embed.", "blocks.0.")) or k == "cls_token"]
    assert frozen and all(torch.equal(start[k], end[k]) for k in frozen)
    assert not torch.equal(start["blocks.1.mlp.fc1.weight"], end["blocks.1.mlp.fc1.weight"])
    with pytest.raises(LeanvitError, match="freeze pattern 'block.0.*' matches no parameter"):
        _run(tmp_path, "bad", freeze=["block.0.*"])
    with pytest.raises(LeanvitError, match="leaves no parameter to train"):
        _run(tmp_path, "all", freeze=["*"])


def test_history_of_older_runs_reads_keep_rate_as_strength():
    """Rows written before the column was named ``strength`` (``keep_rate``, whatever the method) resume as it."""
    import torch.nn as nn

    from leanvit.train.state import TrainState
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    st = TrainState(model, opt, None)
    old = st.checkpoint()
    old.update(epoch=2, history=[{"epoch": 0, "keep_rate": 8}, {"epoch": 1, "keep_rate": 13}])
    st.load(old)
    assert [r["strength"] for r in st.history] == [8, 13] and all("keep_rate" not in r for r in st.history)
