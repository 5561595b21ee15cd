"""`leanvit sweep`: grid parsing, Pareto front and choice (library), and the command end to end on the
embedded digits with a tiny model, its EViT rows checked against `leanvit eval`."""
import csv
import json

import pytest
import torch
from cli_helpers import cli, cli_error, one_line_error

from leanvit import LeanvitError
from leanvit.checkpoints import save_checkpoint
from leanvit.measure.sweep import apply_line, choose, pareto_front, parse_grid
from leanvit.models.factory import create_model


def test_parse_grid():
    grid = parse_grid(["evit:1.0,0.7", "tome:0,8 evit-drop:0.5", "none", "evit:0.7"])
    assert grid == [("evit", 1.0), ("evit", 0.7), ("tome", 0), ("tome", 8), ("evit-drop", 0.5), (None, None)]
    with pytest.raises(LeanvitError, match="unknown reduction"):
        parse_grid(["tomee:4"])
    with pytest.raises(LeanvitError, match="integer >= 0"):
        parse_grid(["tome:2.5"])
    with pytest.raises(LeanvitError, match="missing"):
        parse_grid(["evit:"])  # not evit at no reduction


def _rows():
    # (top1, img/s, latency): base, a dominated point, two front points
    data = [(80.0, 100.0, 10.0), (79.0, 90.0, 12.0), (79.6, 150.0, 8.0), (78.0, 200.0, 9.0)]
    rows = []
    for i, (t, ips, lat) in enumerate(data):
        rows.append(dict(label=f"p{i}", reduction="none" if i == 0 else "evit", strength="-" if i == 0 else "0.7",
                         value=None if i == 0 else 0.7, img_size="48x48", top1=t, top1_drop=80.0 - t,
                         img_per_s=ips, speedup=ips / 100.0, latency_ms=lat))
    return rows


def test_pareto_front_and_choice():
    rows = _rows()
    assert pareto_front(rows, "img_per_s") == [3, 2, 0]
    assert pareto_front(rows, "latency_ms", higher=False) == [2, 0]  # p3 (9 ms, 78%) is beaten by p2
    assert choose(rows, max_drop=0.5)["label"] == "p2"
    assert choose(rows, max_drop=5)["label"] == "p3"
    assert choose(rows, target_speedup=1.4)["label"] == "p2"
    assert choose(rows, max_drop=0.5, target_speedup=1.8) is None
    assert choose(rows) is None
    assert choose(rows, max_drop=5, speed_key="latency_ms")["label"] == "p2"
    opts, py = apply_line({**rows[2], "reduction": "tome", "value": 8, "img_size": "56x56"})
    assert opts == "--reduction tome:8 --img-size 56" and py == "leanvit.apply_reduction(model, 'tome', r=8)"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    spec = {"name": "deit3_small_patch16_224", "kwargs": {"img_size": 48, "num_classes": 10, "patch_size": 8,
                                                          "embed_dim": 48, "depth": 4, "num_heads": 3,
                                                          "init_values": 0.1}}
    path = tmp_path_factory.mktemp("sweep") / "tiny.pth"
    save_checkpoint({"model": create_model(spec["name"], **spec["kwargs"]).state_dict(), "model_spec": spec}, path)
    return path


@pytest.mark.slow
def test_sweep_cli_twelve_points_and_eval_agreement(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "sweep"
    rc, stdout, err = cli(capsys, "sweep", "--checkpoint", tiny_checkpoint, "--data", "digits", "--reduction",
                          "evit:1.0,0.9,0.8,0.7,0.6,0.5", "tome:0,4,8", "evit-drop:0.7,0.5", "--max-drop", "100",
                          "--batch-size", "16", "--repeats", "2", "--latency-repeats", "5", "--no-progress",
                          "--output", out)
    assert rc == 0, err
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert len(rows) == 12 and rows[0]["reduction"] == "none"
    assert (out / "pareto.png").stat().st_size > 0
    assert "chosen (top-1 drop <= 100)" in stdout and "leanvit.apply_reduction(model" in stdout
    assert "--reduction" in stdout and "pareto" in stdout
    gm = {(row["reduction"], row["strength"]): float(row["gmacs"]) for row in rows}
    assert gm[("evit", "0.5")] < gm[("evit", "1")] == pytest.approx(gm[("none", "-")])
    assert gm[("tome", "8")] < gm[("tome", "4")] < gm[("tome", "0")]
    # the EViT rows are what `leanvit eval` says for the same configuration, exactly
    for method, strength in (("evit", "0.7"), ("evit-drop", "0.5")):
        js = tmp_path / f"{method}.json"
        rc, _, err = cli(capsys, "eval", "--checkpoint", tiny_checkpoint, "--data", "digits", "--reduction",
                         f"{method}:{strength}", "--no-progress", "--output", js)
        assert rc == 0, err
        ev = json.loads(js.read_text())
        row = next(x for x in rows if (x["reduction"], x["strength"]) == (method, strength))
        n = int(row["images"])
        assert n == ev["images"]
        for k in ("top1", "top5"):  # the same number of correct images (the CSV keeps 6 digits)
            assert round(float(row[k]) * n / 100) == round(ev[k] * n / 100)
            assert float(row[k]) == pytest.approx(ev[k], rel=1e-5)


def test_sweep_cli_errors(tiny_checkpoint, capsys):
    one_line_error(*cli_error(capsys, "sweep", "--checkpoint", str(tiny_checkpoint), "--data", "digits",
                              "--reduction", "tome:x"), "cannot read 'x'")
    for text, needle in (("evit:", "keep_rate value is missing"), ("evit:0", "(0, 1]"),
                         ("evit-drop:2", "(0, 1]"), ("tome:1.5", "integer >= 0")):
        one_line_error(*cli_error(capsys, "sweep", "--checkpoint", str(tiny_checkpoint), "--data", "digits",
                                  "--reduction", "evit:0.7", text), f"'{text}'", needle)
    one_line_error(*cli_error(capsys, "sweep", "--data", "digits", "--reduction", "evit:0.7"),
                   "--model and/or --checkpoint")
    one_line_error(*cli_error(capsys, "sweep", "--checkpoint", str(tiny_checkpoint), "--data", "digits",
                              "--reduction", "evit:0.7", "--img-sizes", "0"), "--img-sizes")


@pytest.mark.slow
def test_demo_sweep_section(tmp_path):
    """The demo's sweep step on a tiny trained DeiT III model and its EViT version: report section,
    sweep.csv and pareto.png."""
    from leanvit.models.build import build_model
    from leanvit.reduction.evit import apply_evit
    from leanvit.tools import demo
    from leanvit.train import train

    res = train({"model": "deit3_small_patch16_224", "img_size": 32, "data": "digits",
                 "model_kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
                 "digits": {"val_fraction": 0.05}, "crop": "none", "hflip": 0.0, "batch_size": 16,
                 "max_train_batches": 2, "epochs": 1, "warmup_epochs": 0, "workers": 0, "mixup": 0.0, "cutmix": 0.0,
                 "output": str(tmp_path / "deit3")}, progress=False, device="cpu")
    evit = apply_evit(build_model(checkpoint=res["best"]).model, keep_rate=0.7)
    text = demo._sweep_section(tmp_path, res["best"], evit, quick=True, progress=False)
    assert "## Sweep" in text and "pareto.png" in text and "evit fine-tuned" in text
    rows = list(csv.DictReader(open(tmp_path / "sweep.csv")))
    assert [r["reduction"] for r in rows] == ["none", "evit", "evit-drop", "tome", "evit fine-tuned"]
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Chosen" in text or "No configuration" in text
