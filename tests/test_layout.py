"""The package layout holds: libraries never import tools, modules stay small, and a new reduction method or
dataset kind needs only its own module plus a registration (shown here with throwaway ones)."""
import ast
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import leanvit
from leanvit.data import create_dataset, register_dataset
from leanvit.data.registry import DatasetKind, _KINDS
from leanvit.errors import LeanvitError
from leanvit.measure import build_configurations
from leanvit.reduction import ReductionMethod, apply_reduction, get_reduction, register_reduction
from leanvit.reduction.registry import _REGISTRY
from leanvit.train import train

PKG = Path(leanvit.__file__).parent


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def test_library_modules_never_import_tools():
    offenders = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        if rel.parts[0] == "tools" or rel.name == "cli.py":
            continue
        bad = [m for m in _imports(path) if m == "leanvit.tools" or m.startswith("leanvit.tools.")]
        if bad:
            offenders.append(f"{rel}: {bad}")
    assert not offenders, offenders


def test_the_check_sees_an_offending_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from leanvit.tools.bench import split_list\n")
    assert "leanvit.tools.bench" in set(_imports(bad))


def test_modules_outside_models_stay_small():
    big = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py")
           if p.relative_to(PKG).parts[0] != "models" and (n := len(p.read_text().splitlines())) > 450}
    assert not big, big


# ---------------------------------------------------------------- a new reduction method: one class + registration
class _Scaled(nn.Module):
    """Stands in for a patched model: its knob ``gain`` scales the logits (0 = unmodified)."""


class GainMethod(ReductionMethod):
    name, knob, none_value = "test-gain", "gain", 0.0

    def apply(self, model, gain=0.0):
        base = type(model)
        model.__class__ = type(f"Gain{base.__name__}", (base,), {"forward": _gain_forward, "_gain_base": base})
        model.gain = float(gain)
        return model

    def remove(self, model):
        model.__class__ = model._gain_base
        del model.gain
        return model

    def is_applied(self, model):
        return hasattr(type(model), "_gain_base")

    def get_strength(self, model):
        return model.gain

    def set_strength(self, model, value):
        model.gain = float(value)

    def check_strength(self, value):
        if float(value) < 0:
            raise LeanvitError(f"gain must be >= 0, got {value}")
        return float(value)

    def options(self, model):
        return {"gain": model.gain}


def _gain_forward(self, x, gain=None):
    out = self._gain_base.forward(self, x)
    return out * (1.0 + (self.gain if gain is None else gain))


@pytest.fixture
def gain_method():
    register_reduction(GainMethod())
    yield get_reduction("test-gain")
    _REGISTRY.pop("test-gain", None)


def test_registered_method_works_everywhere(gain_method, tmp_path):
    model = leanvit.create_model("test_vit", img_size=32, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    ref = model.eval()(x)
    apply_reduction(model, "test-gain", gain=1.0)
    torch.testing.assert_close(model(x), 2 * ref)
    assert leanvit.reduction.reduction_spec(model) == {"method": "test-gain", "gain": 1.0}
    leanvit.remove_reduction(model)
    torch.testing.assert_close(model(x), ref)
    # the benchmark builds views at each strength; rows name the method and its strength
    cfgs = build_configurations(["test_vit"], [(None, None), ("test-gain", 0.5)], [(32, 32)])
    assert [(e["reduction"], e["strength"]) for _, _, e in cfgs.values()] == [("-", "-"), ("test-gain", "0.5")]
    # the engine schedules and records it (recipe key `reduction`)
    res = train({"model": "test_vit", "img_size": 32, "data": "digits", "digits": {"canvas_size": 32},
                 "epochs": 1, "batch_size": 8, "max_train_batches": 2, "opt": "adamw", "lr": 1e-3, "loss": "ce",
                 "mixup": 0.0, "cutmix": 0.0, "warmup_epochs": 0, "three_augment": False, "crop": "none",
                 "reduction": {"method": "test-gain", "gain": 0.25}, "output": str(tmp_path / "run")},
                progress=False, device="cpu")
    assert res["model_spec"]["reduction"] == {"method": "test-gain", "gain": 0.25}
    assert res["history"][0]["keep_rate"] == 0.25  # the knob's value per epoch (the column keeps its old name)
    with pytest.raises(LeanvitError, match="gain must be >= 0"):
        leanvit.create_model("test_vit", reduction={"method": "test-gain", "gain": -1})


def test_unknown_reduction_names_the_known_ones():
    with pytest.raises(LeanvitError, match=r"unknown reduction method 'evt'.*evit"):
        leanvit.apply_reduction(leanvit.create_model("test_vit"), "evt")


# ---------------------------------------------------------------- a new dataset kind: one class + registration
class NoiseKind(DatasetKind):
    name = "test-noise"
    embedded = True

    def matches(self, data):
        return data == self.name

    def create(self, data, split, transform=None, options=None, classes=None, skip_corrupt=False):
        n = int((options or {}).get("n", 16))
        rng = np.random.default_rng(0 if split == "train" else 1)
        images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
        return _ListDataset(images, [i % 2 for i in range(n)], transform)

    def classes(self, data, split="val", options=None):
        return ["even", "odd"]


class _ListDataset(torch.utils.data.Dataset):
    classes = ["even", "odd"]

    def __init__(self, images, targets, transform):
        self.images, self.targets, self.transform = images, targets, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = self.images[i]
        return (self.transform(img) if self.transform else img), self.targets[i]


def test_registered_dataset_kind_trains(tmp_path):
    register_dataset(NoiseKind())
    try:
        ds = create_dataset("test-noise", "val", options={"n": 6})
        assert len(ds) == 6 and ds.classes == ["even", "odd"]
        res = train({"model": "test_vit", "img_size": 32, "data": "test-noise", "epochs": 1, "batch_size": 4,
                     "opt": "adamw", "lr": 1e-3, "loss": "ce", "mixup": 0.0, "cutmix": 0.0, "warmup_epochs": 0,
                     "three_augment": False, "crop": "none", "output": str(tmp_path / "noise")},
                    progress=False, device="cpu")
        assert res["history"][-1]["val_top1"] is not None and res["model_spec"]["kwargs"]["num_classes"] == 2
    finally:
        _KINDS[:] = [k for k in _KINDS if k.name != "test-noise"]
    with pytest.raises(LeanvitError, match="no such folder"):
        create_dataset("test-noise", "val")
