"""Which tokens EViT kept: the masked-image figure of the EViT paper.

For each image, one row "input | after layer 4 | after layer 7 | after layer 10" (the labels follow the
model's own reorganizing blocks, numbered from 1: blocks 3, 6, 9 of a 12-block ViT): the patches whose
tokens were removed or fused into the fused token are black; the kept patches are shown unchanged. The
fused token itself is not drawn (as in the paper). Column titles give the tokens each block keeps.

Python::

    from leanvit.viz import render_kept_tokens, visualize
    png = render_kept_tokens(model, [Image.open("cat.jpg"), "dog.png"], "out/kept.png")   # one grid
    paths = visualize(model, images, "out/", names=["cat", "dog"])   # one PNG per image + the grid

Command line::

    leanvit viz --model evit_deit_small_patch16_224 --checkpoint evit.pth --images a.jpg b.png --output viz/
    leanvit viz --checkpoint runs/evit_demo/best.pth --data digits --num-images 8 --output viz/

Writes one PNG per image (``NNN_<name>.png``) and all rows in one grid, ``kept_tokens.png``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from leanvit.errors import LeanvitError
from leanvit.reduction.pruning import is_pruning, per_layer_keep_rates
from leanvit.reduction.reorg import kept_token_masks, num_kept
from leanvit.utils import model_input_size
from leanvit.viz.common import (
    as_images,
    default_names,
    draw_rows,
    normalize_params,
    patch_grid,
    run_eval,
    viz_transform,
    write_rows,
)

__all__ = ["kept_masks", "mask_patches", "visualize", "render_kept_tokens", "token_counts", "kept_token_rows"]

@torch.inference_mode()
def kept_masks(model: nn.Module, x: torch.Tensor, keep_rate=None) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Logits and, per reorganizing block, a (B, grid_h, grid_w) bool mask of the patches still kept."""
    if not is_pruning(model):
        raise LeanvitError(f"{type(model).__name__} does not reorganize tokens: use an EViT model "
                           "(evit_*) or give a keep rate to apply EViT to a plain ViT")
    logits, kept = model(x, keep_rate=keep_rate, return_kept_indices=True)
    _, (gh, gw) = patch_grid(model)
    masks = kept_token_masks(kept, gh * gw)
    return logits, [m.reshape(m.shape[0], gh, gw) for m in masks]


def mask_patches(images: torch.Tensor, mask: torch.Tensor, patch_size: Tuple[int, int]) -> torch.Tensor:
    """``images`` (B, C, H, W) with the patches where ``mask`` (B, gh, gw) is False set to 0 (black)."""
    ph, pw = patch_size
    h, w = images.shape[-2:]
    m = mask.to(images.dtype).repeat_interleave(ph, dim=1).repeat_interleave(pw, dim=2)[:, :h, :w]
    # pixels beyond the last whole patch (size not a multiple of the patch) are no token: black too
    m = torch.nn.functional.pad(m, (0, w - m.shape[2], 0, h - m.shape[1]))
    return images * m[:, None]


@torch.inference_mode()
def kept_token_rows(model: nn.Module, images, names, transform, keep_rate, class_names, batch_size, device):
    """The panels of every image and the column titles."""
    if not is_pruning(model):
        raise LeanvitError(f"{type(model).__name__} does not reorganize tokens: use an EViT model "
                           "(evit_*) or apply_evit(model) / a keep rate to a plain ViT")
    if batch_size < 1:
        raise LeanvitError(f"batch_size must be >= 1, got {batch_size}")
    param = next(model.parameters(), None)
    device = torch.device(device) if device is not None else (param.device if param is not None else
                                                              torch.device("cpu"))
    if transform is None:
        transform = viz_transform(model_input_size(model), model)
    patch, _ = patch_grid(model)
    mean, std = normalize_params(transform)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    rows = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(im) for im in images[start:start + batch_size]])
        logits, masks = kept_masks(model, batch.to(device=device, dtype=dtype), keep_rate)
        shown = (batch * std + mean).clamp(0, 1)
        layers = [mask_patches(shown, m.cpu(), patch) for m in masks]
        probs = logits.float().softmax(-1).cpu()
        for b in range(batch.shape[0]):
            k = start + b
            label = names[k]
            if class_names is not None and len(class_names) == probs.shape[-1]:
                p, c = probs[b].max(0)
                label += f"\npred {class_names[int(c)]} ({100 * float(p):.0f}%)"
            rows.append(dict(images=[t[b].permute(1, 2, 0).numpy() for t in [shown] + layers], label=label))
    titles = ["input"] + [f"after layer {loc + 1}\nkeeps {k} of {n} tokens"
                          for loc, (k, n) in zip(model.evit_locations, token_counts(model, keep_rate))]
    return rows, titles


def token_counts(model: nn.Module, keep_rate=None) -> List[Tuple[int, int]]:
    """(kept, incoming) non-class tokens at each reorganizing block, the same for every image.

    The fused token of one block takes part in the next block's selection like any token, so how many
    *patches* stay visible can differ by one between images; the token counts cannot."""
    locs = list(model.evit_locations)
    rates = (per_layer_keep_rates(keep_rate, len(locs)) if keep_rate is not None
             else [model.blocks[i].keep_rate for i in locs])
    _, (gh, gw) = patch_grid(model)
    n, out = gh * gw, []
    for r in rates:
        k = num_kept(r, n)
        out.append((k, n))
        n = k + 1 if (model.fuse and k < n) else k
    return out


def render_kept_tokens(model: nn.Module, images: Sequence, path, names: Optional[Sequence[str]] = None,
                       keep_rate=None, class_names: Optional[Sequence[str]] = None,
                       transform: Optional[Callable] = None, batch_size: int = 16, device=None) -> Path:
    """Draw which tokens an EViT ``model`` kept for ``images`` into one PNG grid at ``path``.

    One row per image: "input | after layer L1 | after layer L2 | ..." (1-based layers of the model's
    reorganizing blocks, e.g. 4 / 7 / 10 for 12 blocks); removed and fused patches are black.

    Args:
        images: PIL images and/or image file paths.
        names: row labels (default: file names, or "image i").
        keep_rate: keep rate of this pass (default: the model's own).
        class_names: with them, each row also shows the predicted class and its probability.
        transform: PIL image -> normalized input tensor (default: the evaluation transform at the model's
            input size with its normalization; a Normalize step in it is undone for display).
        device: default: where the model's parameters are (the model is not moved then).
    Returns ``path``. The model's training mode is restored afterwards."""
    names = default_names(images, names)
    images = as_images(images)
    rows, titles = run_eval(model, lambda: kept_token_rows(model, images, names, transform, keep_rate, class_names,
                                                  batch_size, device))
    return draw_rows(rows, titles, path)


def visualize(model: nn.Module, images: Sequence, output_dir, names: Optional[Sequence[str]] = None,
              keep_rate=None, class_names: Optional[Sequence[str]] = None, transform: Optional[Callable] = None,
              batch_size: int = 16, device=None, grid_name: str = "kept_tokens.png",
              per_image: bool = True) -> List[Path]:
    """Like :func:`render_kept_tokens`, into the folder ``output_dir``: one PNG per image
    (``NNN_<name>.png``, if ``per_image``) and the grid of all rows (``grid_name``), which is last in the
    returned list of paths."""
    names = default_names(images, names)
    images = as_images(images)
    rows, titles = run_eval(model, lambda: kept_token_rows(model, images, names, transform, keep_rate, class_names,
                                                  batch_size, device))
    return write_rows(rows, titles, names, output_dir, grid_name, per_image)
