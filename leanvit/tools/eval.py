"""``leanvit eval``: top-1 / top-5, loss and forward throughput of a model on labelled data
(library: :func:`leanvit.evaluate.evaluate`, :func:`leanvit.data.build_eval_dataset`).

    leanvit eval --model evit_deit_small_patch16_224 --checkpoint evit-0.7.pth --data /data/imagenet
    leanvit eval --checkpoint runs/evit_demo/best.pth --data digits

A checkpoint written by ``leanvit train`` is evaluated on exactly the images its validation used (its
recorded crop ratio and data options); any other model as timm's ``validate.py`` would (its
``pretrained_cfg``: crop_pct, interpolation, mean/std). ``--crop-pct`` / ``--interpolation`` override.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from leanvit.data import build_eval_dataset, dataset_classes, dataset_options
from leanvit.errors import LeanvitError
from leanvit.evaluate import evaluate
from leanvit.reduction import applied_reduction
from leanvit.utils import resolve_device
from leanvit.tools._common import add_model_arguments, build_from_args
from leanvit.train.tasks import (build_dense_eval_dataset, checkpoint_task, dense_data_options, dense_loader,
                                 load_dense_model)


def add_arguments(p) -> None:
    add_model_arguments(p, keep_rate_help="EViT keep rate in (0, 1] (applies EViT to a plain ViT)")
    p.add_argument("--data", required=True, metavar="DIR|digits",
                   help="'digits' (the embedded data) or an ImageFolder tree (DIR/val/<class>/*.jpg, or "
                        "DIR/<class>/*.jpg)")
    p.add_argument("--split", default="val", help="split folder inside DIR (default val)")
    p.add_argument("--crop-pct", type=float, default=None,
                   help="centre-crop fraction (default: the checkpoint's recorded one, else the model's "
                        "pretrained_cfg crop_pct as timm uses it)")
    p.add_argument("--interpolation", default=None, choices=("bicubic", "bilinear", "nearest"),
                   help="resize interpolation (default: as recorded / the model's pretrained_cfg)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="data-loading processes (default 0)")
    p.add_argument("--amp", action="store_true", help="autocast (bfloat16 on CPU, float16 on CUDA)")
    p.add_argument("--max-batches", type=int, default=None, help="evaluate only this many batches")
    p.add_argument("--output", default=None, metavar="FILE.json", help="also write the result as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--ignore-class-names", action="store_true",
                   help="evaluate even when the data's class names differ from those the checkpoint records "
                        "(the labels are then compared by position)")


def _check_args(args) -> None:
    for flag, v, lo in (("--max-batches", args.max_batches, 1), ("--batch-size", args.batch_size, 1),
                        ("--workers", args.workers, 0)):
        if v is not None and v < lo:
            raise LeanvitError(f"{flag} must be >= {lo}, got {v}")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise LeanvitError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    if args.output:
        out = Path(args.output)
        if out.is_dir():
            raise LeanvitError(f"--output {out} is a folder; name a file (e.g. {out / 'eval.json'})")
        for parent in out.parents:  # checked before evaluating, not after
            if parent.exists():
                if not parent.is_dir():
                    raise LeanvitError(f"--output {out}: {parent} is a file, not a folder")
                break


def check_class_names(recorded, classes, checkpoint, data) -> None:
    """The data's class names must be the checkpoint's (same names, same order), or the accuracy is wrong."""
    if recorded is None or list(map(str, recorded)) == list(map(str, classes)):
        return
    recorded = list(map(str, recorded))
    missing = [c for c in recorded if c not in classes]
    extra = [c for c in classes if c not in recorded]
    if not missing and not extra:
        what = "are in another order"
    else:
        what = (f"differ: not in the data {missing[:6] or 'none'}, not in the checkpoint {extra[:6] or 'none'}")
    raise LeanvitError(f"the class names of {data} {what} than those {checkpoint} was trained with; the accuracy "
                       "would be meaningless (give --ignore-class-names to evaluate by label position anyway)")


def run(args) -> int:
    _check_args(args)
    if args.checkpoint and checkpoint_task(args.checkpoint) != "classification":
        return _run_dense(args)  # a detection / segmentation checkpoint
    device = resolve_device(args.device)
    classes = dataset_classes(args.data, args.split)
    built = build_from_args(args, data_classes=len(classes))
    model, name, hw, config, ckpt = built
    if not args.ignore_class_names:
        check_class_names((ckpt or {}).get("classes"), classes, args.checkpoint, args.data)
    n_out = getattr(model, "num_classes", None)
    if n_out is not None and n_out != len(classes):
        raise LeanvitError(f"the model has {n_out} classes but the data has {len(classes)} "
                           f"({args.data}); evaluate on data with the model's classes")
    dataset = build_eval_dataset(args.data, model, hw, config=config, split=args.split, crop_pct=args.crop_pct,
                                 interpolation=args.interpolation, options=dataset_options(args.data, config))
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                        pin_memory=device.type == "cuda")
    res = evaluate(model, loader, device=device, amp=args.amp, progress=not args.no_progress,
                   max_batches=args.max_batches)
    method = applied_reduction(model)
    keep = getattr(model, "keep_rate", None)
    res.update(model=name, checkpoint=args.checkpoint, data=args.data, img_size=f"{hw[0]}x{hw[1]}",
               reduction=method.spec(model) if method else None, keep_rate=keep, batch_size=args.batch_size,
               device=str(device), threads=torch.get_num_threads())
    shown = f" {method.knob}={method.format_strength(method.get_strength(model))}" if method else ""
    print(f"{built.description}{shown} on {args.data} ({res['images']} images, {hw[0]}x{hw[1]}): "
          f"top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  loss {res['loss']:.4f}  "
          f"{res['img_per_s']:.1f} img/s (forward only; batch {args.batch_size}, {device}, "
          f"{torch.get_num_threads()} threads)")
    _write_json(res, args.output)
    return 0


# --------------------------------------------------------------------- dense checkpoints


def _run_dense(args) -> int:
    """COCO mAP (detection) or mIoU / pixel accuracy (segmentation) of a dense ``leanvit train`` checkpoint."""
    from leanvit.evaluate_dense import DETECTION_KEYS, MASK_KEYS, evaluate_detection, evaluate_segmentation

    device = resolve_device(args.device)
    model, spec, config, classes = load_dense_model(args.checkpoint)
    task = spec["task"]
    cfg = {**config, "data": args.data}
    dataset = build_dense_eval_dataset(args.data, cfg, task, split=args.split,
                                       options=dense_data_options(cfg, task))
    data_classes = list(getattr(dataset, "classes", []))
    if len(data_classes) != int(spec["num_classes"]):
        raise LeanvitError(f"the model has {spec['num_classes']} classes but {args.data} has {len(data_classes)}; "
                           "evaluate on data with the model's classes")
    loader = dense_loader(dataset, task, args.batch_size, args.workers, pin_memory=device.type == "cuda")
    model = model.to(device)
    common = dict(device=device, amp=args.amp, progress=not args.no_progress, max_batches=args.max_batches)
    if task == "detection":
        res = evaluate_detection(model, loader, num_classes=int(spec["num_classes"]), **common)
        shown = "  ".join(f"{k[4:]} {res[k]:.4f}" for k in DETECTION_KEYS + MASK_KEYS if k in res)
    else:
        res = evaluate_segmentation(model, loader, int(spec["num_classes"]),
                                    miou_classes=getattr(dataset, "miou_classes", None), **common)
        shown = (f"mIoU {res['val_miou']:.4f}  mIoU (all classes) {res['val_miou_all']:.4f}  "
                 f"pixel acc {res['val_pixel_acc']:.4f}")
    res.update(model=spec["name"], head=spec["head"], task=task, checkpoint=args.checkpoint, data=args.data,
               batch_size=args.batch_size, device=str(device), threads=torch.get_num_threads())
    print(f"{spec['head']} on {spec['name']} ({task}) on {args.data} ({res['images']} images): {shown}  "
          f"{res['img_per_s']:.1f} img/s (forward only; batch {args.batch_size}, {device}, "
          f"{torch.get_num_threads()} threads)")
    for line in getattr(getattr(dataset, "skips", None), "lines", lambda: [])():
        print(f"note: {line}")
    _write_json(res, args.output)
    return 0


def _write_json(res: dict, path) -> None:
    """The result as JSON at ``path`` (if given); non-finite numbers as null."""
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    safe = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in res.items()}
    out.write_text(json.dumps(safe, indent=2) + "\n")
    print(f"wrote {out}")
