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

from leanvit.errors import LeanvitError

__all__ = ["kept_masks", "mask_patches", "visualize", "render_kept_tokens", "draw_rows", "load_image",
           "viz_transform"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def load_image(path) -> "Image.Image":
    """An RGB PIL image from any file PIL reads; a clear error for a missing or unreadable file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise LeanvitError(f"image not found: {path}")
    if path.is_dir():
        raise LeanvitError(f"not an image file but a folder: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise LeanvitError(f"cannot read image {path}: not an image format PIL recognizes") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data, unreadable file
        raise LeanvitError(f"cannot read image {path}: {e}") from None


def _patch_grid(model: nn.Module) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    pe = model.patch_embed
    ps = tuple(pe.patch_size) if not isinstance(pe.patch_size, int) else (pe.patch_size,) * 2
    return ps, tuple(pe.grid_size)


@torch.inference_mode()
def kept_masks(model: nn.Module, x: torch.Tensor, keep_rate=None) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Logits and, per reorganizing block, a (B, grid_h, grid_w) bool mask of the patches still kept."""
    from leanvit.evit import is_evit, kept_token_masks

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
    from torchvision import transforms as T

    steps = getattr(transform, "transforms", [transform])
    for t in steps:
        if isinstance(t, T.Normalize):
            return torch.tensor(t.mean).view(-1, 1, 1), torch.tensor(t.std).view(-1, 1, 1)
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
    stem = re.sub(r"\.(" + "|".join(s[1:] for s in IMAGE_SUFFIXES) + r")$", "", name, flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_")[:60] or "image"


def _as_images(images) -> list:
    from PIL import Image

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
    from leanvit.evit import is_evit
    from leanvit.factory import model_input_size

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
    from leanvit.evit import _per_layer
    from leanvit.reorg import num_kept

    locs = list(model.evit_locations)
    rates = (_per_layer(keep_rate, len(locs)) if keep_rate is not None
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


# ---------------------------------------------------------------------------------------------
# Images from the command line
def _folder_images(root: Path, n: int) -> Tuple[List[Tuple[str, Path]], List[str]]:
    """Up to ``n`` images of an ImageFolder tree, taken round-robin over its classes, and the class
    names (the sorted sub-folders of ``val/``, or of the root)."""
    base = root / "val" if (root / "val").is_dir() else root
    classes = sorted(p for p in base.iterdir() if p.is_dir())
    groups = [sorted(f for f in c.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES) for c in classes] or [
        sorted(f for f in base.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)]
    picked = []
    for i in range(max((len(g) for g in groups), default=0)):
        for g in groups:
            if i < len(g) and len(picked) < n:
                picked.append((f"{g[i].parent.name}/{g[i].name}" if classes else g[i].name, g[i]))
    if not picked:
        raise LeanvitError(f"no image files found in {base}")
    return picked, [c.name for c in classes]


def add_arguments(p) -> None:
    from leanvit.evaluate import add_model_arguments

    add_model_arguments(p, keep_rate_help="EViT keep rate in (0, 1] (applies EViT to a plain ViT; default: "
                                          "the model's own)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", metavar="FILE", help="image files (any format PIL reads)")
    src.add_argument("--data", metavar="DIR|digits", help="take images from 'digits' or an ImageFolder tree")
    p.add_argument("--num-images", type=int, default=8, help="images taken from --data (default 8)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the PNGs")


def run(args) -> int:
    from leanvit.bench import resolve_device
    from leanvit.evaluate import _img_size_arg, build, recorded_digits

    if args.num_images < 1 or args.batch_size < 1:
        raise LeanvitError("--num-images and --batch-size must be >= 1")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise LeanvitError(f"--output {out} exists and is not a folder")
    device = resolve_device(args.device)
    img_size = _img_size_arg(args.img_size)
    class_names = None
    items = None  # digits: drawn once the model (and the data settings it records) is known
    if args.images:
        items = [(Path(f).name, load_image(f)) for f in args.images]  # fail early, before building the model
    elif args.data == "digits":
        from leanvit.data.digits import CLASSES

        class_names = list(CLASSES)
    else:
        root = Path(args.data)
        if not root.is_dir():
            raise LeanvitError(f"--data: no such folder: {root}")
        picked, classes = _folder_images(root, args.num_images)
        items = [(name, load_image(path)) for name, path in picked]
        class_names = classes or None
    model, _, _, config = build(args.model, args.checkpoint, args.keep_rate, img_size, args.num_classes,
                                data_classes=len(class_names) if class_names else None)
    if items is None:
        from leanvit.data.digits import DigitsDataset

        ds = DigitsDataset("val", **(recorded_digits(config) or {}))
        items = [(f"digits val {i} (label {ds.targets[i]})", ds.image(i)) for i in _spread(len(ds), args.num_images)]
    from leanvit.evit import is_evit

    if not is_evit(model):
        raise LeanvitError(f"{args.model or 'the model'} does not reorganize tokens: use an EViT model "
                           "(evit_*) or pass --keep-rate to apply EViT to a plain ViT")
    model = model.to(device)
    paths = visualize(model, [im for _, im in items], out, names=[n for n, _ in items], class_names=class_names,
                      batch_size=args.batch_size)
    print(f"wrote {len(paths) - 1} image rows and the grid {paths[-1]}")
    return 0


def _spread(n: int, k: int) -> List[int]:
    """``k`` indices spread evenly over ``range(n)``."""
    k = min(k, n)
    return [int(i * n / k) for i in range(k)]


def viz_transform(hw, model=None):
    """The evaluation transform (resize, centre crop, normalize) at the model's input size ``hw``."""
    from leanvit.data import build_eval_transform, normalization

    mean, std = normalization(model)
    return build_eval_transform(hw, mean=mean, std=std)
