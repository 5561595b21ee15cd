"""Drawing helpers the picture modules share: image inputs and row labels, undoing the input normalization,
grids of picture rows (matplotlib), written one PNG per image plus the grid, and a colour palette."""
from __future__ import annotations

import colorsys
import re
from pathlib import Path
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
from PIL import Image
from timm.layers import to_2tuple
from torchvision import transforms as T

from leanvit.data import build_eval_transform, normalization
from leanvit.data.folder import IMG_EXTENSIONS, load_image
from leanvit.errors import LeanvitError

__all__ = ["patch_grid", "normalize_params", "draw_rows", "safe_name", "as_images", "default_names", "run_eval",
           "write_rows", "viz_transform", "palette"]


def patch_grid(model: nn.Module) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """A ViT's patch size and patch grid, ((ph, pw), (gh, gw))."""
    pe = model.patch_embed
    return to_2tuple(pe.patch_size), tuple(pe.grid_size)


def normalize_params(transform) -> Tuple[torch.Tensor, torch.Tensor]:
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


def safe_name(name: str) -> str:
    stem = re.sub(r"\.(" + "|".join(s[1:] for s in IMG_EXTENSIONS) + r")$", "", name, flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_")[:60] or "image"


def as_images(images) -> list:
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


def default_names(images, names) -> List[str]:
    if names is not None:
        if len(names) != len(images):
            raise LeanvitError(f"got {len(names)} names for {len(images)} images")
        return [str(n) for n in names]
    return [Path(im).name if isinstance(im, (str, Path)) else f"image {i}" for i, im in enumerate(images)]


def run_eval(model: nn.Module, fn):
    """``fn()`` with ``model`` in eval mode; its training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        return fn()
    finally:
        model.train(was_training)


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
            paths.append(draw_rows([row], titles, out / f"{k:03d}_{safe_name(names[k])}.png"))
    paths.append(draw_rows(rows, titles, out / grid_name))
    return paths


def viz_transform(hw, model=None):
    """The evaluation transform (resize, centre crop, normalize) at the model's input size ``hw``."""
    mean, std = normalization(model)
    return build_eval_transform(hw, mean=mean, std=std)


def palette(n: int, value: float = 1.0) -> List[Tuple[float, float, float]]:
    """``n`` well separated RGB colours in [0, 1] (a fixed golden-ratio hue walk; ``value``: their brightness)."""
    return [colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, value) for i in range(n)]
