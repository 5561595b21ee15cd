"""Dense data: the embedded scenes, the COCO / ADE20K / mask-folder layouts, dense transforms and
the metrics. Everything here is tiny: a few scenes, 2-3 synthetic files per split."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from leanvit.data import create_dataset, dataset_classes, resolve_dataset_kind
from leanvit.data.dense import IGNORE_INDEX, collate_segmentation, detection_transform, segmentation_transform
from leanvit.errors import LeanvitError
from leanvit.tasks.dense_eval import coco_map, confusion_matrix, segmentation_scores

# ------------------------------------------------------------------------------------------ embedded scenes

def test_digit_scenes_kinds_and_classes():
    assert resolve_dataset_kind("digits-det").task == "detection"
    assert resolve_dataset_kind("digits-seg").task == "segmentation"
    assert dataset_classes("digits-det") == [str(i) for i in range(10)]
    assert dataset_classes("digits-seg") == ["background"] + [str(i) for i in range(10)]


def test_digit_scenes_boxes_are_tight_and_deterministic():
    ds = create_dataset("digits-det", "val", options={"masks": True})
    counts, sizes = [], []
    for i in range(12):
        img, t = ds[i]
        img2, t2 = ds[i]
        assert torch.equal(img, img2) and torch.equal(t["boxes"], t2["boxes"])  # fixed validation scenes
        assert img.shape == (3, 96, 96) and img.dtype == torch.uint8
        n = len(t["labels"])
        counts.append(n)
        assert 1 <= n <= 4 and t["masks"].shape == (n, 96, 96)
        assert ((t["labels"] >= 0) & (t["labels"] <= 9)).all()
        for box, m in zip(t["boxes"], t["masks"]):
            ys, xs = torch.nonzero(m, as_tuple=True)
            # the box is the tight box of the object's ink mask
            assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
            sizes.append(max(box[2] - box[0], box[3] - box[1]).item())
    assert len(set(counts)) > 1
    assert min(sizes) < 20 and max(sizes) > 28  # objects of very different sizes


def test_digit_scenes_split_by_source_scan_and_epochs():
    tr = create_dataset("digits-det", "train")
    va = create_dataset("digits-det", "val")
    assert not set(tr.source_indices) & set(va.source_indices)
    a = tr[0][0]
    tr.set_epoch(1)
    assert not torch.equal(a, tr[0][0])  # a fresh scene every epoch
    tr.set_epoch(0)
    assert torch.equal(a, tr[0][0])


def test_digit_scenes_segmentation_labels():
    ds = create_dataset("digits-seg", "val")
    img, t = ds[3]
    m = t["mask"]
    assert m.shape == (96, 96) and m.dtype == torch.int64
    vals = set(m.unique().tolist())
    assert 0 in vals and vals - {0} and max(vals) <= 10
    assert ds.miou_classes == list(range(1, 11))


# ------------------------------------------------------------------------------------------ transforms

def test_flip_and_resize_move_boxes_with_the_image():
    ds = create_dataset("digits-det", "val")
    img, t = ds[0]
    tf = detection_transform(True, min_size=192, max_size=192, hflip=1.0)
    torch.manual_seed(0)
    x, t2 = tf(img, t)
    assert x.shape == (3, 192, 192) and x.dtype == torch.float32 and x.max() <= 1.0
    b, b2 = t["boxes"], t2["boxes"]
    assert torch.allclose(b2[:, 0], (96 - b[:, 2]) * 2) and torch.allclose(b2[:, 1], b[:, 1] * 2)
    assert torch.equal(t2["gt_boxes"], t["gt_boxes"])  # evaluation ground truth stays in original coordinates


def test_segmentation_crop_pads_the_mask_with_ignore():
    ds = create_dataset("digits-seg", "val")
    img, t = ds[0]
    tf = segmentation_transform(True, min_size=None, crop_size=128, hflip=0.0)
    x, t2 = tf(img, t)
    assert x.shape == (3, 128, 128) and t2["mask"].shape == (128, 128)
    assert (t2["mask"] == IGNORE_INDEX).sum() == 128 * 128 - 96 * 96
    xb, targets = collate_segmentation([(x, t2), (x[:, :100, :90], t2)])
    assert xb.shape == (2, 3, 128, 128)


# ------------------------------------------------------------------------------------------ COCO layout

def _coco_tree(root, split="val2017", images=3, extra_anns=(), cats=None, drop_file=None):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(exist_ok=True)
    ims, anns = [], []
    for i in range(images):
        name = f"{i:03d}.png"
        if name != drop_file:
            Image.fromarray(np.full((40, 60, 3), 30 * i, np.uint8)).save(root / split / name)
        ims.append({"id": i + 1, "file_name": name, "height": 40, "width": 60})
    anns.append({"id": 1, "image_id": 1, "category_id": 3, "bbox": [5, 5, 10, 20], "area": 200, "iscrowd": 0,
                 "segmentation": [[5, 5, 15, 5, 15, 25, 5, 25]]})
    anns.append({"id": 2, "image_id": 2, "category_id": 7, "bbox": [50, 30, 20, 20], "area": 100, "iscrowd": 0,
                 "segmentation": [[50, 30, 60, 30, 60, 40, 50, 40]]})  # reaches outside: clipped
    anns.append({"id": 3, "image_id": 2, "category_id": 3, "bbox": [10, 10, 0, 5], "area": 0, "iscrowd": 0,
                 "segmentation": [[10, 10, 10, 15, 10, 15]]})  # no width: dropped
    anns += list(extra_anns)
    cats = cats or [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
    (root / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({"images": ims, "annotations": anns, "categories": cats}))
    return root


def test_coco_layout_is_recognized_and_cleaned(tmp_path):
    root = _coco_tree(tmp_path / "coco")
    assert resolve_dataset_kind(root).name == "coco"
    assert dataset_classes(root) == ["cat", "dog"]
    ds = create_dataset(root, "val", options={"masks": True})
    assert len(ds) == 3
    assert ds.skips.counts == {"box(es) reaching outside their image (clipped)": 1,
                               "box(es) with no width or height (dropped)": 1,
                               "image(s) without annotations (kept as negatives)": 1}
    assert any("kept as negatives" in ln and str(root / "annotations") in ln for ln in ds.skips.lines())
    img, t = ds[1]
    assert t["boxes"].tolist() == [[50.0, 30.0, 60.0, 40.0]] and t["labels"].tolist() == [1]
    assert t["masks"].shape == (1, 40, 60)
    _, t0 = ds[0]
    assert t0["labels"].tolist() == [0] and t0["boxes"].tolist() == [[5.0, 5.0, 15.0, 25.0]]
    _, t2 = ds[2]
    assert len(t2["labels"]) == 0  # a negative
    x, t3 = detection_transform(False, min_size=80, max_size=200)(*ds[1])
    assert x.shape == (3, 80, 120) and t3["boxes"].tolist() == [[100.0, 60.0, 120.0, 80.0]]
    # mask ground truth for mask AP: one RLE per evaluated object, at the original size, past the transforms
    assert len(t3["gt_segms"]) == len(t3["gt_labels"]) and t3["gt_segms"][0]["size"] == [40, 60]


@pytest.mark.parametrize("case,needle", [
    ("missing", "missing from"),
    ("category", "category_id 99"),
])
def test_coco_bad_input_is_one_line_error(tmp_path, case, needle):
    if case == "missing":
        root = _coco_tree(tmp_path / "c", drop_file="001.png")
    else:
        root = _coco_tree(tmp_path / "c", extra_anns=[{"id": 9, "image_id": 1, "category_id": 99,
                                                       "bbox": [1, 1, 2, 2], "area": 4, "iscrowd": 0}])
    with pytest.raises(LeanvitError) as e:
        create_dataset(root, "val")
    assert needle in str(e.value) and "instances_val2017.json" in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------ segmentation layouts

def _ade_tree(root, bad=None):
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((32, 48, 3), 100, np.uint8)).save(root / "images" / split / f"a{i}.jpg")
            lab = np.zeros((32, 48), np.uint8)
            lab[:16] = 1
            lab[16:, :24] = 150
            if bad == "value" and split == "validation" and i == 1:
                lab[0, 0] = 151
            size = (40, 32) if bad == "size" and split == "validation" and i == 1 else (48, 32)
            Image.fromarray(lab).resize(size, Image.NEAREST).save(root / "annotations" / split / f"a{i}.png")
    return root


def test_ade20k_layout_reduces_zero_label(tmp_path):
    root = _ade_tree(tmp_path / "ade")
    assert resolve_dataset_kind(root).name == "ade20k"
    assert len(dataset_classes(root)) == 150
    ds = create_dataset(root, "val")
    _, t = ds[0]
    m = t["mask"]
    assert m[0, 0] == 0 and m[20, 0] == 149 and m[20, 40] == IGNORE_INDEX


@pytest.mark.parametrize("bad,needle", [("size", "is 40x32 but its image"), ("value", "holds value 151")])
def test_ade20k_bad_masks_are_one_line_errors(tmp_path, bad, needle):
    root = _ade_tree(tmp_path / "ade", bad=bad)
    with pytest.raises(LeanvitError) as e:
        ds = create_dataset(root, "val")
        ds[1]
    assert needle in str(e.value) and "a1.png" in str(e.value)


def test_mask_folder_layout(tmp_path):
    root = tmp_path / "seg"
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "images" / split / "x.jpg")
        Image.fromarray(np.full((20, 20), 2, np.uint8)).save(root / "masks" / split / "x.png")
    assert resolve_dataset_kind(root).name == "masks"
    assert dataset_classes(root) == ["0", "1", "2"]  # scanned: the largest label + 1
    (root / "classes.txt").write_text("sky\nroad\ncar\nperson\n")
    assert dataset_classes(root) == ["sky", "road", "car", "person"]
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "images" / "val" / "y.jpg")
    with pytest.raises(LeanvitError, match="y.jpg has no mask"):
        create_dataset(root, "val")


# ------------------------------------------------------------------------------------------ metrics

def _gt(boxes, labels, image_id=1):
    return {"image_id": image_id, "height": 100, "width": 100, "boxes": np.array(boxes, float),
            "labels": np.array(labels)}


def test_coco_map_perfect_and_wrong_predictions():
    gts = [_gt([[10, 10, 20, 20], [2, 2, 100, 100]], [0, 1])]
    perfect = [{"image_id": 1, "boxes": np.array([[10, 10, 20, 20], [2, 2, 100, 100]], float),
                "scores": np.array([0.9, 0.8]), "labels": np.array([0, 1])}]
    r = coco_map(perfect, gts, num_classes=2)
    assert r["val_map"] == pytest.approx(1.0) and r["val_map50"] == pytest.approx(1.0)
    assert r["val_map_small"] == pytest.approx(1.0) and r["val_map_large"] == pytest.approx(1.0)
    assert r["val_map_medium"] is None  # no medium object: undefined
    wrong_class = [{**perfect[0], "labels": np.array([1, 0])}]
    assert coco_map(wrong_class, gts, num_classes=2)["val_map"] == pytest.approx(0.0)
    shifted = [{**perfect[0], "boxes": np.array([[12, 12, 22, 22], [2, 2, 100, 100]], float)}]
    r2 = coco_map(shifted, gts, num_classes=2)
    assert r2["val_map_small"] < 0.5 and r2["val_map_large"] == pytest.approx(1.0)


def test_undefined_is_undefined_whatever_the_model_predicts(tmp_path):
    """No large object in the split: AP large is undefined (None) with or without predictions, never 0.0; the
    eval JSON stores it as null and the line prints n/a; objects that exist but are not found score 0."""
    import json

    from leanvit.tools.eval import _write_json
    gts = [_gt([[10, 10, 20, 20]], [0])]  # one small object
    found = [{"image_id": 1, "boxes": np.array([[10, 10, 20, 20]], float), "scores": np.array([0.9]),
              "labels": np.array([0])}]
    nothing = [{"image_id": 1, "boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, int)}]
    for preds in (found, nothing):
        r = coco_map(preds, gts, num_classes=1)
        assert r["val_map_large"] is None and r["val_map_medium"] is None
    assert coco_map(nothing, gts, num_classes=1)["val_map_small"] == 0.0
    assert coco_map(nothing, [_gt(np.zeros((0, 4)), [])], num_classes=1)["val_map"] is None
    _write_json(r, tmp_path / "e.json")
    assert json.loads((tmp_path / "e.json").read_text())["val_map_large"] is None
    from leanvit.tasks import get_task
    line = get_task("detection").describe(r)
    assert "map_large n/a" in line and "map_small 0.0000" in line


def test_coco_mask_map_perfect_and_wrong_masks():
    """Mask AP: the boxes are right in both cases, the masks only in the first; object sizes are mask areas."""
    from leanvit.data.dense import encode_masks

    masks = np.zeros((2, 100, 100), np.uint8)
    masks[0, 10:20, 10:20] = 1       # small (100 px)
    masks[1, 2:100, 2:100] = 1       # large (9,604 px)
    gts = [{**_gt([[10, 10, 20, 20], [2, 2, 100, 100]], [0, 1]), "segms": encode_masks(masks)}]
    pred = {"image_id": 1, "boxes": np.array([[10, 10, 20, 20], [2, 2, 100, 100]], float),
            "scores": np.array([0.9, 0.8]), "labels": np.array([0, 1]), "segms": encode_masks(masks)}
    r = coco_map([pred], gts, num_classes=2)
    assert r["val_mask_map"] == pytest.approx(1.0) and r["val_map"] == pytest.approx(1.0)
    assert r["val_mask_map_small"] == pytest.approx(1.0) and r["val_mask_map_medium"] is None
    hollow = masks.copy()
    hollow[1, 10:90, 10:90] = 0      # the large mask loses two thirds of its pixels: IoU 0.33
    r2 = coco_map([{**pred, "segms": encode_masks(hollow)}], gts, num_classes=2)
    assert r2["val_map"] == pytest.approx(1.0)  # boxes unchanged
    assert r2["val_mask_map_large"] == pytest.approx(0.0) and r2["val_mask_map_small"] == pytest.approx(1.0)
    assert "val_mask_map" not in coco_map([{k: v for k, v in pred.items() if k != "segms"}], gts, num_classes=2)
    with pytest.raises(LeanvitError, match="N x H x W"):
        encode_masks(masks[0])


def test_miou_from_a_known_confusion():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 0]])
    cm = confusion_matrix(pred, target, 3)
    assert cm.sum() == 6
    s = segmentation_scores(cm, miou_classes=[1, 2])
    # IoU: class 0 = 1/2, class 1 = 2/3, class 2 = 1
    assert s["val_miou"] == pytest.approx((2 / 3 + 1) / 2)
    assert s["val_miou_all"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert s["val_pixel_acc"] == pytest.approx(5 / 6)
    with pytest.raises(LeanvitError, match="label 3 is outside"):
        confusion_matrix(pred, torch.full((2, 4), 3), 3)
