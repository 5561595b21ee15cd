"""Semantic segmentation: a segmenter (:func:`leanvit.dense.create_segmenter`: semantic_fpn | upernet |
linear) on a backbone; pixel cross-entropy ignoring label 255; validation is mIoU / pixel accuracy at each image's
original resolution, ``val_miou`` picks ``best.pth`` and ranks the sweep."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from leanvit.data.dense import IGNORE_INDEX, collate_segmentation, segmentation_transform, stack_masks
from leanvit.dense import SEGMENTERS, create_segmenter
from leanvit.tasks.base import Metric
from leanvit.tasks.dense import DenseTask
from leanvit.tasks.dense_eval import evaluate_segmentation, stride_bound
from leanvit.tasks.registry import register_task
from leanvit.viz.dense import segmentation_pictures

__all__ = ["SegmentationTask"]


def _step(ctx, x, targets):
    dev = ctx.env.device
    x = x.to(dev, non_blocking=True)
    y = stack_masks(targets, x.shape[-2], x.shape[-1]).to(dev, non_blocking=True)
    with ctx.autocast():
        logits = ctx.forward_model(x)
    loss = F.cross_entropy(logits.float(), y, ignore_index=IGNORE_INDEX)
    return loss, x.shape[0]


def _base_dataset(loader_or_dataset):
    ds = getattr(loader_or_dataset, "dataset", loader_or_dataset)
    while isinstance(ds, torch.utils.data.Subset):
        ds = ds.dataset
    return ds


class SegmentationTask(DenseTask):
    name = "segmentation"
    main_metric = "val_miou"
    head_key = "segmenter"
    heads = tuple(SEGMENTERS)
    pictures = staticmethod(segmentation_pictures)  # what `leanvit viz` draws
    collate_fn = staticmethod(collate_segmentation)  # batches as the model takes them
    settings = {**DenseTask.settings,
                "segmenter": None,   # semantic_fpn | upernet | linear (the backbone: `model`)
                "crop_size": None}   # training crop (square)
    metrics = (Metric("val_miou", "mIoU", ".4f"), Metric("val_miou_all", "mIoU (all classes)", ".4f"),
               Metric("val_pixel_acc", "pixel acc", ".4f"))
    sweep_columns = (("val_miou", "mIoU", ".4f"), ("val_miou_all", "mIoU all", ".4f"),
                     ("val_pixel_acc", "pixel acc", ".4f"))

    def create(self, head, backbone, num_classes, **kwargs):
        return create_segmenter(head, backbone, num_classes, **kwargs)

    def transform(self, cfg, train):
        if train:
            return segmentation_transform(True, cfg.get("min_size"), cfg.get("max_size"), cfg.get("crop_size"),
                                          hflip=cfg["hflip"])
        return segmentation_transform(False, cfg.get("min_size"), cfg.get("max_size"))

    def training_step(self, cfg, num_classes):
        return _step

    def evaluate(self, model, loader, device="cpu", amp=False, progress=False, max_batches=None, dataset=None):
        ds = _base_dataset(dataset if dataset is not None else loader)
        return evaluate_segmentation(model, loader, int(model.num_classes), device=device, amp=amp,
                                     miou_classes=getattr(ds, "miou_classes", None), progress=progress,
                                     max_batches=max_batches)

    def stride_bound(self, built, data=None, stride=None, batch_size: int = 64):
        """The scores no training can beat at the model's output stride (the finest map its head reads;
        ``stride`` to ask for another) on ``data``'s validation split (default: the data it was trained on):
        see :func:`leanvit.tasks.dense_eval.stride_bound`. Returns the scores and ``stride``."""
        model = built.model
        if stride is None:
            stride = min(getattr(getattr(model, "backbone", None), "strides", None) or [1])
        dataset, loader = self.eval_data(built, data or built.config["data"], batch_size=batch_size)
        res = stride_bound(loader, int(model.num_classes), int(stride),
                           miou_classes=getattr(_base_dataset(dataset), "miou_classes", None))
        return {**res, "stride": int(stride)}

    def draw_size(self, config):
        return config.get("min_size")


register_task(SegmentationTask())
