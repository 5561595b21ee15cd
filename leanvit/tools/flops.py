"""``leanvit flops``: GMACs of a model in the papers' convention (library: :func:`leanvit.measure.gmacs`).

    leanvit flops evit_deit_small_patch16_224 --keep-rate 0.5 --img-size 304
"""
from __future__ import annotations

import argparse

from leanvit.measure import gmacs
from leanvit.models.factory import create_model
from leanvit.tools._common import reduction_from_args
from leanvit.utils import check_input_size, img_size_arg, model_input_size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="registered model name, e.g. evit_deit_small_patch16_224 or shunted_t")
    p.add_argument("--reduction", default=None, metavar="METHOD:VALUE", help="token reduction, e.g. evit:0.7")
    p.add_argument("--keep-rate", type=float, default=None, help="EViT keep rate (applies EViT to a plain ViT)")
    p.add_argument("--img-size", type=int, nargs="+", default=None, help="input size: S or H W")
    p.add_argument("--num-classes", type=int, default=None)


def run(args) -> int:
    img_size = img_size_arg(args.img_size)
    reduction = reduction_from_args(args)
    model = create_model(args.model, reduction=reduction, img_size=img_size, num_classes=args.num_classes)
    hw = model_input_size(model, img_size)
    check_input_size(model, hw)
    n_params = sum(p.numel() for p in model.parameters())
    g = gmacs(model, hw)
    extra = f" keep_rate={args.keep_rate}" if args.keep_rate is not None else ""
    if reduction and args.keep_rate is None:
        extra = f" reduction={args.reduction}"
    print(f"{args.model}{extra} img_size={hw[0]}x{hw[1]}: {g:.2f} GMACs, {n_params / 1e6:.2f}M params")
    return 0
