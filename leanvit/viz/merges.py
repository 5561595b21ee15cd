"""Which patches ToMe merged together: the picture of the ToMe paper.

For each image, one row "input | after layer L1 | after layer L2 | ...": every group of patches merged
into one token is painted in one colour (the group's mean colour blended with a colour of its own) and
outlined; patches still a token of their own are shown unchanged. Column titles give the tokens left.

Python::

    from leanvit.viz import merge_groups, render_merged_tokens, visualize_merges
    logits, groups = merge_groups(model, x)             # per shown block: (B, grid_h, grid_w) group ids
    render_merged_tokens(model, [Image.open("cat.jpg")], "out/merged.png", r=8)

Command line: ``leanvit viz`` draws these for a ToMe model (``--reduction tome:8`` or a ToMe checkpoint).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from leanvit.errors import LeanvitError
from leanvit.reduction.tome import is_tome, per_layer_r, tokens_per_block
from leanvit.utils import model_input_size
from leanvit.viz.common import (
    as_images,
    default_names,
    draw_rows,
    normalize_params,
    palette,
    patch_grid,
    run_eval,
    viz_transform,
    write_rows,
)

__all__ = ["shown_blocks", "merge_groups", "paint_groups", "render_merged_tokens", "visualize_merges",
           "merged_token_rows"]


def shown_blocks(depth: int) -> List[int]:
    """0-indexed blocks whose groups are drawn: after each quarter of the depth and after the last."""
    return sorted({max(0, depth * q // 4 - 1) for q in (1, 2, 3, 4)})


@torch.inference_mode()
def merge_groups(model: nn.Module, x: torch.Tensor, r=None, blocks: Optional[Sequence[int]] = None
                 ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Logits and, per block in ``blocks`` (default :func:`shown_blocks`), a (B, grid_h, grid_w) long
    tensor: the token each patch belongs to after that block (equal ids = merged together)."""
    if not is_tome(model):
        raise LeanvitError(f"{type(model).__name__} does not merge tokens: apply ToMe first "
                           "(leanvit.apply_reduction(model, 'tome', r=8) or `reduction` tome:8)")
    blocks = shown_blocks(len(model.blocks)) if blocks is None else list(blocks)
    logits, groups = model(x, r=r, return_groups=True)
    _, (gh, gw) = patch_grid(model)
    return logits, [groups[i].reshape(-1, gh, gw) for i in blocks]


def paint_groups(images: torch.Tensor, groups: torch.Tensor, patch_size: Tuple[int, int]) -> torch.Tensor:
    """``images`` (B, 3, H, W) in [0, 1] with every merged group (2+ patches with one id in ``groups``,
    (B, gh, gw)) filled with its mean colour blended half-half with a colour of its own, outlined in black.
    Patches alone in their group are left as they are; pixels beyond the last whole patch are black."""
    ph, pw = patch_size
    B, C, H, W = images.shape
    gh, gw = groups.shape[-2:]
    labels = groups.repeat_interleave(ph, dim=1).repeat_interleave(pw, dim=2)  # (B, gh*ph, gw*pw)
    hh, ww = min(H, gh * ph), min(W, gw * pw)
    img = torch.zeros_like(images)
    img[:, :, :hh, :ww] = images[:, :, :hh, :ww]
    labels = labels[:, :hh, :ww]
    n = int(groups.max()) + 1
    flat = labels.reshape(B, -1)
    pix = img[:, :, :hh, :ww].reshape(B, C, -1)
    sums = torch.zeros(B, C, n).scatter_add_(2, flat.unsqueeze(1).expand(-1, C, -1), pix)
    counts = torch.zeros(B, n).scatter_add_(1, groups.reshape(B, -1), torch.ones(B, gh * gw))
    mean = sums / (counts * ph * pw).clamp_min(1).unsqueeze(1)
    colour = 0.5 * mean + 0.5 * torch.tensor(palette(n, value=0.95)).T.unsqueeze(0)          # (B, C, n)
    painted = colour.gather(2, flat.unsqueeze(1).expand(-1, C, -1)).reshape(B, C, hh, ww)
    merged = (counts.gather(1, flat) > 1).reshape(B, 1, hh, ww)
    out = img.clone()
    out[:, :, :hh, :ww] = torch.where(merged, painted, img[:, :, :hh, :ww])
    m = merged[:, 0]
    edge = torch.zeros(B, hh, ww, dtype=torch.bool)  # borders between groups, where a merged group is
    edge[:, :, 1:] |= (labels[:, :, 1:] != labels[:, :, :-1]) & (m[:, :, 1:] | m[:, :, :-1])
    edge[:, 1:, :] |= (labels[:, 1:, :] != labels[:, :-1, :]) & (m[:, 1:, :] | m[:, :-1, :])
    out[:, :, :hh, :ww] = torch.where(edge.unsqueeze(1), torch.zeros_like(painted), out[:, :, :hh, :ww])
    return out


@torch.inference_mode()
def merged_token_rows(model, images, names, transform, r, class_names, batch_size, device):
    if batch_size < 1:
        raise LeanvitError(f"batch_size must be >= 1, got {batch_size}")
    param = next(model.parameters(), None)
    device = torch.device(device) if device is not None else (param.device if param is not None
                                                              else torch.device("cpu"))
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    if transform is None:
        transform = viz_transform(model_input_size(model), model)
    patch, (gh, gw) = patch_grid(model)
    mean, std = normalize_params(transform)
    blocks = shown_blocks(len(model.blocks))
    rows = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(im) for im in images[start:start + batch_size]])
        logits, groups = merge_groups(model, batch.to(device=device, dtype=dtype), r, blocks)
        shown = (batch * std + mean).clamp(0, 1)
        panels = [paint_groups(shown, g.cpu(), patch) for g in groups]
        probs = logits.float().softmax(-1).cpu()
        for b in range(batch.shape[0]):
            label = names[start + b]
            if class_names is not None and len(class_names) == probs.shape[-1]:
                p, c = probs[b].max(0)
                label += f"\npred {class_names[int(c)]} ({100 * float(p):.0f}%)"
            rows.append(dict(images=[t[b].permute(1, 2, 0).numpy() for t in [shown] + panels], label=label))
    rs = model.r_per_block if r is None else per_layer_r(r, len(model.blocks), model.tome_schedule)
    counts = tokens_per_block(gh * gw, rs)
    titles = ["input"] + [f"after layer {i + 1}\n{counts[i + 1]} of {gh * gw} tokens" for i in blocks]
    return rows, titles


def render_merged_tokens(model: nn.Module, images: Sequence, path, names: Optional[Sequence[str]] = None,
                         r=None, class_names: Optional[Sequence[str]] = None, transform: Optional[Callable] = None,
                         batch_size: int = 16, device=None) -> Path:
    """Draw which patches a ToMe ``model`` merged for ``images`` into one PNG grid at ``path`` (arguments as
    :func:`leanvit.viz.tokens.render_kept_tokens`; ``r``: merge schedule of this pass, default the model's)."""
    names = default_names(images, names)
    images = as_images(images)
    rows, titles = run_eval(model, lambda: merged_token_rows(model, images, names, transform, r, class_names,
                                                  batch_size, device))
    return draw_rows(rows, titles, path)


def visualize_merges(model: nn.Module, images: Sequence, output_dir, names: Optional[Sequence[str]] = None,
                     r=None, class_names: Optional[Sequence[str]] = None, transform: Optional[Callable] = None,
                     batch_size: int = 16, device=None, grid_name: str = "merged_tokens.png",
                     per_image: bool = True) -> List[Path]:
    """Like :func:`render_merged_tokens`, into the folder ``output_dir``: one PNG per image (``NNN_<name>.png``)
    and the grid (``grid_name``), last in the returned list."""
    names = default_names(images, names)
    images = as_images(images)
    rows, titles = run_eval(model, lambda: merged_token_rows(model, images, names, transform, r, class_names,
                                                  batch_size, device))
    return write_rows(rows, titles, names, output_dir, grid_name, per_image)
