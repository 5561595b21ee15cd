"""Object detection: a torchvision detector (:func:`leanvit.dense.create_detector`: retinanet | fcos |
fasterrcnn | maskrcnn) on a backbone; batches are (list of images, list of targets), the loss is the sum of
the detector's losses; validation is pycocotools' COCO box mAP (mask mAP too for Mask R-CNN), ``val_map``
picks ``best.pth`` and ranks the sweep (with mAP@0.5 and AP small beside it)."""
from __future__ import annotations

import torch

from leanvit.data.dense import collate_detection, detection_transform
from leanvit.dense import DETECTORS, create_detector
from leanvit.tasks.base import Metric
from leanvit.tasks.dense import DenseTask
from leanvit.tasks.dense_eval import DETECTION_KEYS, MASK_KEYS, evaluate_detection
from leanvit.tasks.registry import register_task
from leanvit.viz.dense import detection_pictures

__all__ = ["DetectionTask"]

_BRIEF = ("val_map", "val_map50", "val_map_small", "val_mask_map")


def _plain(t):
    return t.as_subclass(torch.Tensor) if isinstance(t, torch.Tensor) else t


def _step(ctx, images, targets):
    dev = ctx.env.device
    xs = [_plain(im).to(dev, non_blocking=True) for im in images]
    ts = [{k: _plain(v).to(dev, non_blocking=True) for k, v in t.items() if k in ("boxes", "labels", "masks")}
          for t in targets]
    with ctx.autocast():
        losses = ctx.forward_model(xs, ts)
    loss = sum(v.float() for v in losses.values())
    return loss, len(xs)


class DetectionTask(DenseTask):
    name = "detection"
    main_metric = "val_map"
    head_key = "detector"
    heads = tuple(DETECTORS)
    pictures = staticmethod(detection_pictures)  # what `leanvit viz` draws
    collate_fn = staticmethod(collate_detection)  # batches as the model takes them
    settings = {**DenseTask.settings,
                "detector": None}  # retinanet | fcos | fasterrcnn | maskrcnn (the backbone: `model`)
    # COCOeval's figures (mask ones for Mask R-CNN); the per-epoch line shows mAP, mAP@0.5, AP small, mask mAP
    metrics = tuple(Metric(k, k[4:], ".4f", brief=k in _BRIEF) for k in DETECTION_KEYS + MASK_KEYS)
    sweep_columns = (("val_map", "mAP", ".4f"), ("val_map50", "mAP@0.5", ".4f"), ("val_map_small", "AP small", ".4f"))

    def create(self, head, backbone, num_classes, **kwargs):
        return create_detector(head, backbone, num_classes, **kwargs)

    def transform(self, cfg, train):
        if train:
            return detection_transform(True, cfg.get("min_size"), cfg.get("max_size"), hflip=cfg["hflip"])
        return detection_transform(False, cfg.get("min_size"), cfg.get("max_size"))

    def data_options(self, cfg):
        options = super().data_options(cfg)
        if cfg.get("detector") == "maskrcnn":
            options["masks"] = True
        return options

    def model_spec(self, cfg, num_classes):
        spec = super().model_spec(cfg, num_classes)
        for key in ("min_size", "max_size"):
            if cfg.get(key):
                spec["kwargs"].setdefault(key, int(cfg[key]))
        return spec

    def training_step(self, cfg, num_classes):
        return _step

    def evaluate(self, model, loader, device="cpu", amp=False, progress=False, max_batches=None, dataset=None):
        n = getattr(model, "num_object_classes", None)
        return evaluate_detection(model, loader, device=device, amp=amp, progress=progress, max_batches=max_batches,
                                  num_classes=n)

    def example_input(self, batch, hw):
        return [torch.randn(3, *hw) for _ in range(batch)]


register_task(DetectionTask())
