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

import re
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from PIL import Image
from torchvision import transforms as T

from leanvit.data import build_eval_transform, normalization
from leanvit.data.folder import IMG_EXTENSIONS, load_image
from leanvit.errors import LeanvitError
from leanvit.reduction.evit import is_evit, kept_token_masks, per_layer_keep_rates
from leanvit.reduction.reorg import num_kept
from leanvit.runtime import model_input_size, to_2tuple

__all__ = ["kept_masks", "mask_patches", "visualize", "render_kept_tokens", "draw_rows", "token_counts",
           "viz_transform"]

def _patch_grid(model: nn.Module) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    pe = model.patch_embed
    return to_2tuple(pe.patch_size), tuple(pe.grid_size)


@torch.inference_mode()
def kept_masks(model: nn.Module, x: torch.Tensor, keep_rate=None) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Logits and, per reorganizing block, a (B, grid_h, grid_w) bool mask of the patches still kept."""
    if not is_evit(model):
        raise LeanvitError(f"{type(model).__name__} does not reorganize tokens: use an EViT model "
                           "(evit_*) or give a keep rate to apply EViT to a plain ViT")
    logits, kept = model(x, keep_rate=keep_rate, return_kept_indices=True)
    _, (gh, gw) = _patch_grid(model)
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


def _normalize_params(transform) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the Normalize step inside ``transform`` (identity if there is none)."""
    steps = getattr(transform, "transforms", [transform])
    for t in steps:
        if isinstance(t, T.Normalize):
            return torch.as_tensor(t.mean).view(-1, 1, 1), torch.as_tensor(t.std).view(-1, 1, 1)
    return torch.zeros(3, 1, 1), torch.ones(3, 1, 1)


def draw_rows(rows: Sequence[dict], column_titles: Sequence[str], path, panel_inches: float = 1.9) -> Path:
    """Save a grid: one row per dict (``images``: list of HxWx3 arrays in [0, 1], ``label``: str)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_rows, n_cols = len(rows), len(column_titles)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(panel_inches * n_cols + 0.9, panel_inches * n_rows + 0.5),
                             squeeze=False)
    for i, row in enumerate(rows):
        for j, img in enumerate(row["images"]):
            ax = axes[i][j]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(column_titles[j], fontsize=9)
        axes[i][0].set_ylabel(row.get("label", ""), fontsize=8, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _safe_name(name: str) -> str:
    stem = re.sub(r"\.(" + "|".join(s[1:] for s in IMG_EXTENSIONS) + r")$", "", name, flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_")[:60] or "image"


def _as_images(images) -> list:
    out = []
    for im in images:
        if isinstance(im, Image.Image):
            out.append(im.convert("RGB"))
        elif isinstance(im, (str, Path)):
            out.append(load_image(im))
        else:
            raise LeanvitError(f"expected PIL images or image paths, got {type(im).__name__}")
    if not out:
        raise LeanvitError("no images to visualize")
    return out


def _default_names(images, names) -> List[str]:
    if names is not None:
        if len(names) != len(images):
            raise LeanvitError(f"got {len(names)} names for {len(images)} images")
        return [str(n) for n in names]
    return [Path(im).name if isinstance(im, (str, Path)) else f"image {i}" for i, im in enumerate(images)]


@torch.inference_mode()
def _rows(model: nn.Module, images, names, transform, keep_rate, class_names, batch_size, device):
    """The panels of every image and the column titles."""
    if not is_evit(model):
        raise LeanvitError(f"{type(model).__name__} does not reorganize tokens: use an EViT model "
                           "(evit_*) or apply_evit(model) / a keep rate to a plain ViT")
    if batch_size < 1:
        raise LeanvitError(f"batch_size must be >= 1, got {batch_size}")
    param = next(model.parameters(), None)
    device = torch.device(device) if device is not None else (param.device if param is not None else
                                                              torch.device("cpu"))
    if transform is None:
        transform = viz_transform(model_input_size(model), model)
    patch, _ = _patch_grid(model)
    mean, std = _normalize_params(transform)
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
    _, (gh, gw) = _patch_grid(model)
    n, out = gh * gw, []
    for r in rates:
        k = num_kept(r, n)
        out.append((k, n))
        n = k + 1 if (model.fuse and k < n) else k
    return out


def _run_eval(model: nn.Module, fn):
    """``fn()`` with ``model`` in eval mode; its training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        return fn()
    finally:
        model.train(was_training)


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
    names = _default_names(images, names)
    images = _as_images(images)
    rows, titles = _run_eval(model, lambda: _rows(model, images, names, transform, keep_rate, class_names,
                                                  batch_size, device))
    return draw_rows(rows, titles, path)


def visualize(model: nn.Module, images: Sequence, output_dir, names: Optional[Sequence[str]] = None,
              keep_rate=None, class_names: Optional[Sequence[str]] = None, transform: Optional[Callable] = None,
              batch_size: int = 16, device=None, grid_name: str = "kept_tokens.png",
              per_image: bool = True) -> List[Path]:
    """Like :func:`render_kept_tokens`, into the folder ``output_dir``: one PNG per image
    (``NNN_<name>.png``, if ``per_image``) and the grid of all rows (``grid_name``), which is last in the
    returned list of paths."""
    names = _default_names(images, names)
    images = _as_images(images)
    rows, titles = _run_eval(model, lambda: _rows(model, images, names, transform, keep_rate, class_names,
                                                  batch_size, device))
    return write_rows(rows, titles, names, output_dir, grid_name, per_image)


def write_rows(rows, titles, names: Sequence[str], output_dir, grid_name: str, per_image: bool = True
               ) -> List[Path]:
    """Picture rows into the folder ``output_dir``: one PNG per row (``NNN_<name>.png``, if ``per_image``)
    and the grid of all rows (``grid_name``), last in the returned list."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise LeanvitError(f"output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    if per_image:
        for k, row in enumerate(rows):
            paths.append(draw_rows([row], titles, out / f"{k:03d}_{_safe_name(names[k])}.png"))
    paths.append(draw_rows(rows, titles, out / grid_name))
    return paths


def viz_transform(hw, model=None):
    """The evaluation transform (resize, centre crop, normalize) at the model's input size ``hw``."""
    mean, std = normalization(model)
    return build_eval_transform(hw, mean=mean, std=std)
