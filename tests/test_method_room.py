"""A reduction method owns its whole job: one defined in tests (``norm_pruning.py``: its module and a
registration, nothing else) trains with a keep-rate ramp and its own loss, sweeps, draws its picture, exports,
and fine-tunes a dense segmenter with a restoration; nothing outside ``leanvit/reduction/`` names a method."""
import ast
import csv
from pathlib import Path

import pytest
import torch
from cli_helpers import cli
from norm_pruning import register

import leanvit
from leanvit.dense import create_segmenter
from leanvit.deploy.export import export_model, verify_export
from leanvit.reduction.registry import _REGISTRY
from leanvit.train import train

PKG = Path(leanvit.__file__).parent
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 5, "num_heads": 3, "init_values": 0.1}
BASE = {"model": "deit3_small_patch16_224", "model_kwargs": TINY, "img_size": 32, "epochs": 2, "batch_size": 8,
        "max_train_batches": 2, "opt": "adamw", "lr": 1e-3, "warmup_epochs": 0, "mixup": 0.0, "cutmix": 0.0,
        "three_augment": False, "workers": 0, "seed": 0}


@pytest.fixture
def norm_method():
    method = register()
    yield method
    _REGISTRY.pop(method.name, None)


@pytest.mark.slow
def test_a_method_defined_outside_works_everywhere(norm_method, tmp_path, capsys):
    # classification: the keep rate ramps from 1 to 0.5 over the first epoch; the method's loss is added
    out = tmp_path / "cls"
    res = train({**BASE, "data": "digits", "digits": {"canvas_size": 32, "val_fraction": 0.05}, "loss": "ce",
                 "crop": "none", "output": str(out),
                 "reduction": {"method": "test-norm", "keep_rate": 0.5, "start_epoch": 0, "epochs": 1}},
                progress=False, device="cpu")
    rates = [row["strength"] for row in res["history"]]
    assert 0.5 < rates[0] < 1.0 and rates[1] == 0.5
    assert norm_method.loss_calls == 4  # 2 epochs x 2 steps
    assert res["model_spec"]["reduction"]["method"] == "test-norm"
    best = out / "best.pth"

    # the sweep measures it at several strengths
    rc, _, err = cli(capsys, "sweep", "--checkpoint", best, "--data", "digits", "--reduction", "test-norm:1.0,0.5",
                     "--max-drop", "100", "--batch-size", "8", "--repeats", "1", "--latency-repeats", "2",
                     "--no-progress", "--output", tmp_path / "sweep")
    assert rc == 0, err
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "sweep.csv")))
    assert [(r["reduction"], r["strength"]) for r in rows] == [("none", "-"), ("test-norm", "1"),
                                                               ("test-norm", "0.5")]
    assert float(rows[2]["gmacs"]) < float(rows[1]["gmacs"])

    # its picture: the tokens it kept
    rc, _, err = cli(capsys, "viz", "--checkpoint", best, "--data", "digits", "--num-images", "2",
                     "--output", tmp_path / "viz")
    assert rc == 0, err
    assert (tmp_path / "viz" / "kept_tokens.png").stat().st_size > 0

    # export, checked against eager
    model = leanvit.create_model("deit3_small_patch16_224", num_classes=10, reduction="test-norm:0.5", **TINY).eval()
    path = export_model(model, tmp_path / "norm.onnx", img_size=32)
    assert max(r.max_abs_diff for r in verify_export(model, path, img_sizes=[(32, 32)], batch_sizes=(1, 2))) <= 1e-4

    # dense: a segmenter fine-tuned with the method and a restoration of the pruning family
    seg = create_segmenter("linear", "deit3_small_patch16_224", num_classes=11, reduction="test-norm:0.5",
                           restore="reactivate", **TINY)
    assert str(seg.backbone.restoration()) == "reactivate:1"
    out = tmp_path / "seg"
    res = train({**BASE, "task": "segmentation", "segmenter": "linear", "data": "digits-seg", "loss": "ce",
                 "digits_dense": {"canvas_size": 32, "min_digit": 10, "max_digit": 20, "max_objects": 2,
                                  "val_fraction": 0.02},
                 "reduction": {"method": "test-norm", "keep_rate": 0.5, "restore": "reactivate"},
                 "hflip": 0.0, "output": str(out)}, progress=False, device="cpu")
    assert res["model_spec"]["kwargs"]["reduction"] == {"method": "test-norm", "keep_rate": 0.5,
                                                        "restore": "reactivate"}
    assert 0.0 <= res["history"][-1]["val_miou"] <= 1.0
    rc, stdout, err = cli(capsys, "eval", "--checkpoint", out / "best.pth", "--data", "digits-seg", "--no-progress")
    assert rc == 0, err
    assert "mIoU" in stdout


def _names_a_method(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in (
                "leanvit.reduction.evit", "leanvit.reduction.tome", "leanvit.reduction.pruning",
                "leanvit.reduction.tome_merge", "leanvit.reduction.pruning_restore"):
            yield f"imports {node.module}"
        if isinstance(node, ast.Name) and node.id in ("is_evit", "is_tome", "is_pruning"):
            yield f"calls {node.id}"


def test_no_method_is_named_outside_reduction():
    """dense, tasks, measure, train and the commands ask the method (its restorations, picture, strength);
    the model registry (``evit_*`` models), the pictures a method draws with (``viz/tokens.py``,
    ``viz/merges.py``) and the EViT demo are the exceptions."""
    allowed = {"models/evit.py", "viz/tokens.py", "viz/merges.py", "tools/demo.py", "__init__.py"}
    offenders = {}
    for path in PKG.rglob("*.py"):
        rel = str(path.relative_to(PKG))
        if rel.startswith("reduction/") or rel in allowed:
            continue
        found = sorted(set(_names_a_method(path)))
        if found:
            offenders[rel] = found
    assert not offenders, offenders


def test_the_check_sees_a_method_named(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from leanvit.reduction.tome import is_tome\nis_tome(None)\n")
    assert set(_names_a_method(bad)) == {"imports leanvit.reduction.tome", "calls is_tome"}


def test_restorations_belong_to_the_methods(norm_method):
    from leanvit.dense.restore import restorations
    assert restorations()["test-norm"] == ("keep", "reactivate", "fused")
    assert restorations()["tome"] == ("unmerge", "reactivate")
    assert torch.is_tensor(norm_method.token_scores(type("B", (), {"num_prefix_tokens": 1})(),
                                                    torch.ones(1, 3, 4), None))
