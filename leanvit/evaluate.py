"""Evaluation: top-1 / top-5 accuracy, loss and throughput of a model on a labelled dataset.

Python::

    from leanvit.evaluate import evaluate
    result = evaluate(model, loader)          # {"top1": 91.2, "top5": 99.6, "loss": 0.31, ...}

Command line::

    leanvit eval --model evit_deit_small_patch16_224 --checkpoint evit-0.7.pth --data /data/imagenet
    leanvit eval --checkpoint runs/evit_demo/best.pth --data digits

Throughput is the model's: images per second of forward passes only (data loading and transforms
excluded), timed with the device synchronized, so it compares models rather than data pipelines. Use
``leanvit bench`` for controlled speed measurements (warm-up, fixed batch, median of repeats).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Dict, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from leanvit.errors import LeanvitError

__all__ = ["evaluate", "accumulate", "build", "build_model", "Built", "checkpoint_num_classes",
           "add_model_arguments", "recorded_digits"]

_CLASSIFIER_KEYS = ("head.weight", "head.fc.weight", "fc.weight", "classifier.weight", "head.l.weight")


@torch.inference_mode()
def accumulate(model: nn.Module, loader, device="cpu", keep_rate=None, amp: bool = False, progress: bool = False,
               max_batches: Optional[int] = None, desc: str = "eval") -> Dict[str, float]:
    """Sums over ``loader`` in the model's current mode: ``images``, ``correct1``, ``correct5``, ``loss_sum``
    (cross-entropy) and ``forward_seconds``. Sums add up across processes (the training engine's sharded
    validation); :func:`evaluate` turns them into rates."""
    from tqdm import tqdm

    from leanvit.bench import sync_device
    from leanvit.evit import is_evit

    device = torch.device(device)
    kwargs = {"keep_rate": keep_rate} if keep_rate is not None and is_evit(model) else {}
    if keep_rate is not None and not kwargs:
        raise LeanvitError(f"keep_rate is for EViT models; {type(model).__name__} does not reorganize tokens")
    n = correct1 = correct5 = 0
    loss_sum = fwd_time = 0.0
    total = len(loader) if hasattr(loader, "__len__") else None
    if total is not None and max_batches is not None:
        total = min(total, max_batches)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    bar = tqdm(loader, total=total, desc=desc, unit="batch", disable=not progress, leave=False)
    for i, (x, y) in enumerate(bar):
        if max_batches is not None and i >= max_batches:
            break
        x = x.to(device, non_blocking=True)
        y = torch.as_tensor(y).to(device, non_blocking=True)
        sync_device(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            logits = model(x, **kwargs)
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        sync_device(device)
        fwd_time += time.perf_counter() - t0
        logits = logits.float()
        num_classes = logits.shape[-1]
        if int(y.max()) >= num_classes or int(y.min()) < 0:
            raise LeanvitError(f"a label ({int(y.max())}) is outside the model's {num_classes} classes")
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, num_classes), dim=-1).indices
        hit = top == y[:, None]
        correct1 += hit[:, 0].sum().item()
        correct5 += hit.any(dim=-1).sum().item()
        n += x.shape[0]
        bar.set_postfix(top1=f"{100.0 * correct1 / n:.1f}")
    bar.close()
    return {"images": n, "correct1": correct1, "correct5": correct5, "loss_sum": loss_sum,
            "forward_seconds": fwd_time}


def evaluate(model: nn.Module, loader, device="cpu", keep_rate=None, amp: bool = False, progress: bool = True,
             max_batches: Optional[int] = None, desc: str = "eval") -> Dict[str, float]:
    """Evaluate a classifier on ``loader`` (batches of (images, integer labels)); the model is moved to
    ``device`` and put in eval mode.

    Args:
        keep_rate: for EViT models, the keep rate of this evaluation (default: the model's own).
        amp: autocast (bfloat16 on CPU, float16 on CUDA).
        max_batches: stop after this many batches (a quick estimate).

    Returns a dict: ``top1``, ``top5`` (percent; top-k with k capped at the number of classes), ``loss``
    (mean cross-entropy), ``images``, ``img_per_s`` (forward passes only) and ``seconds`` (wall time).
    """
    t_start = time.perf_counter()
    model = model.to(torch.device(device)).eval()
    s = accumulate(model, loader, device, keep_rate, amp, progress, max_batches, desc)
    n = s["images"]
    if n == 0:
        raise LeanvitError("the evaluation data is empty")
    fwd = s["forward_seconds"]
    return {
        "top1": 100.0 * s["correct1"] / n,
        "top5": 100.0 * s["correct5"] / n,
        "loss": s["loss_sum"] / n,
        "images": n,
        "img_per_s": n / fwd if fwd > 0 else math.inf,
        "seconds": time.perf_counter() - t_start,
    }


# ---------------------------------------------------------------------------------------------
# Building a model from the command line (shared with `leanvit viz`)
def checkpoint_num_classes(state_dict: Dict[str, torch.Tensor]) -> Optional[int]:
    """Number of classes of the classifier stored in a state dict, if recognizable."""
    for k in _CLASSIFIER_KEYS:
        v = state_dict.get(k)
        if v is not None and v.ndim == 2:
            return int(v.shape[0])
    return None


def add_model_arguments(p, keep_rate_help: str = "EViT keep rate in (0, 1]") -> None:
    p.add_argument("--model", default=None, metavar="M",
                   help="model name, e.g. evit_deit_small_patch16_224 (optional with a checkpoint written by "
                        "leanvit train, which records its model)")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="local weights: .pth/.pt (state dict or {'model': ...}) or .safetensors")
    p.add_argument("--keep-rate", type=float, default=None, metavar="R", help=keep_rate_help)
    p.add_argument("--img-size", type=int, nargs="+", default=None, metavar="S", help="input size: S or H W")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes of the model (default: from the checkpoint, else from the data)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")


def _img_size_arg(values) -> Optional[tuple]:
    if values is None:
        return None
    if len(values) > 2 or min(values) < 1:
        raise LeanvitError(f"--img-size takes S or H W with positive values, got {' '.join(map(str, values))}")
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def _recorded_model(obj) -> Optional[dict]:
    """The model spec a leanvit training checkpoint (already read) records (``{"name", "kwargs"}``), if any."""
    if isinstance(obj, dict):
        spec = obj.get("model_spec") or obj.get("model_cfg")
        if isinstance(spec, dict) and isinstance(spec.get("name"), str):
            return spec
    return None


def _checkpoint_input_size(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Optional[tuple]:
    """The (H, W) a ViT checkpoint was trained at, from its position embedding, where it differs from
    ``model``'s (square grids only; None when unknown or equal)."""
    pos = state_dict.get("pos_embed")
    own = getattr(model, "pos_embed", None)
    pe = getattr(model, "patch_embed", None)
    if pos is None or own is None or pos.ndim != 3 or getattr(pe, "grid_size", None) is None:
        return None
    gh, gw = pe.grid_size
    prefix = own.shape[1] - gh * gw  # position embeddings of class/distillation tokens, if the model has them
    n = pos.shape[1] - prefix
    side = math.isqrt(max(n, 0))
    if side < 1 or side * side != n or (side, side) == (gh, gw):
        return None
    ps = pe.patch_size if not isinstance(pe.patch_size, int) else (pe.patch_size,) * 2
    return side * ps[0], side * ps[1]


def _create(name: str, **kwargs) -> nn.Module:
    from leanvit.factory import create_model

    try:
        return create_model(name, **kwargs)
    except LeanvitError:
        raise
    except (RuntimeError, ValueError, AssertionError) as e:  # e.g. an input size timm cannot build
        opts = ", ".join(f"{k}={v}" for k, v in kwargs.items() if v is not None)
        raise LeanvitError(f"cannot build {name} ({opts}): {e}") from None


class Built(NamedTuple):
    model: nn.Module
    name: str
    img_size: tuple          # (H, W) to evaluate at
    config: Optional[dict]   # the training settings a ``leanvit train`` checkpoint records


def build(name: Optional[str], checkpoint=None, keep_rate=None, img_size=None, num_classes=None,
          data_classes: Optional[int] = None) -> Built:
    """:func:`build_model`, also returning the model's name, input size and recorded training settings."""
    from leanvit.bench import check_input_size
    from leanvit.checkpoints import load_checkpoint, read_checkpoint, state_dict_from
    from leanvit.factory import model_input_size
    from leanvit.reorg import check_keep_rate

    if keep_rate is not None:
        keep_rate = check_keep_rate(keep_rate, "--keep-rate")
    if img_size is not None:
        img_size = _img_size_arg([img_size] if isinstance(img_size, int) else list(img_size))
    if num_classes is not None and num_classes < 1:
        raise LeanvitError(f"--num-classes must be >= 1, got {num_classes}")
    opts: dict = {}
    sd = obj = None
    if checkpoint is not None:
        obj = read_checkpoint(checkpoint)  # read once: spec, config and weights all come from it
        spec = _recorded_model(obj)
        if name is None:
            if spec is None:
                raise LeanvitError(f"{checkpoint} does not record its model; name it with --model")
            name = spec["name"]
        if spec is not None and spec["name"] == name:
            opts = {k: v for k, v in dict(spec.get("kwargs") or {}).items() if k != "pretrained"}
        sd = state_dict_from(obj, checkpoint)
        if num_classes is None:
            num_classes = checkpoint_num_classes(sd)
    elif name is None:
        raise LeanvitError("name a model with --model (or give a --checkpoint written by leanvit train)")
    if num_classes is None and opts.get("num_classes") is None:
        num_classes = data_classes
    for key, value in (("keep_rate", keep_rate), ("img_size", img_size), ("num_classes", num_classes)):
        if value is not None:
            opts[key] = value
    try:
        model = _create(name, **opts)
    except LeanvitError:
        if "img_size" not in opts:
            raise
        model = _create(name, **{k: v for k, v in opts.items() if k != "img_size"})
        if hasattr(model, "patch_embed"):  # a ViT that cannot take this size: the first error says why
            raise
        # a convolutional model: takes any input size as it is
    if sd is not None and img_size is None:
        trained = _checkpoint_input_size(sd, model)
        if trained is not None:  # e.g. a 384 px checkpoint: evaluate at the size it was trained at
            opts["img_size"] = trained
            model = _create(name, **opts)
    hw = model_input_size(model, opts.get("img_size"))
    check_input_size(model, hw)
    config = None
    if checkpoint is not None:
        load_checkpoint(model, sd, strict=True, name=str(checkpoint))
        config = obj.get("config") if isinstance(obj, dict) and isinstance(obj.get("config"), dict) else None
    return Built(model.eval(), name, hw, config)


def build_model(name: Optional[str], checkpoint=None, keep_rate=None, img_size=None, num_classes=None,
                data_classes: Optional[int] = None) -> nn.Module:
    """A model for evaluation or visualization, in eval mode, with its checkpoint loaded strictly.

    Args:
        name: a registered model name; may be None with a checkpoint written by ``leanvit train``, which
            records its model (``{"model_spec": {"name", "kwargs"}}``; its options are used too).
        checkpoint: a local file (see :func:`leanvit.load_checkpoint`).
        keep_rate: EViT keep rate (applies EViT to a plain ViT).
        img_size: int or (H, W); default: the recorded one, else the size of the checkpoint's position
            embedding, else the model's own.
        num_classes: default: the checkpoint's classifier, else the recorded one, else ``data_classes``.
    """
    return build(name, checkpoint, keep_rate, img_size, num_classes, data_classes).model


# ---------------------------------------------------------------------------------------------
# Data
def eval_dataset(data: str, img_size: tuple, model: Optional[nn.Module] = None, split: str = "val",
                 digits: Optional[dict] = None):
    """The evaluation split of ``data`` (``digits`` or an ImageFolder tree) at ``img_size``."""
    from leanvit.data import build_eval_dataset

    return build_eval_dataset(data, img_size=img_size, model=model, split=split, digits=digits)


def recorded_digits(config: Optional[dict]) -> Optional[dict]:
    """The embedded-data settings (canvas size, ...) of a recorded training ``config`` (see :class:`Built`)."""
    if isinstance(config, dict) and config.get("data") == "digits":
        return dict(config.get("digits") or {})
    return None


def data_classes(data: str, split: str = "val") -> Sequence[str]:
    from leanvit.data import dataset_classes

    return dataset_classes(data, split=split)


# ---------------------------------------------------------------------------------------------
# `leanvit eval`
def add_arguments(p) -> None:
    add_model_arguments(p, keep_rate_help="EViT keep rate in (0, 1] (applies EViT to a plain ViT)")
    p.add_argument("--data", required=True, metavar="DIR|digits",
                   help="'digits' (the embedded data) or an ImageFolder tree (DIR/val/<class>/*.jpg, or "
                        "DIR/<class>/*.jpg)")
    p.add_argument("--split", default="val", help="split folder inside DIR (default val)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="data-loading processes (default 0)")
    p.add_argument("--amp", action="store_true", help="autocast (bfloat16 on CPU, float16 on CUDA)")
    p.add_argument("--max-batches", type=int, default=None, help="evaluate only this many batches")
    p.add_argument("--output", default=None, metavar="FILE.json", help="also write the result as JSON")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from torch.utils.data import DataLoader

    from leanvit.bench import resolve_device

    if args.max_batches is not None and args.max_batches < 1:
        raise LeanvitError(f"--max-batches must be >= 1, got {args.max_batches}")
    if args.batch_size < 1:
        raise LeanvitError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        raise LeanvitError(f"--workers must be >= 0, got {args.workers}")
    device = resolve_device(args.device)
    classes = data_classes(args.data, args.split)
    model, name, hw, config = build(args.model, args.checkpoint, args.keep_rate, _img_size_arg(args.img_size),
                                    args.num_classes, data_classes=len(classes))
    n_out = getattr(model, "num_classes", None)
    if n_out is not None and n_out != len(classes):
        raise LeanvitError(f"the model has {n_out} classes but the data has {len(classes)} "
                           f"({args.data}); evaluate on data with the model's classes")
    digits = recorded_digits(config) if args.data == "digits" else None
    dataset = eval_dataset(args.data, hw, model, args.split, digits=digits)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                        pin_memory=device.type == "cuda")
    res = evaluate(model, loader, device=device, amp=args.amp, progress=not args.no_progress,
                   max_batches=args.max_batches)
    keep = getattr(model, "keep_rate", None)
    res.update(model=name, checkpoint=args.checkpoint, data=args.data, img_size=f"{hw[0]}x{hw[1]}",
               keep_rate=keep, batch_size=args.batch_size, device=str(device), threads=torch.get_num_threads())
    keep_s = f" keep_rate={keep}" if keep is not None else ""
    print(f"{name}{keep_s} on {args.data} ({res['images']} images, {hw[0]}x{hw[1]}): "
          f"top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  loss {res['loss']:.4f}  "
          f"{res['img_per_s']:.1f} img/s (forward only; batch {args.batch_size}, {device}, "
          f"{torch.get_num_threads()} threads)")
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        safe = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in res.items()}
        out.write_text(json.dumps(safe, indent=2) + "\n")
        print(f"wrote {out}")
    return 0
