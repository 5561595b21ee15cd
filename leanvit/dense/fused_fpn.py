"""The finest level of a Semantic FPN at inference, with two convolutions composed into one.

At the finest stride the Semantic FPN computes (torchvision's ``FeaturePyramidNetwork``, then the semantic
branch of Panoptic FPN)::

    M = lateral_1x1(x) + nearest_2x(top_down)        # (B, C_fpn, H, W)
    F = conv3x3(M) + b                               # the FPN's output convolution
    O = conv3x3(F)                                   # the branch's convolution (no bias), then norm + ReLU

Nothing non-linear lies between the three convolutions, so away from the image border ``O`` is one 5x5
convolution of ``x`` (C_x channels: 96 for DeiT III-S, against the FPN's 256) plus one 3x3 convolution of
``top_down`` at half the resolution (nearest 2x upsampling followed by a 5x5 convolution is, for each of the
four output phases, a 3x3 convolution of the coarse map: the phases are rearranged by pixel shuffle), plus a
constant. At 512x512 with DeiT III-S that is 9.8 instead of 14.9 GMACs and no 256-channel map at stride 4.
At the border the composition differs from the published computation, where ``F`` is zero-padded before the
second convolution: the outer two rows and columns of ``O`` are corrected (the biases' share there from a
5x5 canvas computed once, the padding of ``F`` from the outer row and column of ``M``). Outputs are
those of the step-by-step head up to floating-point rounding (tests); only inference (no autograd) takes
this path, training keeps the published order of operations.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["compose_convs", "nearest2x_phase_kernels", "FusedFinestLevel"]


def compose_convs(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """The kernel of ``conv(conv(x, inner), outer)`` (stride 1, zero padding ignored): (O, C, ko+ki-1, ...)."""
    o, m, ka, kb = outer.shape
    _, c, kc, kd = inner.shape
    out = outer.new_zeros(o, c, ka + kc - 1, kb + kd - 1)
    for a in range(ka):
        for b in range(kb):
            out[:, :, a:a + kc, b:b + kd] += torch.einsum("om,mcuv->ocuv", outer[:, :, a, b], inner)
    return out


def nearest2x_phase_kernels(weight: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """``conv(nearest_2x(t), weight, padding=k // 2)`` as ``pixel_shuffle(conv(t, W, padding=p), 2)``: returns
    (W, p); W has 4 O channels (output channel o, phase (i, j) at o * 4 + i * 2 + j, pixel shuffle's order)."""
    o, c, k, k2 = weight.shape
    if k != k2 or k % 2 == 0:
        raise ValueError(f"need a square kernel of odd size, got {k}x{k2}")
    p = k // 2
    reach = (p + 1) // 2  # coarse offsets a tap reaches, over both phases: -reach .. reach
    lo, size = -reach, 2 * reach + 1
    out = weight.new_zeros(o, 2, 2, c, size, size)
    for i in range(2):
        for j in range(2):
            for sy in range(k):
                for sx in range(k):
                    out[:, i, j, :, (i + sy - p) // 2 - lo, (j + sx - p) // 2 - lo] += weight[:, :, sy, sx]
    return out.reshape(4 * o, c, size, size), reach


class FusedFinestLevel:
    """Computes the pre-norm output of the finest branch's convolution from the finest input map and the
    top-down map of the next level, as described in the module docstring. Not a module: it holds no
    parameters, only the kernels composed from the FPN's and the branch's, re-derived when those change."""

    def __init__(self, lateral: nn.Conv2d, output: nn.Conv2d, branch: nn.Conv2d):
        self._convs = (lateral, output, branch)  # the head's own modules (their parameters stay theirs)
        self._cache: Optional[tuple] = None

    @staticmethod
    def applies(lateral: nn.Module, output: nn.Module, branch: nn.Module) -> bool:
        convs = (lateral, output, branch)
        return (all(type(m) is nn.Conv2d for m in convs)
                and all(m.stride == (1, 1) and m.dilation == (1, 1) and m.groups == 1 for m in convs)
                and lateral.kernel_size == (1, 1) and output.kernel_size == (3, 3) and branch.kernel_size == (3, 3)
                and output.padding == (1, 1) and branch.padding == (1, 1) and lateral.padding == (0, 0)
                and branch.bias is None and lateral.bias is not None and output.bias is not None
                and all(m.padding_mode == "zeros" for m in convs)
                and FusedFinestLevel.macs_ratio(lateral, output, branch) < 0.85)

    @staticmethod
    def macs_ratio(lateral: nn.Conv2d, output: nn.Conv2d, branch: nn.Conv2d) -> float:
        """Multiply-adds per output pixel, composed over step by step: it pays when the input map has fewer
        channels than the FPN (DeiT III-S: 96 against 256, 0.66); with as many (a width-64 FPN over 64-channel
        maps) the 5x5 kernel costs more than the two 3x3 ones (1.78) and the published path is kept."""
        c_x, c_fpn, c_out = lateral.in_channels, output.out_channels, branch.out_channels
        composed = 25 * c_x * c_out + 9 * c_fpn * c_out
        return composed / (c_x * c_fpn + 9 * c_fpn * c_fpn + 9 * c_fpn * c_out)

    def _kernels(self) -> tuple:
        lateral, output, branch = self._convs
        params = (lateral.weight, lateral.bias, output.weight, output.bias, branch.weight)
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                both = compose_convs(branch.weight, output.weight)                       # (O, C_fpn, 5, 5)
                from_x = torch.einsum("ocuv,cd->oduv", both, lateral.weight[:, :, 0, 0])  # (O, C_x, 5, 5)
                from_top, pad = nearest2x_phase_kernels(both)
                const = both.sum((2, 3)) @ lateral.bias + branch.weight.sum((2, 3)) @ output.bias
                # the biases' share near the border: the step-by-step computation of a bias-only map on a
                # 5x5 canvas (its rows / columns 0-1 and 3-4 are what any map's outer two have), minus const
                canvas = lateral.bias.view(1, -1, 1, 1).expand(1, -1, 5, 5)
                border = F.conv2d(F.conv2d(canvas, output.weight, output.bias, padding=1), branch.weight, padding=1)
                border = border - const.view(1, -1, 1, 1)
            self._cache = (key, from_x.contiguous(), from_top.contiguous(), pad, const.view(1, -1, 1, 1), border)
        return self._cache[1:]

    def __call__(self, x: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        lateral, output, branch = self._convs
        from_x, from_top, pad, const, border = self._kernels()
        out = F.conv2d(x, from_x, padding=from_x.shape[-1] // 2)
        out += F.pixel_shuffle(F.conv2d(top, from_top, padding=pad), 2)
        out += const.to(out.dtype)
        h, w = out.shape[-2:]
        # 1. the biases near the border (computed once, see _kernels)
        border = border.to(out.dtype)
        cols = torch.tensor([0, 1] + [2] * (w - 4) + [3, 4], device=out.device)
        out[:, :, :2] += border[:, :, :2].index_select(3, cols)
        out[:, :, h - 2:] += border[:, :, 3:].index_select(3, cols)
        out[:, :, 2:h - 2, :2] += border[:, :, 2:3, :2]
        out[:, :, 2:h - 2, w - 2:] += border[:, :, 2:3, 3:]
        # 2. the zero padding of F: the composed kernel also counts F just outside the map (computed from the
        # bias-free M of the outer row / column), which the step-by-step computation pads with zeros. The
        # corners of that ring belong to the rows; the column terms cover the rows inside the map.
        lw = lateral.weight
        w1, w2 = output.weight, branch.weight
        for row, k1, k2 in ((0, 2, 0), (h - 1, 0, 2)):
            up = top[:, :, row // 2:row // 2 + 1].repeat_interleave(2, dim=3)  # nearest 2x of the row
            m = F.conv2d(x[:, :, row:row + 1], lw) + up
            f = F.conv2d(m, w1[:, :, k1:k1 + 1], padding=(0, 2))          # F at row -1 / h, columns -1..w
            out[:, :, row:row + 1] -= F.conv2d(f, w2[:, :, k2:k2 + 1])
        for col, k1, k2 in ((0, 2, 0), (w - 1, 0, 2)):
            up = top[:, :, :, col // 2:col // 2 + 1].repeat_interleave(2, dim=2)
            m = F.conv2d(x[:, :, :, col:col + 1], lw) + up
            f = F.conv2d(m, w1[:, :, :, k1:k1 + 1], padding=(1, 0))        # F at column -1 / w, rows 0..h-1
            out[:, :, :, col:col + 1] -= F.conv2d(f, w2[:, :, :, k2:k2 + 1], padding=(1, 0))
        return out
