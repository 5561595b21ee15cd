"""``leanvit flops``: GMACs of a model in the papers' convention (library: :func:`leanvit.measure.gmacs`).

    leanvit flops evit_deit_small_patch16_224 --keep-rate 0.5 --img-size 304
"""
from __future__ import annotations

import argparse

from leanvit.measure import gmacs
from leanvit.models.build import build_model
from leanvit.reduction import applied_reduction
from leanvit.tools._common import reduction_from_args
from leanvit.utils import img_size_arg


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="registered model name, e.g. evit_deit_small_patch16_224 or shunted_t")
    p.add_argument("--reduction", default=None, metavar="METHOD:VALUE",
                   help="token reduction, e.g. evit:0.7; none (or off, -): none, even on an evit_* model")
    p.add_argument("--keep-rate", type=float, default=None, help="EViT keep rate (applies EViT to a plain ViT)")
    p.add_argument("--img-size", type=int, nargs="+", default=None, help="input size: S or H W")
    p.add_argument("--num-classes", type=int, default=None)


def run(args) -> int:
    built = build_model(args.model, None, reduction_from_args(args), img_size_arg(args.img_size), args.num_classes)
    model, hw = built.model, built.img_size
    n_params = sum(p.numel() for p in model.parameters())
    g = gmacs(model, hw)
    method = applied_reduction(model)  # what was measured: the model's own reduction, another, or none
    shown = (f" {method.name} {method.knob}={method.format_strength(method.get_strength(model))}" if method
             else " (no token reduction)")
    print(f"{args.model}{shown} img_size={hw[0]}x{hw[1]}: {g:.2f} GMACs, {n_params / 1e6:.2f}M params")
    return 0
