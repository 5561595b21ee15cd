"""Multiply-accumulate counts in the papers' convention.

EViT, DeiT III and the Shunted Transformer report "FLOPs" as multiply-adds of the matrix products and
convolutions, attention matrix products included (DeiT-S at 224 px = 4.6 G). Element-wise ops,
norms and softmax are not counted. The count runs the model once, so a token-reorganizing model is
charged for the tokens it really processes.

``torch.utils.flop_counter.FlopCounterMode`` has no formula for the CPU flash-attention kernel that
``F.scaled_dot_product_attention`` dispatches to here, so one is added.
"""
from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["gmacs", "count_macs"]


def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    # FlopCounterMode passes shapes. q @ k^T and attn @ v: b*h*n_q*n_k*(d + d_v) multiply-adds, 2 flops each
    b, h, n_q, d = tuple(getattr(query, "shape", query))
    n_k = tuple(getattr(key, "shape", key))[-2]
    d_v = tuple(getattr(value, "shape", value))[-1]
    return 2 * b * h * n_q * n_k * (d + d_v)


def _extra_formulas() -> dict:
    aten = torch.ops.aten
    table = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math"):
        op = getattr(aten, name, None)
        if op is not None:
            table[op] = _sdpa_cpu_flops
    return table


def _as_hw(img_size) -> tuple:
    if isinstance(img_size, int):
        return img_size, img_size
    h, w = img_size
    return int(h), int(w)


@torch.no_grad()
def count_macs(model: torch.nn.Module, img_size=224, in_chans: int = 3, **forward_kwargs) -> int:
    """Multiply-adds of one forward pass on a single image of ``img_size`` (int or (H, W))."""
    h, w = _as_hw(img_size)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False, custom_mapping=_extra_formulas())
        with counter:
            model(torch.zeros(1, in_chans, h, w, device=device, dtype=dtype), **forward_kwargs)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def gmacs(model: torch.nn.Module, img_size=224, in_chans: int = 3, **forward_kwargs) -> float:
    """GMACs (10^9 multiply-adds) of one image, as the EViT/DeiT/Shunted papers report "GFLOPs"."""
    return count_macs(model, img_size, in_chans, **forward_kwargs) / 1e9


# ---------------------------------------------------------------------------------------------
# `leanvit flops`
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="registered model name, e.g. evit_deit_small_patch16_224 or shunted_t")
    p.add_argument("--keep-rate", type=float, default=None, help="EViT keep rate (applies EViT to a plain ViT)")
    p.add_argument("--img-size", type=int, nargs="+", default=None, help="input size: S or H W")
    p.add_argument("--num-classes", type=int, default=None)


def run(args) -> int:
    from leanvit.factory import create_model, model_input_size

    img_size = None if args.img_size is None else (
        args.img_size[0] if len(args.img_size) == 1 else tuple(args.img_size[:2]))
    model = create_model(args.model, keep_rate=args.keep_rate, img_size=img_size,
                         num_classes=args.num_classes)
    hw = model_input_size(model, img_size)
    n_params = sum(p.numel() for p in model.parameters())
    g = gmacs(model, hw)
    extra = f" keep_rate={args.keep_rate}" if args.keep_rate is not None else ""
    print(f"{args.model}{extra} img_size={hw[0]}x{hw[1]}: {g:.2f} GMACs, {n_params / 1e6:.2f}M params")
    return 0
