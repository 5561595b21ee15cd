"""``leanvit viz``: pictures of what a model does, as its task draws them (:meth:`leanvit.tasks.Task.draw`):
which tokens EViT kept (:mod:`leanvit.viz.tokens`) or, for a ToMe model (``--reduction tome:8`` or a ToMe
checkpoint), which patches were merged together (:mod:`leanvit.viz.merges`); a detector's boxes or a
segmenter's label map (:mod:`leanvit.viz.dense`).

    leanvit viz --model evit_deit_small_patch16_224 --checkpoint evit.pth --images a.jpg b.png --output viz/
    leanvit viz --checkpoint runs/evit_demo/best.pth --data digits --num-images 8 --output viz/

Writes one PNG per image (``NNN_<name>.png``) and all rows in one grid, ``kept_tokens.png``
(``merged_tokens.png`` for ToMe).
"""
from __future__ import annotations

from pathlib import Path
from typing import List

from leanvit.data import dataset_classes, dataset_options
from leanvit.data.folder import load_image
from leanvit.errors import LeanvitError
from leanvit.tasks import check_data, task_of_checkpoint
from leanvit.tools._common import (
    add_data_overrides,
    add_model_arguments,
    check_output_folder,
    data_overrides_from_args,
    reduction_from_args,
)
from leanvit.utils import img_size_arg, resolve_device


def add_arguments(p) -> None:
    add_model_arguments(p, keep_rate_help="EViT keep rate in (0, 1] (applies EViT to a plain ViT; default: "
                                          "the model's own)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", metavar="FILE", help="image files (any format PIL reads)")
    src.add_argument("--data", metavar="DIR|digits", help="take images from 'digits' or an ImageFolder tree")
    add_data_overrides(p)
    p.add_argument("--num-images", type=int, default=8, help="images taken from --data (default 8)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the PNGs")
    p.add_argument("--score-thresh", type=float, default=0.3,
                   help="detection checkpoints: draw boxes scoring at least this (default 0.3)")


def spread(n: int, k: int) -> List[int]:
    """``k`` indices spread evenly over ``range(n)``."""
    k = min(k, n)
    return [int(i * n / k) for i in range(k)]


def _data_items(task, data: str, config, n: int) -> list:
    """(name, PIL image) for ``n`` validation images spread over ``data`` (all classes represented)."""
    ds = task.eval_images(data, config)
    targets = list(getattr(ds, "targets", []))
    classes = list(getattr(ds, "classes", []))
    picks = spread(len(ds), n)
    if not picks:
        raise LeanvitError(f"no images found in {data}")
    return [(f"{data} val {i} ({classes[targets[i]]})" if targets and classes else f"{data} val {i}", ds.image(i))
            for i in picks]


def run(args) -> int:
    if args.num_images < 1 or args.batch_size < 1:
        raise LeanvitError("--num-images and --batch-size must be >= 1")
    out = check_output_folder(args.output)
    device = resolve_device(args.device)
    task = task_of_checkpoint(args.checkpoint)
    class_names = items = None
    if args.images:
        items = [(Path(f).name, load_image(f)) for f in args.images]  # fail early, before building the model
    else:
        check_data(task, args.data, f"{args.checkpoint}'s task" if args.checkpoint else "the model's task")
    built = task.load_model(args.checkpoint, args.model, reduction_from_args(args), img_size_arg(args.img_size),
                            args.num_classes, data=args.data, **data_overrides_from_args(args))
    if items is None:  # drawn with the data settings the checkpoint records
        class_names = dataset_classes(args.data, "val", dataset_options(args.data, built.config)) or None
        items = _data_items(task, args.data, built.config or {}, args.num_images)
    paths = task.draw(built, [im for _, im in items], out, [n for n, _ in items], class_names=class_names,
                      device=device, batch_size=args.batch_size, score_thresh=args.score_thresh)
    print(f"wrote {len(paths) - 1} image rows and the grid {paths[-1]}")
    return 0
