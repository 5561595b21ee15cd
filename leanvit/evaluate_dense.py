"""Dense evaluation as a library: COCO box mAP for detectors, mIoU / pixel accuracy for segmenters.

    from leanvit.evaluate_dense import evaluate_detection, evaluate_segmentation
    evaluate_detection(detector, loader)   # {"val_map": 0.61, "val_map50": 0.93, "val_map_small": ..., ...}
    evaluate_segmentation(segmenter, loader, num_classes=11, miou_classes=range(1, 11))

Detection metrics are pycocotools' ``COCOeval`` (bbox): mAP@[.5:.95] (``val_map``), mAP@0.5
(``val_map50``), mAP@0.75 (``val_map75``) and AP for small / medium / large objects (area < 32², < 96²,
larger; ``val_map_small`` / ``_medium`` / ``_large``; -1 where a split has no object of that size, as
COCOeval reports it). Predictions are mapped back to each image's original size (``target['orig_size']``)
with torchvision's ``v2.functional.resize`` on ``BoundingBoxes`` and scored against the ground truth the
dataset keeps in original coordinates (``gt_boxes``, ``gt_labels``, ``gt_area``, ``gt_iscrowd``).

Segmentation metrics come from one confusion matrix over all pixels whose label is not ignored, at each
image's original resolution (logits resized bilinearly to ``gt_mask``): ``val_miou`` is the mean IoU over
``miou_classes`` (default: all; classes absent from both prediction and ground truth are left out),
``val_miou_all`` over all classes, ``val_pixel_acc`` the fraction of labelled pixels right.

Under ``torch.distributed`` each process evaluates its shard; detections are gathered and the confusion
matrix summed, so every process returns the same figures.
"""
from __future__ import annotations

import contextlib
import io
import logging
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from leanvit.data.dense import IGNORE_INDEX
from leanvit.errors import LeanvitError

__all__ = ["coco_map", "evaluate_detection", "evaluate_segmentation", "confusion_matrix", "segmentation_scores",
           "DETECTION_KEYS", "SEGMENTATION_KEYS", "predict_detection"]

log = logging.getLogger(__name__)

DETECTION_KEYS = ("val_map", "val_map50", "val_map75", "val_map_small", "val_map_medium", "val_map_large")
SEGMENTATION_KEYS = ("val_miou", "val_miou_all", "val_pixel_acc")


def _gather(obj: Any) -> List[Any]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: List[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _xyxy_to_xywh(b: np.ndarray) -> np.ndarray:
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


def coco_map(predictions: Sequence[Dict[str, Any]], ground_truth: Sequence[Dict[str, Any]],
             num_classes: Optional[int] = None) -> Dict[str, float]:
    """COCO box AP with pycocotools.

    Args:
        predictions: per image ``{"image_id", "boxes" (N x 4 XYXY), "scores", "labels"}``.
        ground_truth: per image ``{"image_id", "height", "width", "boxes" (XYXY), "labels", "area"?,
            "iscrowd"?}``; every evaluated image must be here (images without objects included).
        num_classes: labels are 0..num_classes-1 (default: those seen); COCO category ids are label + 1.
    Returns: :data:`DETECTION_KEYS` as fractions in [0, 1] (-1: no ground truth of that kind).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not ground_truth:
        raise LeanvitError("the validation set is empty: nothing to compute mAP on")
    images, anns = [], []
    seen_labels = set()
    for g in ground_truth:
        images.append({"id": int(g["image_id"]), "height": int(g["height"]), "width": int(g["width"])})
        boxes = _xyxy_to_xywh(np.asarray(g["boxes"]))
        labels = np.asarray(g["labels"]).reshape(-1)
        area = np.asarray(g.get("area") if g.get("area") is not None else boxes[:, 2] * boxes[:, 3]).reshape(-1)
        crowd = np.asarray(g.get("iscrowd") if g.get("iscrowd") is not None else np.zeros(len(labels))).reshape(-1)
        for b, lab, a, c in zip(boxes, labels, area, crowd):
            seen_labels.add(int(lab) + 1)
            anns.append({"id": len(anns) + 1, "image_id": int(g["image_id"]), "category_id": int(lab) + 1,
                         "bbox": [float(v) for v in b], "area": float(a), "iscrowd": int(c)})
    cats = range(1, int(num_classes) + 1) if num_classes else sorted(seen_labels)
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": int(c)} for c in cats]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    dets = []
    for p in predictions:
        boxes = _xyxy_to_xywh(np.asarray(p["boxes"]))
        for b, s, lab in zip(boxes, np.asarray(p["scores"]).reshape(-1), np.asarray(p["labels"]).reshape(-1)):
            dets.append([int(p["image_id"]), *[float(v) for v in b], float(s), int(lab) + 1])
    keys = DETECTION_KEYS
    if not dets or not anns:
        return {k: (0.0 if anns else -1.0) for k in keys}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(np.asarray(dets, dtype=np.float64))
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = [im["id"] for im in images]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = ev.stats  # AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl
    return {"val_map": float(s[0]), "val_map50": float(s[1]), "val_map75": float(s[2]),
            "val_map_small": float(s[3]), "val_map_medium": float(s[4]), "val_map_large": float(s[5])}


def _to_original(boxes: torch.Tensor, size, orig_size) -> torch.Tensor:
    """Boxes predicted on an image of ``size`` (H, W), in the coordinates of its original ``orig_size``."""
    size, orig_size = tuple(int(v) for v in size), tuple(int(v) for v in orig_size)
    if size == orig_size:
        return boxes
    bb = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=size)
    return TF.resize(bb, list(orig_size)).as_subclass(torch.Tensor)


@torch.inference_mode()
def predict_detection(model: nn.Module, loader, device="cpu", amp: bool = False, progress: bool = False,
                      max_batches: Optional[int] = None, desc: str = "eval"):
    """Run ``model`` (eval mode, a torchvision-style detector) over ``loader``'s (images, targets) batches.

    Returns (predictions, ground truth, images, forward seconds) for :func:`coco_map`, in original coordinates."""
    device = torch.device(device)
    preds, gts, fwd, n = [], [], 0.0, 0
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    total = len(loader) if max_batches is None else min(len(loader), max_batches)
    for i, (images, targets) in enumerate(tqdm(loader, total=total, desc=desc, unit="batch", disable=not progress,
                                               leave=False)):
        if max_batches is not None and i >= max_batches:
            break
        xs = [im.as_subclass(torch.Tensor).to(device, non_blocking=True) for im in images]
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            out = model(xs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        fwd += time.perf_counter() - t0
        for x, o, t in zip(xs, out, targets):
            orig = t.get("orig_size", x.shape[-2:])
            boxes = _to_original(o["boxes"].float().cpu(), x.shape[-2:], orig)
            preds.append({"image_id": int(t["image_id"]), "boxes": boxes.numpy(),
                          "scores": o["scores"].float().cpu().numpy(), "labels": o["labels"].cpu().numpy()})
            gts.append({"image_id": int(t["image_id"]), "height": int(orig[0]), "width": int(orig[1]),
                        "boxes": np.asarray(t["gt_boxes"]), "labels": np.asarray(t["gt_labels"]),
                        "area": np.asarray(t["gt_area"]) if "gt_area" in t else None,
                        "iscrowd": np.asarray(t["gt_iscrowd"]) if "gt_iscrowd" in t else None})
        n += len(xs)
    return preds, gts, n, fwd


def evaluate_detection(model: nn.Module, loader, device="cpu", amp: bool = False, progress: bool = False,
                       max_batches: Optional[int] = None, num_classes: Optional[int] = None,
                       desc: str = "eval") -> Dict[str, float]:
    """COCO mAP of ``model`` on ``loader`` (see the module docstring); adds ``images`` and ``img_per_s``
    (forward passes only). ``num_classes``: object classes (labels 0..num_classes-1)."""
    was_training = model.training
    model.eval()
    try:
        preds, gts, n, fwd = predict_detection(model, loader, device, amp, progress, max_batches, desc)
    finally:
        model.train(was_training)
    all_preds, all_gts = [], []
    for p, g in _gather((preds, gts)):
        all_preds += p
        all_gts += g
    res = coco_map(all_preds, all_gts, num_classes)
    res.update(images=len(all_gts), img_per_s=n / fwd if fwd > 0 else float("nan"))
    return res


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """K x K counts (rows: ground truth, columns: prediction) over pixels whose label is not ignored.
    A label >= ``num_classes`` that is not the ignore label is an error."""
    target = target.reshape(-1).long()
    pred = pred.reshape(-1).long()
    keep = target != ignore_index
    target, pred = target[keep], pred[keep]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        bad = int(target[(target < 0) | (target >= num_classes)][0])
        raise LeanvitError(f"label {bad} is outside the {num_classes} classes (0..{num_classes - 1}, "
                           f"{ignore_index} = ignore)")
    return torch.bincount(target * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_scores(cm: torch.Tensor, miou_classes: Optional[Iterable[int]] = None) -> Dict[str, float]:
    """mIoU (over ``miou_classes``), mIoU over all classes, pixel accuracy and per-class IoU from ``cm``."""
    cm = cm.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    total = float(cm.sum())
    if total == 0:
        raise LeanvitError("the validation set has no labelled pixels: nothing to compute mIoU on")
    sel = list(miou_classes) if miou_classes is not None else list(range(cm.shape[0]))
    picked = iou[sel]
    picked = picked[~torch.isnan(picked)]
    valid = iou[~torch.isnan(iou)]
    return {"val_miou": float(picked.mean()) if picked.numel() else 0.0,
            "val_miou_all": float(valid.mean()) if valid.numel() else 0.0,
            "val_pixel_acc": float(tp.sum()) / total, "per_class_iou": [None if np.isnan(v) else float(v)
                                                                      for v in iou.tolist()]}


@torch.inference_mode()
def evaluate_segmentation(model: nn.Module, loader, num_classes: int, device="cpu", amp: bool = False,
                          miou_classes: Optional[Iterable[int]] = None, progress: bool = False,
                          max_batches: Optional[int] = None, desc: str = "eval") -> Dict[str, Any]:
    """mIoU / pixel accuracy of a segmenter (``model(x) -> B x K x H x W`` logits at the input resolution)
    over ``loader``'s (images, targets) batches, at each image's original resolution."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    n, fwd = 0, 0.0
    total = len(loader) if max_batches is None else min(len(loader), max_batches)
    try:
        for i, (x, targets) in enumerate(tqdm(loader, total=total, desc=desc, unit="batch", disable=not progress,
                                              leave=False)):
            if max_batches is not None and i >= max_batches:
                break
            x = x.to(device, non_blocking=True)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                logits = model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            fwd += time.perf_counter() - t0
            if logits.shape[1] != num_classes:
                raise LeanvitError(f"the model predicts {logits.shape[1]} classes but the data has {num_classes}")
            for j, t in enumerate(targets):
                gt = t.get("gt_mask", t["mask"]).as_subclass(torch.Tensor)
                img_hw = tuple(t["mask"].shape[-2:])  # the transformed image's size (before batch padding)
                lg = logits[j:j + 1, :, :img_hw[0], :img_hw[1]].float()
                if tuple(lg.shape[-2:]) != tuple(gt.shape[-2:]):
                    lg = F.interpolate(lg, size=tuple(gt.shape[-2:]), mode="bilinear", align_corners=False)
                cm += confusion_matrix(lg.argmax(1).cpu(), gt, num_classes)
            n += x.shape[0]
    finally:
        model.train(was_training)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = cm.to(device) if dist.get_backend() == "nccl" else cm
        dist.all_reduce(t)
        cm = t.cpu()
    res = segmentation_scores(cm, miou_classes)
    res.update(images=n, img_per_s=n / fwd if fwd > 0 else float("nan"))
    return res
