"""Multiply-accumulate counts in the papers' convention.

EViT, DeiT III and the Shunted Transformer report "FLOPs" as multiply-adds of the matrix products and
convolutions, attention matrix products included (DeiT-S at 224 px = 4.6 G). Element-wise ops,
norms and softmax are not counted. The count runs the model once, so a token-reorganizing model is
charged for the tokens it really processes.

``torch.utils.flop_counter.FlopCounterMode`` has no formula for the CPU flash-attention kernel that
``F.scaled_dot_product_attention`` dispatches to here, so one is added.
"""
from __future__ import annotations

import torch
from timm.layers import to_2tuple
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


@torch.no_grad()
def count_macs(model: torch.nn.Module, img_size=224, in_chans: int = 3, example=None, **forward_kwargs) -> int:
    """Multiply-adds of one forward pass on a single image of ``img_size`` (int or (H, W)); ``example``: the
    input to use instead (e.g. a list of one image for a torchvision detector)."""
    h, w = to_2tuple(img_size)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False, custom_mapping=_extra_formulas())
        with counter:
            if example is None:
                example = torch.zeros(1, in_chans, h, w, device=device, dtype=dtype)
            elif isinstance(example, (list, tuple)):
                example = [t.to(device=device, dtype=dtype) for t in example]
            else:
                example = example.to(device=device, dtype=dtype)
            model(example, **forward_kwargs)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def gmacs(model: torch.nn.Module, img_size=224, in_chans: int = 3, example=None, **forward_kwargs) -> float:
    """GMACs (10^9 multiply-adds) of one image, as the EViT/DeiT/Shunted papers report "GFLOPs"."""
    return count_macs(model, img_size, in_chans, example, **forward_kwargs) / 1e9
