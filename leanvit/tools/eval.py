"""``leanvit eval``: the metrics of a model on labelled data (classification: top-1 / top-5 and loss;
detection: COCO mAP; segmentation: mIoU) and its forward throughput; the checkpoint's task
(:mod:`leanvit.tasks`) says how.

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

from leanvit.checkpoints import check_writable, write_atomically
from leanvit.errors import LeanvitError
from leanvit.measure.load import LoadWatch
from leanvit.tasks import check_data, task_of_checkpoint
from leanvit.tools._common import add_data_overrides, add_model_arguments, data_overrides_from_args, reduction_from_args
from leanvit.utils import img_size_arg, resolve_device


def add_arguments(p) -> None:
    add_model_arguments(p, keep_rate_help="EViT keep rate in (0, 1] (applies EViT to a plain ViT)")
    p.add_argument("--data", required=True, metavar="DATA",
                   help="what to evaluate on: an embedded set (digits, digits-det, digits-seg), an ImageFolder tree "
                        "(DIR/val/<class>/*.jpg, or DIR/<class>/*.jpg), tar shards (a folder, brace pattern or "
                        "glob), a Hugging Face dataset (hfds/NAME or a save_to_disk folder), a COCO or mask-folder "
                        "layout; read with the data options the checkpoint records")
    add_data_overrides(p)
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
        check_writable(out.parent, "--output's folder")  # a read-only or full disk: before evaluating


def run(args) -> int:
    _check_args(args)
    task = task_of_checkpoint(args.checkpoint)  # classification without a checkpoint that records a task
    check_data(task, args.data, f"{args.checkpoint}'s task" if args.checkpoint else "the model's task")
    device = resolve_device(args.device)
    built = task.load_model(args.checkpoint, args.model, reduction_from_args(args), img_size_arg(args.img_size),
                            args.num_classes, data=args.data, split=args.split,
                            **data_overrides_from_args(args))
    dataset, loader = task.eval_data(built, args.data, args.split, args.batch_size, args.workers, device,
                                     crop_pct=args.crop_pct, interpolation=args.interpolation,
                                     check_classes=not args.ignore_class_names, source=args.checkpoint)
    load = LoadWatch()
    res = task.evaluate(built.model, loader, device=device, amp=args.amp, progress=not args.no_progress,
                        max_batches=args.max_batches, dataset=dataset)
    load.stop()
    hw = built.img_size
    options = task.data_record(built, args.data)
    res.update(task.record(built), model=built.name, task=task.name, checkpoint=args.checkpoint, data=args.data,
               split=args.split, data_options=options, img_size=f"{hw[0]}x{hw[1]}", batch_size=args.batch_size,
               device=str(device), threads=torch.get_num_threads(), machine_load=load.line, busy=load.busy)
    shown = f" [{', '.join(f'{k}={v}' for k, v in options.items())}]" if options else ""
    print(f"{task.title(built)} on {args.data}{shown} ({args.split}: {res['images']} images, {hw[0]}x{hw[1]}): "
          f"{task.describe(res)}  {res['img_per_s']:.1f} img/s (forward only; batch {args.batch_size}, {device}, "
          f"{torch.get_num_threads()} threads; {load.line})")
    if load.warning and device.type == "cpu":
        print(f"warning: {load.warning}")
    for line in getattr(getattr(dataset, "skips", None), "lines", lambda: [])():
        print(f"note: {line}")
    _write_json(res, args.output)
    return 0


def _write_json(res: dict, path) -> None:
    """The result as JSON at ``path`` (if given); non-finite numbers as null."""
    if not path:
        return
    out = Path(path)
    safe = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in res.items()}
    write_atomically(out, lambda f: f.write(json.dumps(safe, indent=2) + "\n"), binary=False)
    print(f"wrote {out}")
