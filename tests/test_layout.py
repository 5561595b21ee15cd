"""The package layout holds: libraries never import tools, modules stay small, and a new reduction method or
dataset kind needs only its own module plus a registration (shown here with throwaway ones)."""
import ast
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import leanvit
from leanvit.data import create_dataset, register_dataset
from leanvit.data.registry import _KINDS, DatasetKind
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
    res = train({"model": "test_vit", "img_size": 32, "data": "digits",
                 "digits": {"canvas_size": 32, "val_fraction": 0.05},
                 "epochs": 1, "batch_size": 8, "max_train_batches": 2, "opt": "adamw", "lr": 1e-3, "loss": "ce",
                 "mixup": 0.0, "cutmix": 0.0, "warmup_epochs": 0, "three_augment": False, "crop": "none",
                 "reduction": {"method": "test-gain", "gain": 0.25}, "output": str(tmp_path / "run")},
                progress=False, device="cpu")
    assert res["model_spec"]["reduction"] == {"method": "test-gain", "gain": 0.25}
    assert res["history"][0]["strength"] == 0.25  # the knob's value per epoch, whatever the method calls it
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


class NoiseOptionsKind(NoiseKind):
    """The same kind with recipe options (``test_noise: {n: ...}``) and a top-level setting of its own."""
    name = "test-noise-opts"
    options_key = "test_noise"
    settings = {"test_noise_level": 0.5}

    def matches(self, data):
        return data == self.name

    def check_options(self, options):
        if set(options) - {"n"}:
            raise LeanvitError(f"unknown test_noise option(s) {sorted(set(options) - {'n'})}")


def test_a_plugin_kind_and_task_declare_their_settings():
    from leanvit.tasks import Task, get_task, register_task, unregister_task
    from leanvit.train import defaults, resolve_config

    base = defaults()
    assert "test_noise" not in base and "detector" in base and "digits" in base  # a task's, a kind's
    register_dataset(NoiseOptionsKind())

    class _T(Task):
        name, main_metric = "test-settings", "val_x"
        settings = {"test_strength": 2}

        def check_settings(self, cfg):
            if cfg["test_strength"] < 0:
                raise LeanvitError(f"test_strength must be >= 0, got {cfg['test_strength']}")

    register_task(_T())
    try:
        cfg = resolve_config(None, {"data": "test-noise-opts", "test_noise": {"n": 6}})
        assert cfg["test_noise"] == {"n": 6} and cfg["test_noise_level"] == 0.5 and cfg["test_strength"] == 2
        assert leanvit.data.dataset_options("test-noise-opts", cfg) == {"n": 6}
        with pytest.raises(LeanvitError, match="unknown test_noise option"):
            resolve_config(None, {"test_noise": {"m": 1}})
        with pytest.raises(LeanvitError, match="test_strength must be >= 0"):
            resolve_config(None, {"test_strength": -1})
        # two owners of one setting must agree on its default
        _T.settings = {"test_strength": 2, "hflip": 0.25}
        with pytest.raises(LeanvitError, match="'hflip' has default 0.5 .* 0.25 for task test-settings"):
            resolve_config(None, {})
    finally:
        unregister_task("test-settings")
        _KINDS[:] = [k for k in _KINDS if k.name != "test-noise-opts"]
    assert get_task("classification") and defaults() == base
    with pytest.raises(LeanvitError, match="unknown setting 'test_noise'"):
        resolve_config(None, {"test_noise": {"n": 6}})


# ---------------------------------------------------------------- tasks are peers; no cycles; no private imports
TASK_NAMES = {"classification", "detection", "segmentation"}
# what train/ and tools/ may use of leanvit.tasks: the package's API, its registry and base class, and the
# evaluation libraries (``*_eval``); not the task modules themselves
_TASK_API = {"leanvit.tasks", "leanvit.tasks.registry", "leanvit.tasks.base"}


def _module_name(path: Path, root: Path = PKG) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(root: Path = PKG) -> dict:
    return {_module_name(p, root): p for p in root.rglob("*.py")}


def _import_targets(path: Path, name: str, known) -> set:
    """The leanvit modules ``path`` (module ``name``) imports, function-local imports included, plus the
    packages Python initializes on the way (``a.b.c`` runs ``a/b/__init__``) where ``name`` is outside them."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        mods = []
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            mods = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for m in mods:
            while m and m not in known:  # an attribute of a module: the module
                m = m.rpartition(".")[0]
            if not m or m == name:
                continue
            out.add(m)
            parent = m.rpartition(".")[0]
            while parent:
                if parent in known and not name.startswith(parent + ".") and parent != name:
                    out.add(parent)
                parent = parent.rpartition(".")[0]
    return out


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return out


def _import_graph(root: Path = PKG) -> dict:
    mods = _modules(root)
    return {name: _import_targets(path, name, set(mods)) for name, path in mods.items()}


def test_no_import_cycles_among_library_modules():
    assert not _cycles(_import_graph()), _cycles(_import_graph())


def _fake_package(tmp_path, files: dict) -> Path:
    root = tmp_path / "leanvit"
    for rel, text in {"__init__.py": "", **files}.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_the_cycle_check_sees_cycles(tmp_path):
    # a function-local import closing a cycle, and one through a package's __init__
    root = _fake_package(tmp_path, {
        "export.py": "from leanvit.runtimes import Runner\n",
        "runtimes.py": "def f():\n    from leanvit.export import export_model\n",
        "train/__init__.py": "from leanvit.train.engine import train\n",
        "train/engine.py": "from leanvit.tasks import get_task\n",
        "train/setup.py": "x = 1\n",
        "tasks/__init__.py": "from leanvit.tasks import classification\n",
        "tasks/classification.py": "from leanvit.train.setup import x\n",
        "ok/__init__.py": "from leanvit.ok import a\n",
        "ok/a.py": "from leanvit.ok.b import y\n",
        "ok/b.py": "y = 1\n",
    })
    cycles = _cycles(_import_graph(root))
    assert ["leanvit.export", "leanvit.runtimes"] in cycles
    assert any("leanvit.train" in c and "leanvit.tasks.classification" in c for c in cycles)
    assert not any(m.startswith("leanvit.ok") for c in cycles for m in c)  # a package importing its modules


def _private_imports(root: Path = PKG) -> list:
    bad = []
    for name, path in _modules(root).items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("leanvit"):
                bad += [f"{name}: {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    return bad


def test_no_module_imports_another_modules_private_names():
    assert not _private_imports(), _private_imports()


def test_the_private_import_check_sees_one(tmp_path):
    root = _fake_package(tmp_path, {"viz_merge.py": "from leanvit.viz import _as_images, draw_rows\n",
                                    "data/__init__.py": "from leanvit.data import digits as _digits\n",
                                    "data/digits.py": ""})
    assert _private_imports(root) == ["leanvit.viz_merge: leanvit.viz._as_images"]


def _task_coupling(path: Path, name: str, known) -> list:
    """Where module ``path`` imports a task's internals or branches on a task: a comparison or match with a
    task's name, or an ``isinstance`` check against a task class."""
    found = []
    for m in _import_targets(path, name, known):
        if m.startswith("leanvit.tasks.") and m not in _TASK_API and not m.endswith("_eval"):
            found.append(f"imports {m}")
    for node in ast.walk(ast.parse(path.read_text())):
        values = []
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                elts = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                values += [e.value for e in elts if isinstance(e, ast.Constant)]
        elif isinstance(node, ast.MatchValue) and isinstance(node.value, ast.Constant):
            values.append(node.value.value)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
            kinds = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
            found += [f"line {node.lineno}: isinstance(..., {ast.unparse(k)})" for k in kinds
                      if ast.unparse(k).endswith("Task")]
        found += [f"line {node.lineno}: compares with {v!r}" for v in values if v in TASK_NAMES]
    return found


def test_engine_and_commands_know_no_task_by_name():
    mods = _modules()
    offenders = {name: f for name, path in mods.items()
                 if name.startswith(("leanvit.train", "leanvit.tools")) and (f := _task_coupling(path, name, mods))}
    assert not offenders, offenders


def test_data_and_pictures_know_no_task_by_name():
    """Below the tasks, data/ and viz/ neither import a task nor branch on a task's name: a task gives its
    collate (``Task.collate_fn``) and what its pictures show (e.g. ``DenseTask.pictures``)."""
    mods = _modules()
    offenders = {}
    for name, path in mods.items():
        if not name.startswith(("leanvit.data", "leanvit.viz")):
            continue
        found = _task_coupling(path, name, mods)
        found += [f"imports {m}" for m in _import_targets(path, name, mods)
                  if m.startswith("leanvit.tasks") and f"imports {m}" not in found]
        if found:
            offenders[name] = found
    assert not offenders, offenders


def test_the_task_coupling_check_sees_branches_and_imports(tmp_path):
    root = _fake_package(tmp_path, {
        "tasks/__init__.py": "", "tasks/registry.py": "", "tasks/detection.py": "", "tasks/dense_eval.py": "",
        "tools/__init__.py": "",
        "tools/a.py": "from leanvit.tasks.detection import DetectionTask\n",
        "tools/b.py": "def f(task):\n    if task.name == 'detection':\n        return 1\n",
        "tools/c.py": "def f(task):\n    return task in ('segmentation', 'x')\n",
        "tools/d.py": "def f(t):\n    match t:\n        case 'classification':\n            return 1\n",
        "tools/e.py": "def f(t, _DenseTask):\n    return isinstance(t, _DenseTask)\n",
        "tools/ok.py": "from leanvit.tasks import get_task\nfrom leanvit.tasks.dense_eval import coco_map\n"
                       "def f(args):\n    return args.task == 'detect'\n",
    })
    mods = _modules(root)
    found = {n.rsplit(".", 1)[-1]: _task_coupling(p, n, mods) for n, p in mods.items()
             if n.startswith("leanvit.tools.")}
    assert found["a"] == ["imports leanvit.tasks.detection"]
    assert all(found[k] for k in "bcde") and found["ok"] == [], found
