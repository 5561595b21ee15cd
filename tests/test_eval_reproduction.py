"""One evaluation-data builder: `leanvit eval` on a training run reproduces the val top-1 its metrics logged,
and a plain timm model is evaluated with timm's own transform (its pretrained_cfg crop_pct, interpolation)."""
import json

import numpy as np
import pytest
import timm
import torch
from cli_helpers import cli
from PIL import Image

from leanvit.data import build_eval_dataset


def _logged_best_top1(run_dir):
    """The best val top-1 the run logged: what its best.pth was saved for."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return max(r["val_top1"] for r in rows if r.get("val_top1") is not None)


def _eval_top1(capsys, ckpt, tmp_path):
    out = tmp_path / "eval.json"
    rc, stdout, err = cli(capsys, "eval", "--checkpoint", ckpt, "--data", "digits", "--no-progress",
                          "--output", out)
    assert rc == 0, err
    return json.loads(out.read_text())["top1"]


@pytest.mark.slow
def test_eval_reproduces_logged_top1_for_the_demo_recipes(demo_quick_run, tmp_path, capsys):
    """The three demo recipes as `leanvit demo --quick` trains them (deit3_demo; evit_demo fine-tuned from it,
    reduced; shunted_demo)."""
    for name in ("deit3_demo", "evit_demo", "shunted_demo"):
        run = demo_quick_run / name
        logged = _logged_best_top1(run)
        assert 0 < logged < 100
        assert _eval_top1(capsys, run / "best.pth", tmp_path) == pytest.approx(logged, abs=1e-9), name


@pytest.mark.parametrize("name", ["deit_small_patch16_224", "deit3_small_patch16_224"])
def test_plain_timm_model_gets_timm_eval_transform(name, tmp_path):
    root = tmp_path / "tree" / "val"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (300, 411, 3), dtype=np.uint8)).save(root / c / "x.png")
    model = timm.create_model(name, pretrained=False)
    ds = build_eval_dataset(tmp_path / "tree", model)
    cfg = timm.data.resolve_model_data_config(model)
    ref = timm.data.create_transform(**cfg, is_training=False)
    img = Image.open(root / "a" / "x.png").convert("RGB")
    torch.testing.assert_close(ds[0][0], ref(img), rtol=0, atol=0)
    resize = ds.transform.transforms[0]
    assert resize.size == int(224 / cfg["crop_pct"])  # DeiT: 0.875 -> 256; DeiT III: 1.0 -> 224
    # overrides win
    ds = build_eval_dataset(tmp_path / "tree", model, crop_pct=0.5, interpolation="bilinear")
    assert ds.transform.transforms[0].size == 448 and "bilinear" in repr(ds.transform.transforms[0])
