"""Detection data in the COCO layout: ``--data DIR`` with ``DIR/annotations/instances_<split>.json`` and the
images in ``DIR/<split>/`` (e.g. ``train2017`` / ``val2017``; any ``instances_<name>.json`` + ``<name>/``
pair). ``split`` ``train`` / ``val`` pick the newest ``instances_train*.json`` / ``instances_val*.json``;
an exact name (``val2017``) picks that one.

Read through pycocotools. Categories become contiguous labels 0..K-1 in category-id order (COCO's 80 of
ids 1-90); instance masks come from pycocotools' ``annToMask`` when the option ``masks`` is set (Mask
R-CNN). Crowd annotations are left out of the training targets and kept in the evaluation ground truth,
as COCOeval ignores detections matched to them.

What the annotations get wrong is caught before training starts, each named by its file:

* a file that is not UTF-8 JSON, an image the json lists but the folder lacks, a category id the json
  does not declare, ids that are not integers, an image without a positive integer ``height`` / ``width``,
  an annotation whose bbox is not 4 finite numbers (strings, ``null``, NaN): a one-line error;
* an evaluation split (any split but ``train*``) with no annotation to score against: a one-line error,
  since its mAP is undefined (COCOeval's -1), not a score;
* images without annotations: kept as negatives, counted;
* boxes reaching outside their image: clipped (``torchvision.ops.clip_boxes_to_image``), counted;
  boxes with no width or height (after clipping): dropped, counted;
the counts are logged once when the split is loaded and repeated in the run's summary.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.ops import box_convert, clip_boxes_to_image

from leanvit.data.dense import SkipCounter
from leanvit.data.folder import load_image
from leanvit.data.registry import DatasetKind, check_keyword_options, register_dataset
from leanvit.errors import LeanvitError

__all__ = ["CocoDetection", "CocoKind", "find_coco_split"]

log = logging.getLogger(__name__)


def _annotation_files(root: Path) -> List[Path]:
    ann = root / "annotations"
    return sorted(ann.glob("instances_*.json")) if ann.is_dir() else []


def find_coco_split(root, split: str) -> Tuple[Path, Path]:
    """(annotation json, image folder) of ``split`` under a COCO-layout ``root``."""
    root = Path(root)
    files = _annotation_files(root)
    names = [f.stem[len("instances_"):] for f in files]
    if split in names:
        name = split
    else:
        picks = [n for n in names if n.startswith(split)]
        if not picks:
            raise LeanvitError(f"{root}/annotations has no instances_{split}*.json (found: "
                               f"{', '.join(f.name for f in files) or 'none'})")
        name = sorted(picks)[-1]
    folder = root / name
    if not folder.is_dir():
        raise LeanvitError(f"{root / 'annotations' / f'instances_{name}.json'} has no image folder {folder}")
    return root / "annotations" / f"instances_{name}.json", folder


def _load_json(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise LeanvitError(f"{path} is not UTF-8 text (byte {e.start}): a COCO json is UTF-8") from None
    except json.JSONDecodeError as e:
        raise LeanvitError(f"{path} is not valid JSON: {e}") from None
    except OSError as e:
        raise LeanvitError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("categories"), list):
        raise LeanvitError(f"{path} is not a COCO instances file (needs 'images', 'annotations', 'categories')")
    data.setdefault("annotations", [])
    _check_entries(path, data)
    return data


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_entries(path: Path, data: Dict[str, Any]) -> None:
    """The values COCO's format fixes, each checked (a one-line error naming the entry): integer ids,
    image sizes, file names, finite ``[x, y, w, h]`` boxes, numeric areas, 0/1 ``iscrowd``."""
    if not isinstance(data["annotations"], list):
        raise LeanvitError(f"{path}: 'annotations' must be a list, got {type(data['annotations']).__name__}")
    for key, kind in (("images", "image"), ("categories", "category"), ("annotations", "annotation")):
        for i, entry in enumerate(data[key]):
            if not isinstance(entry, dict):
                raise LeanvitError(f"{path}: {key}[{i}] is not an object: {entry!r:.60}")
            if not _is_int(entry.get("id")):
                raise LeanvitError(f"{path}: {kind} {key}[{i}] has id {entry.get('id')!r} "
                                   f"({type(entry.get('id')).__name__}); COCO ids are integers")
    for im in data["images"]:
        for k in ("height", "width"):
            v = im.get(k)
            if not (_is_int(v) or (isinstance(v, float) and v.is_integer())) or v <= 0:
                raise LeanvitError(f"{path}: image {im['id']} has {k} {v!r}; COCO images need positive integer "
                                   "'height' and 'width'")
        if not isinstance(im.get("file_name"), str) or not im["file_name"]:
            raise LeanvitError(f"{path}: image {im['id']} has file_name {im.get('file_name')!r}")
    for a in data["annotations"]:
        for k in ("image_id", "category_id"):
            if not _is_int(a.get(k)):
                raise LeanvitError(f"{path}: annotation {a['id']} has {k} {a.get(k)!r} ({type(a.get(k)).__name__});"
                                   f" COCO ids are integers")
        bb = a.get("bbox")
        if not (isinstance(bb, (list, tuple)) and len(bb) == 4 and all(_is_number(v) for v in bb)):
            raise LeanvitError(f"{path}: annotation {a['id']} has a malformed bbox {bb!r} (needs 4 finite numbers "
                               "[x, y, width, height])")
        if "area" in a and not _is_number(a["area"]):
            raise LeanvitError(f"{path}: annotation {a['id']} has area {a['area']!r}, not a finite number")
        if a.get("iscrowd", 0) not in (0, 1) or isinstance(a.get("iscrowd"), bool):
            raise LeanvitError(f"{path}: annotation {a['id']} has iscrowd {a.get('iscrowd')!r} (0 or 1)")


class CocoDetection:
    """One split of a COCO-layout folder as (image, target) (see :mod:`leanvit.data.dense` for the format).

    Args:
        root: the folder holding ``annotations/`` and the image folders; split: ``train``, ``val`` or a name.
        transform: a dense transform ``transform(image, target)``.
        masks: also give instance masks (Mask R-CNN).
    """

    def __init__(self, root, split: str = "train", transform=None, masks: bool = False):
        from pycocotools.coco import COCO

        self.ann_file, self.folder = find_coco_split(root, split)
        data = _load_json(self.ann_file)
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO()
            coco.dataset = data
            coco.createIndex()
        self.coco, self.transform, self.with_masks = coco, transform, bool(masks)
        self.skips = SkipCounter(str(self.ann_file))
        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.cat_ids = [int(c["id"]) for c in cats]
        self.cat_to_label = {c: i for i, c in enumerate(self.cat_ids)}
        self.classes = [str(c.get("name", c["id"])) for c in cats]
        if not self.classes:
            raise LeanvitError(f"{self.ann_file} declares no categories")
        self.ids = sorted(int(im["id"]) for im in data["images"])
        missing = [coco.imgs[i]["file_name"] for i in self.ids
                   if not (self.folder / coco.imgs[i]["file_name"]).is_file()]
        if missing:
            raise LeanvitError(f"{self.ann_file} references {len(missing)} image file(s) missing from {self.folder}, "
                               f"e.g. {missing[0]}")
        self.targets_cache: Dict[int, Dict[str, Any]] = {}
        for a in data["annotations"]:
            if int(a.get("category_id", -1)) not in self.cat_to_label:
                raise LeanvitError(f"{self.ann_file}: annotation {a.get('id')} has category_id "
                                   f"{a.get('category_id')}, not one of the declared categories")
            if int(a.get("image_id", -1)) not in coco.imgs:
                raise LeanvitError(f"{self.ann_file}: annotation {a.get('id')} refers to image_id "
                                   f"{a.get('image_id')}, not in 'images'")
            bb = a.get("bbox")
            if not (isinstance(bb, (list, tuple)) and len(bb) == 4):
                raise LeanvitError(f"{self.ann_file}: annotation {a.get('id')} has a malformed bbox {bb!r}")
        for i in self.ids:  # clip/drop now, so that the counts are known (and reported) before training
            self.targets_cache[i] = self._annotations(i)
        negatives = sum(1 for i in self.ids if not self.coco.imgToAnns.get(i))
        self.skips.add("image(s) without annotations (kept as negatives)", negatives)
        if not self.ids:
            raise LeanvitError(f"{self.ann_file} lists no images")
        self.skips.report()
        self.num_skipped = 0

    def _annotations(self, image_id: int) -> Dict[str, Any]:
        info = self.coco.imgs[image_id]
        h, w = int(info["height"]), int(info["width"])
        anns = self.coco.imgToAnns.get(image_id, [])
        if not anns:
            return {"anns": [], "boxes": torch.zeros((0, 4)), "hw": (h, w)}
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
        xyxy = box_convert(xywh, "xywh", "xyxy")
        clipped = clip_boxes_to_image(xyxy, (h, w))
        moved = (clipped != xyxy).any(1)
        empty = ((clipped[:, 2] - clipped[:, 0]) <= 0) | ((clipped[:, 3] - clipped[:, 1]) <= 0)
        self.skips.add("box(es) reaching outside their image (clipped)", int((moved & ~empty).sum()))
        self.skips.add("box(es) with no width or height (dropped)", int(empty.sum()))
        keep = (~empty).nonzero().flatten().tolist()
        return {"anns": [anns[k] for k in keep], "boxes": clipped[keep], "hw": (h, w)}

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, index: int):
        return load_image(self.folder / self.coco.imgs[self.ids[index]]["file_name"])

    def target(self, index: int, size: Tuple[int, int]) -> Dict[str, Any]:
        image_id = self.ids[index]
        t = self.targets_cache[image_id]
        h, w = t["hw"]
        if (h, w) != tuple(size):
            raise LeanvitError(f"{self.folder / self.coco.imgs[image_id]['file_name']} is {size[1]}x{size[0]} but "
                               f"{self.ann_file} says {w}x{h}")
        anns = t["anns"]
        labels = torch.tensor([self.cat_to_label[int(a["category_id"])] for a in anns], dtype=torch.int64)
        crowd = torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64)
        area = torch.tensor([float(a.get("area", 0.0)) or float((b[2] - b[0]) * (b[3] - b[1]))
                             for a, b in zip(anns, t["boxes"].tolist())], dtype=torch.float32)
        boxes = t["boxes"].reshape(-1, 4)
        train = crowd == 0
        out = {"boxes": tv_tensors.BoundingBoxes(boxes[train], format="XYXY", canvas_size=(h, w)),
               "labels": labels[train], "image_id": image_id, "orig_size": (h, w),
               "gt_boxes": boxes.clone(), "gt_labels": labels, "gt_area": area, "gt_iscrowd": crowd}
        if self.with_masks:
            ms = [self.coco.annToMask(a) for a, c in zip(anns, crowd.tolist()) if c == 0]
            m = np.stack(ms) if ms else np.zeros((0, h, w), dtype=np.uint8)
            out["masks"] = tv_tensors.Mask(torch.from_numpy(m.astype(np.uint8)))
            out["gt_segms"] = [self.coco.annToRLE(a) for a in anns]  # crowd regions too, as COCOeval wants
        return out

    def __getitem__(self, index: int):
        img = self.image(index)
        image = tv_tensors.Image(torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous())
        target = self.target(index, (img.height, img.width))
        if self.transform is not None:
            return self.transform(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"CocoDetection({str(self.ann_file)!r}, images={len(self)}, classes={len(self.classes)})"


class CocoKind(DatasetKind):
    """``--data DIR`` where ``DIR/annotations/instances_*.json`` exist (options: recipe ``coco:``, e.g.
    ``{masks: true}``, which Mask R-CNN runs set themselves)."""

    name = "coco"
    task = "detection"
    options_key = "coco"

    def matches(self, data: str) -> bool:
        return bool(_annotation_files(Path(data)))

    def create(self, data, split, transform=None, options=None, classes=None, skip_corrupt=False):
        self.check_options(options or {})
        ds = CocoDetection(data, split, transform=transform, **(options or {}))
        scored = [a for a in ds.coco.dataset["annotations"] if not a.get("iscrowd", 0)]
        if not str(split).startswith("train") and not scored:
            raise LeanvitError(f"{ds.ann_file} has no (non-crowd) annotations: an mAP on it is undefined (COCOeval "
                               "reports -1), not a score; evaluate on a split with annotated objects")
        if classes is not None and list(classes) != ds.classes:
            raise LeanvitError(f"the categories of {ds.ann_file} differ from training's ({len(ds.classes)} vs "
                               f"{len(classes)})")
        return ds

    def check_options(self, options):
        check_keyword_options("coco", options, CocoDetection.__init__, skip=("self", "root", "split", "transform"))

    def classes(self, data, split="val", options=None):
        try:  # the validation json is the small one; both declare the same categories
            path, _ = find_coco_split(data, "val")
        except LeanvitError:
            path, _ = find_coco_split(data, split)
        cats = sorted(_load_json(path)["categories"], key=lambda c: c["id"])
        return [str(c.get("name", c["id"])) for c in cats]


register_dataset(CocoKind())
