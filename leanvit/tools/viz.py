"""``leanvit viz``: draw which tokens EViT kept (library: :mod:`leanvit.viz.tokens`), or, for a ToMe model
(``--reduction tome:8`` or a ToMe checkpoint), which patches were merged together (:mod:`leanvit.viz.merges`).

    leanvit viz --model evit_deit_small_patch16_224 --checkpoint evit.pth --images a.jpg b.png --output viz/
    leanvit viz --checkpoint runs/evit_demo/best.pth --data digits --num-images 8 --output viz/

Writes one PNG per image (``NNN_<name>.png``) and all rows in one grid, ``kept_tokens.png``
(``merged_tokens.png`` for ToMe).
"""
from __future__ import annotations

from pathlib import Path
from typing import List

from leanvit.data import create_dataset, dataset_classes, dataset_options
from leanvit.data.folder import load_image
from leanvit.errors import LeanvitError
from leanvit.reduction.evit import is_evit
from leanvit.reduction.tome import is_tome
from leanvit.utils import resolve_device
from leanvit.tools._common import add_model_arguments, build_from_args, check_output_folder
from leanvit.viz import visualize
from leanvit.train.tasks import checkpoint_task, dense_data_options, load_dense_model
from leanvit.viz.merges import visualize_merges


def add_arguments(p) -> None:
    add_model_arguments(p, keep_rate_help="EViT keep rate in (0, 1] (applies EViT to a plain ViT; default: "
                                          "the model's own)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", metavar="FILE", help="image files (any format PIL reads)")
    src.add_argument("--data", metavar="DIR|digits", help="take images from 'digits' or an ImageFolder tree")
    p.add_argument("--num-images", type=int, default=8, help="images taken from --data (default 8)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the PNGs")
    p.add_argument("--score-thresh", type=float, default=0.3,
                   help="detection checkpoints: draw boxes scoring at least this (default 0.3)")


def spread(n: int, k: int) -> List[int]:
    """``k`` indices spread evenly over ``range(n)``."""
    k = min(k, n)
    return [int(i * n / k) for i in range(k)]


def _data_items(data: str, config, n: int) -> list:
    """(name, PIL image) for ``n`` validation images spread over ``data`` (all classes represented)."""
    ds = create_dataset(data, "val", options=dataset_options(data, config))
    targets = list(getattr(ds, "targets", []))
    classes = list(ds.classes)
    picks = spread(len(ds), n)
    if not picks:
        raise LeanvitError(f"no images found in {data}")
    return [(f"{data} val {i} ({classes[targets[i]]})" if targets else f"{data} val {i}", ds.image(i))
            for i in picks]


def run(args) -> int:
    if args.num_images < 1 or args.batch_size < 1:
        raise LeanvitError("--num-images and --batch-size must be >= 1")
    out = check_output_folder(args.output)
    device = resolve_device(args.device)
    if args.checkpoint and checkpoint_task(args.checkpoint) != "classification":
        return _run_dense(args, out, device)  # boxes / masks of a detection or segmentation checkpoint
    class_names = items = None
    if args.images:
        items = [(Path(f).name, load_image(f)) for f in args.images]  # fail early, before building the model
    else:
        class_names = dataset_classes(args.data, "val") or None
    built = build_from_args(args, data_classes=len(class_names) if class_names else None)
    if items is None:  # drawn with the data settings the checkpoint records
        items = _data_items(args.data, built.config, args.num_images)
    merging = is_tome(built.model)  # ToMe: draw the merged groups instead of the kept tokens
    if not merging and not is_evit(built.model):
        raise LeanvitError(f"{args.model or 'the model'} does not reorganize tokens nor merge them: use an "
                           "EViT model (evit_*), or pass --keep-rate / --reduction evit:R or tome:R to a plain ViT")
    model = built.model.to(device)
    draw = visualize_merges if merging else visualize
    paths = draw(model, [im for _, im in items], out, names=[n for n, _ in items], class_names=class_names,
                 batch_size=args.batch_size)
    print(f"wrote {len(paths) - 1} image rows and the grid {paths[-1]}")
    return 0


# --------------------------------------------------------------------- dense checkpoints


def _run_dense(args, out: Path, device) -> int:
    """Predicted boxes (class and score) and masks of a detection checkpoint, or the predicted label map of
    a segmentation checkpoint, drawn over images (library: :mod:`leanvit.viz.dense`)."""
    from leanvit.viz.dense import visualize_dense

    if args.images:
        items = [(Path(f).name, load_image(f)) for f in args.images]
    model, spec, config, classes = load_dense_model(args.checkpoint)
    if not args.images:
        cfg = {**config, "data": args.data}
        ds = create_dataset(args.data, "val", options=dense_data_options(cfg, spec["task"]))
        picks = spread(len(ds), args.num_images)
        if not picks:
            raise LeanvitError(f"no images found in {args.data}")
        items = [(f"{args.data} val {i}", ds.image(i)) for i in picks]
    min_size = config.get("min_size") if spec["task"] == "segmentation" else None
    paths = visualize_dense(model.to(device), spec["task"], [im for _, im in items], out,
                            names=[n for n, _ in items], class_names=classes or None,
                            score_thresh=args.score_thresh, device=device, min_size=min_size)
    print(f"wrote {len(paths) - 1} pictures of {spec['head']} predictions and the grid {paths[-1]}")
    return 0
