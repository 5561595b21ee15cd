"""`leanvit sweep` on detection and segmentation checkpoints (the demo recipes trained for a few steps):
sweep.csv ranks by the task's metric (mAP / mIoU), each row's figure is what `leanvit eval` prints for the
same configuration, and pareto.png is written."""
import csv
import json

import pytest
from cli_helpers import cli

from leanvit.train import train

QUICK = {"epochs": 1, "max_train_batches": 2, "batch_size": 4, "digits_dense": {"val_fraction": 0.02},
         "workers": 0, "time_limit": None, "warmup_epochs": 0}


@pytest.mark.slow
@pytest.mark.parametrize("recipe,data,metric,others", [
    ("shunted_t_fcos_demo", "digits-det", "val_map", ("val_map50", "val_map_small")),
    ("shunted_t_semfpn_demo", "digits-seg", "val_miou", ("val_miou_all", "val_pixel_acc")),
])
def test_dense_sweep_rows_match_eval(recipe, data, metric, others, tmp_path, capsys):
    res = train(recipe, device="cpu", progress=False, output=str(tmp_path / "run"), **QUICK)
    ckpt = res["best"]
    js = tmp_path / "eval.json"
    rc, text, err = cli(capsys, "eval", "--checkpoint", ckpt, "--data", data, "--batch-size", "8", "--no-progress",
                        "--output", js)
    assert rc == 0, err
    ev = json.loads(js.read_text())
    out = tmp_path / "sweep"
    rc, text, err = cli(capsys, "sweep", "--checkpoint", ckpt, "--data", data, "--eval-batch-size", "8",
                        "--batch-size", "2", "--repeats", "1", "--latency-repeats", "2", "--warmup", "1",
                        "--no-progress", "--max-drop", "0.01", "--output", out)
    assert rc == 0, err
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert rows[0]["reduction"] == "none" and rows[0]["img_size"] == "96x96"  # the recipe's input size
    for key in (metric, *others):
        assert float(rows[0][key]) == pytest.approx(ev[key], rel=1e-5, abs=1e-9), key
    assert int(rows[0]["images"]) == ev["images"]
    assert float(rows[0]["gmacs"]) > 0 and float(rows[0]["img_per_s"]) > 0 and float(rows[0]["latency_ms"]) > 0
    assert float(rows[0][f"{metric}_drop"]) == 0.0
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "chosen (" in text and "drop <= 0.01" in text
