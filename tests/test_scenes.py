"""The embedded stuff-and-things scenes (scenes-seg / scenes-det): determinism, split, labels, errors, statistics."""
import numpy as np
import pytest
import torch

from leanvit.data import create_dataset, dataset_classes
from leanvit.data.scenes import SceneDataset, size_group
from leanvit.data.scenes_io import perfect_logit_miou, scene_statistics, write_ade20k
from leanvit.errors import LeanvitError
from leanvit.train import train

SMALL = {"canvas_size": 96, "min_object_size": 4, "val_fraction": 0.05}


def test_scenes_are_deterministic_and_change_with_the_epoch():
    a = SceneDataset("train", **SMALL)
    b = SceneDataset("train", **SMALL)
    for i in (0, 7):
        for x, y in zip(a.scene(i), b.scene(i)):
            assert np.array_equal(np.asarray(x), np.asarray(y))
    b.set_epoch(1)
    assert not np.array_equal(a.scene(0)[0], b.scene(0)[0])
    v = SceneDataset("val", **SMALL)
    before = v.scene(3)[0]
    v.set_epoch(5)  # validation scenes never change
    assert np.array_equal(before, v.scene(3)[0])


def test_scenes_are_split_by_source_scan():
    tr, va = SceneDataset("train", **SMALL), SceneDataset("val", **SMALL)
    assert len(set(tr.source_indices) & set(va.source_indices)) == 0
    assert len(tr) == len(tr.source_indices) and len(va) == len(va.source_indices)


def test_labels_are_consistent():
    seg = SceneDataset("val", target_format="mask", **SMALL)
    det = SceneDataset("val", target_format="boxes", masks=True, **SMALL)
    seen_things = 0
    for i in range(12):
        _, sem, owner, digits = seg.scene(i)
        _, t = det[i]
        _, st = seg[i]
        assert torch.equal(st["mask"].as_subclass(torch.Tensor), torch.from_numpy(sem))
        assert sem.min() >= 0 and sem.max() < len(seg.classes)
        assert (sem[owner < 0] < seg.num_stuff).all()  # stuff where no thing is
        masks = t["masks"].as_subclass(torch.Tensor).bool().numpy()
        assert len(masks) == len(t["labels"]) == len(t["boxes"]) == len(t["gt_area"])
        for m, box, lab, area in zip(masks, t["boxes"].tolist(), t["labels"].tolist(), t["gt_area"].tolist()):
            ys, xs = np.nonzero(m)
            assert box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert area == m.sum()
            assert (sem[m] == seg.num_stuff + lab).all()  # the semantic map agrees with the instance
            seen_things += 1
        union = masks.any(0) if len(masks) else np.zeros_like(sem, bool)
        assert np.array_equal(union, sem >= seg.num_stuff)
    assert seen_things > 0


def test_panoptic_segments_tile_the_image():
    ds = SceneDataset("val", **SMALL)
    for i in range(6):
        _, sem, owner, digits = ds.scene(i)
        ids, segments = ds.panoptic(i)
        assert ids.min() >= 1 and sorted(np.unique(ids)) == [s["id"] for s in segments]
        for s in segments:
            m = ids == s["id"]
            assert (sem[m] == s["category_id"]).all() and s["area"] == m.sum()
            assert s["isthing"] == (s["category_id"] >= ds.num_stuff)
        assert sum(s["isthing"] for s in segments) == len({int(t) for t in np.unique(owner) if t >= 0})


def test_registered_kinds_and_classes():
    ds = create_dataset("scenes-seg", "val", options=SMALL)
    assert ds.classes[:5] == ["sky", "water", "grass", "wall", "road"] and len(ds.classes) == 15
    assert dataset_classes("scenes-det", "val") == [f"digit_{d}" for d in range(10)]
    assert len(create_dataset("scenes-seg", "val", options={**SMALL, "num_stuff": 3}).classes) == 13


@pytest.mark.parametrize("options, words", [
    ({"num_stuff": 0}, "num_stuff"),
    ({"max_object_size": 100}, "larger than the image"),
    ({"small_fraction": 0.8, "medium_fraction": 0.5}, "impossible size mix"),
    ({"max_object_size": 12, "small_fraction": 0.0, "medium_fraction": 0.0}, "impossible size mix"),
    ({"min_objects": 4, "max_objects": 2}, "min_objects 4"),
    ({"canvas_sise": 64}, "canvas_size"),
])
def test_option_errors_are_one_line(options, words):
    with pytest.raises(LeanvitError) as e:
        create_dataset("scenes-seg", "val", options={**SMALL, **options})
    assert words in str(e.value) and "\n" not in str(e.value)


def test_statistics_are_sane():
    st = scene_statistics("val", num_images=12, **SMALL)
    assert abs(sum(st["class_frequency"].values()) - 1.0) < 1e-6
    assert st["stuff_fraction"] > 0.5 and abs(sum(st["sizes"].values()) - 1.0) < 1e-6
    b = st["perfect_logit_miou"]
    assert b[4] >= b[8] >= b[16] >= b[32] and b[4] > 0.7
    lab = np.zeros((16, 16), np.int64)
    lab[:, 8:] = 1
    assert perfect_logit_miou([lab], 2, 8) == pytest.approx(1.0)
    assert size_group(10, 256) == "small" and size_group(600, 256) == "medium" and size_group(3000, 256) == "large"


def test_ade20k_round_trip(tmp_path):
    root = write_ade20k(tmp_path / "ade", num_train=3, num_val=2, **SMALL)
    ds = create_dataset(str(root), "val")
    ours = SceneDataset("val", **SMALL)
    assert ds.classes[:15] == ours.classes and len(ds) == 2
    for i in range(2):
        _, t = ds[i]
        assert np.array_equal(t["mask"].as_subclass(torch.Tensor).numpy(), ours.scene(i)[1])
    write_ade20k(root, num_train=1, num_val=1, **SMALL)  # its own folder: rewritten, no stale scenes left
    assert len(create_dataset(str(root), "val")) == 1 and len(create_dataset(str(root), "train")) == 1
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(LeanvitError, match="refusing to overwrite"):
        write_ade20k(other, num_train=1, num_val=1, **SMALL)
    assert (other / "notes.txt").read_text() == "mine"


def test_training_steps_on_scenes_seg_and_det(tmp_path):
    torch.manual_seed(0)
    tiny = {"depths": [1, 1, 1, 1], "embed_dims": [64, 32, 32, 32], "num_heads": [2, 2, 2, 2],
            "mlp_ratios": [1, 1, 1, 1]}
    cfg = dict(task="segmentation", model="shunted_t", model_kwargs=tiny, img_size=64, min_size=64, max_size=64,
               data="scenes-seg", scenes={**SMALL, "val_fraction": 0.01}, hflip=0.0, epochs=1, batch_size=2,
               max_train_batches=2, opt="adamw", lr=1e-3, warmup_epochs=0, loss="ce", mixup=0.0, cutmix=0.0,
               three_augment=False, workers=0, output=str(tmp_path), seed=0, segmenter="semantic_fpn",
               head_kwargs={"fpn_channels": 16, "channels": 16}, schedule="poly")
    res = train(cfg, device="cpu", progress=False)
    assert res["task"] == "segmentation" and res["main_metric"] == "val_miou"
    assert 0.0 <= res["history"][-1]["val_miou"] <= 1.0
    det = dict(cfg, task="detection", data="scenes-det", output=str(tmp_path / "det"), detector="fcos",
               head_kwargs={"fpn_channels": 64, "head_convs": 1, "out_indices": [1, 2, 3]})
    det.pop("segmenter"), det.pop("schedule")
    res = train(det, device="cpu", progress=False)
    assert res["task"] == "detection" and res["history"][-1]["val_map"] >= 0.0
