"""A task is one class plus a registration: a throwaway task defined here (counting the digits in a
``digits-det`` scene, a regression whose error is lower-is-better) trains, resumes, evaluates and sweeps
through ``leanvit train / eval / sweep`` with no change to the engine or the commands. Also: the task of
a checkpoint against the task of the data, checked in one place for every command."""
import csv
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import cli, cli_error, one_line_error

import leanvit
from leanvit.checkpoints import load_checkpoint, read_checkpoint, save_checkpoint
from leanvit.data import create_dataset, dataset_options
from leanvit.data.dense import detection_transform
from leanvit.data.sampling import ResumableSampler, SeededSamples, train_sampler
from leanvit.models.build import BuiltModel
from leanvit.tasks import Task, TrainData, get_task, list_tasks, unregister_task
from leanvit.utils import to_2tuple

SCENES = {"canvas_size": 32, "min_digit": 8, "max_digit": 16, "max_objects": 3, "val_fraction": 0.03}


def _collate(batch):
    images = torch.stack([im.as_subclass(torch.Tensor) for im, _ in batch])
    counts = torch.tensor([float(len(t["labels"])) for _, t in batch])
    return images, counts


class CountTask(Task):
    """How many digits are in the scene: a ViT with one output, trained with the squared error."""
    name = "digit-count"
    main_metric = "val_mae"
    higher_is_better = False
    data_tasks = ("detection",)  # reads the detection scenes (their boxes are counted)
    sweep_columns = (("mae", "MAE", ".4f"), ("exact", "exact %", ".2f"))

    def _create(self, spec):
        return leanvit.create_model(spec["name"], num_classes=1, reduction=spec.get("reduction"), **spec["kwargs"])

    def _dataset(self, cfg, split):
        return create_dataset(cfg["data"], split, transform=detection_transform(False),
                              options=dataset_options(cfg["data"], cfg))

    def classes(self, cfg):
        return ["count"]

    def build_model(self, cfg, num_classes, reduction=None, finetune=None):
        spec = {"name": cfg["model"], "kwargs": {"img_size": cfg["img_size"], **(cfg["model_kwargs"] or {})},
                "reduction": reduction}
        return self._create(spec), spec, None

    def loader(self, dataset, batch_size=64, workers=0, device="cpu", sampler=None, drop_last=False):
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                                           num_workers=workers, collate_fn=_collate)

    def build_data(self, cfg, env, model):
        train_set, val_set = self._dataset(cfg, "train"), self._dataset(cfg, "val")
        sampler = ResumableSampler(train_sampler(train_set, cfg, env), env.rank)
        train_set = SeededSamples(train_set, cfg["seed"], env.rank)
        train_loader = self.loader(train_set, int(cfg["batch_size"]), sampler=sampler, drop_last=True)
        shard = torch.utils.data.Subset(val_set, list(range(env.rank, len(val_set), env.world_size)))
        iters = min(len(train_loader), int(cfg["max_train_batches"] or len(train_loader)))
        return TrainData(train_set, val_set, train_loader, self.loader(shard, int(cfg["batch_size"])), sampler,
                         ["count"], iters)

    def training_step(self, cfg, num_classes):
        def step(ctx, x, y):
            x, y = x.to(ctx.env.device), y.to(ctx.env.device)
            with ctx.autocast():
                pred = ctx.forward_model(x).float()[:, 0]
            return F.mse_loss(pred, y), x.shape[0]
        return step

    def _sums(self, model, loader, device="cpu", max_batches=None):
        n = err = exact = 0.0
        with torch.inference_mode():
            for i, (x, y) in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                pred = model(x.to(device)).float()[:, 0].cpu()
                err += (pred - y).abs().sum().item()
                exact += (pred.round() == y).sum().item()
                n += len(y)
        return n, err, exact

    def validate(self, model, loader, env, amp):
        was = model.training
        model.eval()
        n, err, exact = env.all_sum(list(self._sums(model, loader, env.device)))
        model.train(was)
        return {"val_mae": err / n, "val_exact": 100.0 * exact / n}

    def load_model(self, checkpoint=None, name=None, reduction=None, img_size=None, num_classes=None, data=None,
                   split="val"):
        obj = read_checkpoint(checkpoint)
        spec = dict(obj["model_spec"])
        if reduction is not None:
            spec["reduction"] = reduction
        model = self._create(spec)
        load_checkpoint(model, obj, strict=True)
        return BuiltModel(model.eval(), spec["name"], to_2tuple(spec["kwargs"]["img_size"]), obj["config"], obj)

    def eval_data(self, built, data, split="val", batch_size=64, workers=0, device="cpu", **options):
        ds = self._dataset({**built.config, "data": data}, split)
        return ds, self.loader(ds, batch_size, workers)

    def evaluate(self, model, loader, device="cpu", amp=False, progress=False, max_batches=None, dataset=None):
        model = model.to(device).eval()
        n, err, exact = self._sums(model, loader, device, max_batches)
        return {"mae": err / n, "exact": 100.0 * exact / n, "images": int(n), "img_per_s": float("nan")}


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """What a user writes: a module that registers the task, named with ``leanvit --plugin MODULE``."""
    (tmp_path / "count_plugin.py").write_text("from leanvit.tasks import register_task\n"
                                              "from test_tasks import CountTask\n"
                                              "register_task(CountTask())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "count_plugin"
    unregister_task("digit-count")
    sys.modules.pop("count_plugin", None)


def _train_args(out, epochs):
    return ["train", "--task", "digit-count", "--model", "test_vit", "--data", "digits-det", "--img-size", "32",
            "--epochs", str(epochs), "--batch-size", "8", "--max-train-batches", "3", "--lr", "1e-3", "--opt", "adamw",
            "--warmup-epochs", "0", "--set", "model_kwargs.patch_size=8",
            *[f"--set=digits_dense.{k}={v}" for k, v in SCENES.items()], "--output", str(out), "--no-progress"]


def test_a_task_of_ones_own_trains_resumes_evaluates_and_sweeps(plugin, tmp_path, capsys):
    out = tmp_path / "run"
    rc, text, err = cli(capsys, "--plugin", plugin, *_train_args(out, 1))
    assert rc == 0, err
    assert "digit-count" in list_tasks() and "best val_mae" in text
    rc, text, err = cli(capsys, "--plugin", plugin, *_train_args(out, 2), "--resume")
    assert rc == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and all("val_mae" in r for r in rows)
    last = torch.load(out / "last.pth", weights_only=True)
    assert last["task"] == "digit-count" and last["step"] == 6 and last["main_metric"] == "val_mae"
    best = torch.load(out / "best.pth", weights_only=True)
    assert best["val_mae"] == pytest.approx(min(r["val_mae"] for r in rows))  # lower is better

    js = tmp_path / "eval.json"
    rc, text, err = cli(capsys, "eval", "--checkpoint", out / "best.pth", "--data", "digits-det", "--reduction",
                        "evit:0.7", "--no-progress", "--output", js)
    assert rc == 0, err
    ev = json.loads(js.read_text())
    assert ev["task"] == "digit-count" and "MAE" in text and ev["images"] > 0

    sweep = tmp_path / "sweep"
    rc, text, err = cli(capsys, "sweep", "--checkpoint", out / "best.pth", "--data", "digits-det", "--reduction",
                        "evit:0.7", "tome:1", "--batch-size", "4", "--repeats", "1", "--latency-repeats", "2",
                        "--warmup", "1", "--no-progress", "--max-drop", "100", "--output", sweep)
    assert rc == 0, err
    rows = list(csv.DictReader(open(sweep / "sweep.csv")))
    assert [r["reduction"] for r in rows] == ["none", "evit", "tome"] and "mae_drop" in rows[0]
    evit = next(r for r in rows if r["reduction"] == "evit")
    assert float(evit["mae"]) == pytest.approx(ev["mae"], rel=1e-5)  # what `leanvit eval` said for it
    assert float(evit["mae_drop"]) == pytest.approx(float(evit["mae"]) - float(rows[0]["mae"]), abs=1e-5)
    assert (sweep / "pareto.png").stat().st_size > 0 and "chosen (MAE drop <= 100)" in text


def test_unregistered_task_is_a_one_line_error(tmp_path, capsys):
    ckpt = tmp_path / "x.pth"
    save_checkpoint({"model": {}, "task": "no-such-task"}, ckpt)
    one_line_error(*cli_error(capsys, "eval", "--checkpoint", ckpt, "--data", "digits"), "unknown task 'no-such-task'",
                   "classification")
    one_line_error(*cli_error(capsys, "--plugin", "no_such_plugin_module", "eval", "--data", "digits"),
                   "--plugin no_such_plugin_module")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    torch.manual_seed(0)
    spec = {"name": "test_vit", "kwargs": {"img_size": 32, "num_classes": 10, "patch_size": 8}}
    path = tmp_path_factory.mktemp("cls") / "cls.pth"
    save_checkpoint({"model": leanvit.create_model(spec["name"], **spec["kwargs"]).state_dict(), "model_spec": spec,
                     "classes": [str(i) for i in range(10)]}, path)
    return path


@pytest.mark.parametrize("command", ["eval", "sweep", "viz"])
def test_classifier_on_detection_data_is_a_one_line_error(classifier, command, capsys, tmp_path):
    """The checkpoint's task against the data kind's task, in one place for every command."""
    extra = ["--output", str(tmp_path / "o")] if command != "eval" else []
    rc, err = cli_error(capsys, command, "--checkpoint", classifier, "--data", "digits-det", *extra)
    one_line_error(rc, err, "digits-det is detection data", "classification")


def test_the_registry_names_the_shipped_tasks():
    assert {"classification", "detection", "segmentation"} <= set(list_tasks())
    assert get_task("detection").main_metric == "val_map" and get_task("segmentation").main_metric == "val_miou"
    assert get_task("classification").sweep_columns[0][0] == "top1"


class CountFromDatasets(CountTask):
    """The same task as most tasks are written: datasets and a collate; the engine builds the loaders (the
    resumable seeded order, the validation shard) and the validation is the task's evaluator."""
    name = "digit-count-datasets"
    collate_fn = staticmethod(_collate)
    build_data = Task.build_data  # not overridden: the engine's loaders
    validate = Task.validate      # the one evaluator (evaluate) on the shard, logged as val_<key>

    def datasets(self, cfg, model):
        return self._dataset(cfg, "train"), self._dataset(cfg, "val"), ["count"]

    def loader(self, dataset, batch_size=64, workers=0, device="cpu"):
        return Task.loader(self, dataset, batch_size, workers, device)


def test_a_task_gives_datasets_and_a_collate_and_the_engine_builds_the_loaders(tmp_path):
    from leanvit.tasks import register_task
    from leanvit.train import train

    register_task(CountFromDatasets())
    try:
        cfg = {"task": "digit-count-datasets", "model": "test_vit", "data": "digits-det", "img_size": 32,
               "model_kwargs": {"patch_size": 8}, "digits_dense": SCENES, "epochs": 1, "batch_size": 8,
               "max_train_batches": 2, "opt": "adamw", "lr": 1e-3, "warmup_epochs": 0,
               "output": str(tmp_path / "run")}
        res = train(cfg, progress=False, device="cpu")
        row = res["history"][-1]
        assert set(row) >= {"val_mae", "val_exact"} and row["val_mae"] >= 0
        assert CountFromDatasets().message(row).startswith(", val MAE ")
    finally:
        unregister_task("digit-count-datasets")
