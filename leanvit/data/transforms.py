"""Image transforms: DeiT III's 3-Augment, simple random crop, RandomResizedCrop, evaluation.

The DeiT III training transform (Touvron et al., ECCV 2022, "3-Augment"; facebookresearch/deit
`augment.py`, `new_data_aug_generator`) is, in order:

1. a primary crop: RandomResizedCrop (``"rrc"``, scale (0.08, 1), ratio (3/4, 4/3), bicubic) for
   ImageNet-1k pre-training, or the *simple random crop* (``"src"``: resize the shorter side to the size,
   then a random square crop with a 4 px reflect padding) for ImageNet-21k and the 21k->1k fine-tune;
   then a horizontal flip with p = 0.5;
2. exactly one of grayscale / solarization (threshold 128) / Gaussian blur (radius ~ U(0.1, 2)),
   chosen uniformly;
3. colour jitter (brightness = contrast = saturation = 0.3, no hue);
4. to tensor and normalize.

Step 2 reuses timm's AutoAugment policy ``'3a'`` (``timm.data.auto_augment_transform``), checked against
the reference: ``Solarize`` at magnitude 5 is ``ImageOps.solarize`` with threshold int(5/10 x 256) = 128
(same as the reference's PIL default); ``Desaturate`` at magnitude 10 is ``ImageEnhance.Color(0)``,
i.e. PIL's ``convert('L')`` luma copied to 3 channels, the same pixels as the reference's
``transforms.Grayscale(3)``; ``GaussianBlurRand`` at magnitude 10 is ``ImageFilter.GaussianBlur`` with
radius ~ U(0.1, 2.0), as in the reference; the sub-policy is picked with ``random.choice``, uniformly,
each op applied with p = 1. Like the reference, these ops draw from Python's ``random`` module.
The difference from the reference: none in behaviour; timm's colour jitter is torchvision's
``ColorJitter`` as in the reference (the engine seeds ``random`` and torch per epoch for reproducible runs).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from timm.data import create_transform
from timm.data.auto_augment import auto_augment_transform, rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from timm.layers import to_2tuple
from torchvision import transforms as T

from leanvit.errors import LeanvitError

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "three_augment_ops", "SimpleRandomCrop", "build_train_transform",
    "build_eval_transform", "CROP_MODES",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_MODES = ("rrc", "src", "none")

Size = Union[int, Tuple[int, int]]


def _interp(name: str) -> T.InterpolationMode:
    try:
        return T.InterpolationMode(name)
    except ValueError:
        raise LeanvitError(f"unknown interpolation '{name}' (use bicubic, bilinear or nearest)") from None


def three_augment_ops():
    """Exactly one of grayscale / solarize(128) / Gaussian blur (radius U(0.1, 2)), chosen uniformly.

    timm's AutoAugment policy ``'3a'`` (see the module docstring for the check against the reference)."""
    return auto_augment_transform("3a", {"img_mean": tuple(round(255 * m) for m in IMAGENET_MEAN)})


class SimpleRandomCrop(torch.nn.Module):
    """DeiT III's simple random crop (SRC): resize the shorter side to ``size`` (keeping the aspect),
    then a random ``size`` x ``size`` crop of the image reflect-padded by ``padding`` px on every side.

    timm has no exact equivalent (its ``rkrr`` mode rescales randomly), hence this small class."""

    def __init__(self, size: Size, padding: int = 4, interpolation: str = "bicubic"):
        super().__init__()
        self.size = to_2tuple(size)
        self.padding = int(padding)
        self.resize = T.Resize(min(self.size), interpolation=_interp(interpolation), antialias=True)
        self.crop = T.RandomCrop(self.size, padding=self.padding or None, padding_mode="reflect",
                                 pad_if_needed=True)

    def forward(self, img):
        return self.crop(self.resize(img))

    def __repr__(self) -> str:
        return f"SimpleRandomCrop(size={self.size}, padding={self.padding}, padding_mode=reflect)"


def build_train_transform(img_size: Size, crop: str = "rrc", scale: Sequence[float] = (0.08, 1.0),
                          ratio: Sequence[float] = (3 / 4, 4 / 3), src_padding: int = 4, hflip: float = 0.5,
                          three_augment: bool = True, color_jitter: float = 0.3,
                          interpolation: str = "bicubic", mean: Sequence[float] = IMAGENET_MEAN,
                          std: Sequence[float] = IMAGENET_STD, auto_augment: Optional[str] = None,
                          reprob: float = 0.0) -> T.Compose:
    """The DeiT III training transform (see the module docstring); each piece can be switched off.

    ``crop``: ``"rrc"`` (RandomResizedCrop), ``"src"`` (simple random crop) or ``"none"`` (resize only,
    for data already at the training size).
    ``auto_augment``: a timm RandAugment/AutoAugment policy (e.g. ``"rand-m9-mstd0.5-inc1"``, the DeiT /
    EViT / Shunted and DeiT III fine-tune recipes) used *instead of* 3-Augment and colour jitter, as in
    timm's ``create_transform``; ``reprob``: timm RandomErasing probability (pixel mode) after normalizing."""
    size = to_2tuple(img_size)
    ops = []
    if crop == "rrc":
        ops.append(RandomResizedCropAndInterpolation(size, scale=tuple(scale), ratio=tuple(ratio),
                                                     interpolation=interpolation))
    elif crop == "src":
        ops.append(SimpleRandomCrop(size, padding=src_padding, interpolation=interpolation))
    elif crop == "none":
        ops.append(T.Resize(size, interpolation=_interp(interpolation), antialias=True))
    else:
        raise LeanvitError(f"unknown crop mode '{crop}' (use one of {', '.join(CROP_MODES)})")
    if hflip > 0:
        ops.append(T.RandomHorizontalFlip(p=hflip))
    if auto_augment:
        hparams = {"img_mean": tuple(round(255 * m) for m in mean), "translate_const": int(min(size) * 0.45)}
        try:
            if auto_augment.startswith("rand"):
                ops.append(rand_augment_transform(auto_augment, hparams))
            else:
                ops.append(auto_augment_transform(auto_augment, hparams))
        except (AssertionError, KeyError, ValueError) as e:
            raise LeanvitError(f"unknown auto_augment policy '{auto_augment}' ({e})") from None
    else:
        if three_augment:
            ops.append(three_augment_ops())
        if color_jitter:
            cj = float(color_jitter)
            ops.append(T.ColorJitter(brightness=cj, contrast=cj, saturation=cj))
    ops += [T.ToTensor(), T.Normalize(mean=tuple(mean), std=tuple(std))]
    if reprob:
        ops.append(RandomErasing(float(reprob), mode="pixel", device="cpu"))
    return T.Compose(ops)


def build_eval_transform(img_size: Size, crop_ratio: float = 1.0, interpolation: str = "bicubic",
                         mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
    """timm's evaluation transform: resize to ``floor(size / crop_ratio)``, centre-crop ``size``, normalize
    (DeiT III: ratio 1.0; DeiT: 0.875)."""
    if not 0 < crop_ratio <= 1:
        raise LeanvitError(f"eval crop ratio must be in (0, 1], got {crop_ratio}")
    _interp(interpolation)  # a clear error for an unknown name
    return create_transform(input_size=tuple(to_2tuple(img_size)), is_training=False, crop_pct=crop_ratio,
                            interpolation=interpolation, mean=tuple(mean), std=tuple(std))
