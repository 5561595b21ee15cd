"""Argument helpers several commands share (model, checkpoint, token reduction, sizes, device)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from leanvit.checkpoints import check_writable
from leanvit.errors import LeanvitError
from leanvit.models.build import BuiltModel, build_model
from leanvit.reduction import ReductionSpec, is_none_text
from leanvit.reduction.reorg import check_keep_rate
from leanvit.train.recipes import parse_value
from leanvit.utils import img_size_arg

__all__ = ["add_model_arguments", "reduction_from_args", "build_from_args", "check_output_folder",
           "add_data_overrides", "data_overrides_from_args"]


def add_model_arguments(p, keep_rate_help: str = "EViT keep rate in (0, 1] (alias of --reduction evit:R)") -> None:
    p.add_argument("--model", default=None, metavar="M",
                   help="model name, e.g. evit_deit_small_patch16_224 (optional with a checkpoint written by "
                        "leanvit train, which records its model)")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="local weights: .pth/.pt (state dict or {'model': ...}) or .safetensors")
    p.add_argument("--reduction", default=None, metavar="METHOD:VALUE",
                   help="token reduction to apply, e.g. evit:0.7 or evit-drop:0.5; none (or off, -): no reduction, "
                        "even on a checkpoint trained with one (default: the model's own)")
    p.add_argument("--keep-rate", type=float, default=None, metavar="R", help=keep_rate_help)
    p.add_argument("--restore", default=None, metavar="NAME",
                   help="detection/segmentation models: how the reduced backbone restores its token map: keep, "
                        "reactivate (or reactivate:N), fused (EViT); unmerge, reactivate (ToMe); default: the "
                        "checkpoint's, else keep / unmerge")
    p.add_argument("--img-size", type=int, nargs="+", default=None, metavar="S", help="input size: S or H W")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes of the model (default: from the checkpoint, else from the data)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")


def reduction_from_args(args):
    """``--reduction METHOD:VALUE`` and/or its EViT alias ``--keep-rate R`` as one spec (or None), with
    ``--restore`` among its options; ``--restore`` alone: ``{"restore": NAME}`` (the checkpoint's own
    reduction, restored another way); ``--reduction none`` (``off``, ``-``): ``"none"``, the unreduced model
    even where the checkpoint records a reduction."""
    keep_rate = getattr(args, "keep_rate", None)
    restore = getattr(args, "restore", None)
    if is_none_text(getattr(args, "reduction", None)):
        for flag, value in (("--keep-rate", keep_rate), ("--restore", restore)):
            if value is not None:
                raise LeanvitError(f"--reduction {args.reduction} (no reduction) cannot be combined with {flag}")
        return "none"
    if keep_rate is not None:
        try:
            check_keep_rate(keep_rate)
        except LeanvitError as e:
            raise LeanvitError(f"--keep-rate: {e}") from None
    spec = ReductionSpec.parse(getattr(args, "reduction", None) or None, keep_rate=keep_rate, what="--reduction")
    if restore is None:
        return spec
    # a restoration for the checkpoint's own reduction, or with the new one
    return {"restore": restore} if spec is None else spec.with_options(restore=restore)


def build_from_args(args, data_classes: Optional[int] = None) -> BuiltModel:
    return build_model(args.model, args.checkpoint, reduction_from_args(args), img_size_arg(args.img_size),
                       args.num_classes, data_classes=data_classes)


def check_output_folder(path, flag: str = "--output") -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise LeanvitError(f"{flag} {out} exists and is not a folder")
    return check_writable(out, flag)  # a read-only or full disk: now, before the work


def add_data_overrides(p) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KIND.OPTION=VALUE", dest="data_set",
                   help="a data option instead of the one the checkpoint records (which is used otherwise), e.g. "
                        "hf.label_column=fine_label, hf.val_split=test, shards.class_map=classes.txt")


def data_overrides_from_args(args) -> dict:
    """``--set KIND.OPTION=VALUE`` items as the keyword arguments of ``Task.load_model``:
    ``{"data_overrides": {"KIND.OPTION": value}}`` (values read as YAML); ``{}`` without any, so that a task
    of one's own written before ``data_overrides`` existed still loads."""
    out = {}
    for item in getattr(args, "data_set", None) or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise LeanvitError(f"--set takes KIND.OPTION=VALUE, got '{item}'")
        out[key.strip()] = parse_value(value)
    return {"data_overrides": out} if out else {}
