"""Pictures of dense predictions: boxes with class and score, instance masks, segmentation label maps.

    from leanvit.viz import detection_pictures, visualize_dense
    visualize_dense(detector, detection_pictures, [pil_image, ...], "viz/", class_names=classes)

Drawing is torchvision's (``draw_bounding_boxes``, ``draw_segmentation_masks``); small images (the embedded
96 px scenes) are enlarged first (nearest neighbour, boxes moved with ``v2.functional.resize``) so the
labels are legible.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid

from leanvit.errors import LeanvitError
from leanvit.viz.common import palette

__all__ = ["predict_detections", "predict_label_maps", "draw_detections", "draw_segmentation",
           "detection_pictures", "segmentation_pictures", "save_pictures", "visualize_dense"]

log = logging.getLogger(__name__)


def _rgb255(n: int) -> List[tuple]:
    return [tuple(int(255 * c) for c in rgb) for rgb in palette(n)]


def _to_uint8(image) -> torch.Tensor:
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()
    t = image.as_subclass(torch.Tensor) if isinstance(image, torch.Tensor) else torch.as_tensor(image)
    return t if t.dtype == torch.uint8 else (t.clamp(0, 1) * 255).round().to(torch.uint8)


def _as_float(images: Sequence) -> List[torch.Tensor]:
    return [TF.to_dtype(_to_uint8(im), torch.float32, scale=True) for im in images]


@torch.inference_mode()
def predict_detections(model: nn.Module, images: Sequence, device="cpu",
                       batch_size: int = 8) -> List[Dict[str, torch.Tensor]]:
    """A torchvision-style detector's predictions (boxes, labels, scores[, masks]) for PIL images, in each
    image's own coordinates (the detector resizes inside and maps the boxes back)."""
    model = model.eval().to(device)
    out: List[Dict[str, torch.Tensor]] = []
    for i in range(0, len(images), batch_size):
        xs = _as_float(images[i:i + batch_size])
        out += [{k: v.cpu() for k, v in o.items()} for o in model([x.to(device) for x in xs])]
    return out


@torch.inference_mode()
def predict_label_maps(model: nn.Module, images: Sequence, device="cpu",
                       min_size: Optional[int] = None) -> List[Dict[str, torch.Tensor]]:
    """A segmenter's ``{"labels": H x W}`` for PIL images (the argmax of its logits at the image's size; the
    input resized to shorter side ``min_size`` first when given)."""
    model = model.eval().to(device)
    out: List[Dict[str, torch.Tensor]] = []
    for x in _as_float(images):
        h, w = x.shape[-2:]
        xin = TF.resize(x, int(min_size), antialias=True) if min_size else x
        logits = model(xin[None].to(device)).float()
        if tuple(logits.shape[-2:]) != (h, w):
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        out.append({"labels": logits.argmax(1)[0].cpu()})
    return out


def _font() -> Optional[str]:
    """A TrueType font for legible labels (matplotlib's bundled DejaVu Sans) when there is one."""
    try:
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        return str(path) if path.is_file() else None
    except ImportError:
        return None


def _enlarge(img: torch.Tensor, min_side: int) -> torch.Tensor:
    h, w = img.shape[-2:]
    f = max(1, int(np.ceil(min_side / min(h, w))))
    return img if f == 1 else img.repeat_interleave(f, -2).repeat_interleave(f, -1)


def draw_detections(image, pred: Dict[str, torch.Tensor], class_names: Optional[Sequence[str]] = None,
                    score_thresh: float = 0.3, min_side: int = 288) -> torch.Tensor:
    """The image (uint8 3 x H x W, enlarged to ``min_side``) with boxes labelled "class score" and masks."""
    img = _to_uint8(image)
    h, w = img.shape[-2:]
    big = _enlarge(img, min_side)
    H, W = big.shape[-2:]
    keep = pred["scores"] >= score_thresh
    labels = pred["labels"][keep].tolist()
    colours = _rgb255(max(len(class_names or []), max(labels, default=0) + 1))
    if "masks" in pred and keep.any():
        m = pred["masks"][keep]
        m = (m[:, 0] if m.ndim == 4 else m) > 0.5
        m = TF.resize(tv_tensors.Mask(m.to(torch.uint8)), [H, W],
                      interpolation=TF.InterpolationMode.NEAREST).as_subclass(torch.Tensor).bool()
        big = draw_segmentation_masks(big, m, alpha=0.4, colors=[colours[c] for c in labels])
    if keep.any():
        boxes = TF.resize(tv_tensors.BoundingBoxes(pred["boxes"][keep].float(), format="XYXY", canvas_size=(h, w)),
                          [H, W]).as_subclass(torch.Tensor)
        names = [f"{class_names[c] if class_names and c < len(class_names) else c} {s:.2f}"
                 for c, s in zip(labels, pred["scores"][keep].tolist())]
        font = _font()
        big = draw_bounding_boxes(big, boxes, labels=names, colors=[colours[c] for c in labels], width=2,
                                  **({"font": font, "font_size": 13} if font else {}))
    return big


def draw_segmentation(image, labels: torch.Tensor, num_classes: int, ignore: Sequence[int] = (0,),
                      min_side: int = 288, class_names: Optional[Sequence[str]] = None) -> torch.Tensor:
    """The image with each predicted class (except ``ignore``, e.g. the background) painted over it and
    named (with ``class_names``) at the middle of its pixels."""
    img = _enlarge(_to_uint8(image), min_side)
    H, W = img.shape[-2:]
    lab = TF.resize(tv_tensors.Mask(labels[None]), [H, W],
                    interpolation=TF.InterpolationMode.NEAREST).as_subclass(torch.Tensor)[0]
    present = [c for c in lab.unique().tolist() if c not in ignore and c < num_classes]
    if not present:
        return img
    masks = torch.stack([lab == c for c in present])
    colours = _rgb255(num_classes)
    img = draw_segmentation_masks(img, masks, alpha=0.55, colors=[colours[c] for c in present])
    if not class_names:
        return img
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(pil)
    font = ImageFont.truetype(_font(), 14) if _font() else ImageFont.load_default()
    for c, m in zip(present, masks):
        ys, xs = torch.nonzero(m, as_tuple=True)
        draw.text((float(xs.float().median()), float(ys.float().median())), str(class_names[c]), fill=(255, 255, 255),
                  font=font, anchor="mm", stroke_width=2, stroke_fill=(0, 0, 0))
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1).contiguous()


def detection_pictures(model: nn.Module, images: Sequence, class_names: Optional[Sequence[str]] = None,
                       device="cpu", score_thresh: float = 0.3, **options) -> List[torch.Tensor]:
    """A detector's boxes (class and score) and masks drawn over each image (:func:`draw_detections`)."""
    preds = predict_detections(model, list(images), device=device)
    return [draw_detections(im, p, class_names, score_thresh) for im, p in zip(images, preds)]


def segmentation_pictures(model: nn.Module, images: Sequence, class_names: Optional[Sequence[str]] = None,
                          device="cpu", min_size: Optional[int] = None, **options) -> List[torch.Tensor]:
    """A segmenter's label map painted over each image (:func:`draw_segmentation`; a first class named
    ``background`` is left unpainted)."""
    pics = []
    for im, p in zip(images, predict_label_maps(model, list(images), device=device, min_size=min_size)):
        k = len(class_names) if class_names else int(p["labels"].max()) + 1
        bg = (0,) if class_names and class_names[0] == "background" else ()
        pics.append(draw_segmentation(im, p["labels"], k, ignore=bg, class_names=class_names))
    return pics


def save_pictures(pictures: Sequence[torch.Tensor], out_dir, names: Optional[Sequence[str]] = None,
                  grid_name: str = "predictions.png") -> List[Path]:
    """One PNG per picture (uint8 3 x H x W) and a grid of all in ``out_dir``; the paths, the grid last."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, pic in enumerate(pictures):
        stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in (names[i] if names else str(i)))[:60]
        path = out / f"{i:03d}_{stem}.png"
        Image.fromarray(pic.permute(1, 2, 0).numpy()).save(path)
        paths.append(path)
    side = max(max(d.shape[-2] for d in pictures), max(d.shape[-1] for d in pictures))
    padded = [F.pad(d, (0, side - d.shape[-1], 0, side - d.shape[-2])) for d in pictures]
    grid = make_grid(padded, nrow=min(4, len(padded)), padding=4, pad_value=255)
    gpath = out / grid_name
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(gpath)
    paths.append(gpath)
    return paths


def visualize_dense(model: nn.Module, pictures: Callable[..., List[torch.Tensor]], images: Sequence, out_dir,
                    names: Optional[Sequence[str]] = None, class_names: Optional[Sequence[str]] = None,
                    score_thresh: float = 0.3, device="cpu", min_size: Optional[int] = None,
                    grid_name: str = "predictions.png") -> List[Path]:
    """Draw ``model``'s predictions on ``images`` (PIL) with ``pictures`` (:func:`detection_pictures`,
    :func:`segmentation_pictures` or a function of yours with their signature): one PNG per image and a grid
    of all; returns the paths (the grid last)."""
    if not callable(pictures):
        raise LeanvitError(f"visualize_dense takes what to draw as a function (detection_pictures, "
                           f"segmentation_pictures), got {pictures!r}")
    pics = pictures(model, list(images), class_names=class_names, device=device, score_thresh=score_thresh,
                    min_size=min_size)
    return save_pictures(pics, out_dir, names=names, grid_name=grid_name)
