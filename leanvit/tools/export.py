"""``leanvit export``: write a model to ONNX or a torch.export program and verify it against PyTorch
(library: :mod:`leanvit.deploy.export`).

    leanvit export evit_deit_small_patch16_224 --checkpoint evit.pth --format onnx --output evit.onnx
    leanvit export deit_small_patch16_224 --keep-rate 0.5 0.7 --format onnx --output deit.onnx   # 2 files
    leanvit export shunted_t --checkpoint ckpt_T.pth --format pt2 --output shunted_t.pt2 --dynamic-size
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from leanvit.checkpoints import check_writable
from leanvit.deploy.export import (
    FORMATS,
    export_model,
    format_from_path,
    keep_rate_path,
    min_dynamic_side,
    verify_export,
)
from leanvit.errors import LeanvitError
from leanvit.reduction import ReductionSpec, is_none_text, reduction_spec
from leanvit.reduction.reorg import check_keep_rate
from leanvit.tasks import task_of_checkpoint
from leanvit.utils import img_size_arg


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="model name, e.g. evit_deit_small_patch16_224 or shunted_t (optional with a checkpoint "
                        "written by leanvit train)")
    p.add_argument("--checkpoint", default=None, metavar="PATH", help="local weights (default: random weights)")
    p.add_argument("--keep-rate", type=float, nargs="+", default=None, metavar="R",
                   help="EViT keep rate(s) to bake into the file; several write one file per rate "
                        "(NAME_keepR.EXT); on a plain ViT this applies EViT")
    p.add_argument("--reduction", default=None, metavar="METHOD:VALUE",
                   help="token reduction to bake into the file, e.g. tome:8; none (or off, -): no reduction, even "
                        "on a checkpoint trained with one (default: the model's own)")
    p.add_argument("--img-size", type=int, nargs="+", default=None, metavar="S",
                   help="input size S or H W (default: the model's / checkpoint's)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--format", choices=FORMATS, default=None, help="onnx or pt2 (default: from --output's suffix)")
    p.add_argument("--output", required=True, metavar="PATH", help="the file to write (.onnx or .pt2)")
    p.add_argument("--dynamic-size", action="store_true",
                   help="dynamic height and width as well as batch (Shunted models)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--no-verify", action="store_true", help="skip the comparison with eager PyTorch")


def run(args) -> int:
    fmt = args.format or format_from_path(args.output)
    if fmt is None:
        raise LeanvitError(f"--format: give onnx or pt2 (cannot tell from --output {args.output})")
    rates = [check_keep_rate(r, "--keep-rate") for r in args.keep_rate] if args.keep_rate else [None]
    check_writable(Path(args.output).parent, "--output's folder")  # a read-only or full disk: before exporting
    reduction = {"method": "evit", "keep_rate": rates[0]} if rates[0] is not None else None
    if args.reduction is not None:
        if args.keep_rate:
            raise LeanvitError("give --reduction or --keep-rate, not both")
        reduction = "none" if is_none_text(args.reduction) else ReductionSpec.parse(args.reduction,
                                                                                   what="--reduction")
    built = task_of_checkpoint(args.checkpoint).load_model(args.checkpoint, args.model, reduction,
                                                           img_size_arg(args.img_size), args.num_classes)
    model, hw = built.model, built.img_size
    in_chans = int(getattr(model, "pretrained_cfg", {}).get("input_size", (3,))[0] or 3)
    sizes = [hw]
    if args.dynamic_size:
        sizes.append((hw[0] + 32, hw[1] + 96))  # 224 -> also 256x320
    for rate in rates:
        if rate is not None:
            model.keep_rate = rate
        path = keep_rate_path(args.output, rate) if len(rates) > 1 else args.output
        spec = reduction_spec(model)
        what = built.description + (f" ({spec['method']} {_spec_value(spec)})" if spec else "")
        t0 = time.perf_counter()
        path = export_model(model, path, fmt, hw, dynamic_size=args.dynamic_size, in_chans=in_chans,
                            opset=args.opset)
        size_mb = path.stat().st_size / 2**20
        dims = "batch, height and width" if args.dynamic_size else "batch"
        extra = f" (each side >= {min_dynamic_side(model)} px)" if args.dynamic_size else ""
        print(f"exported {what} -> {path} ({fmt}, {size_mb:.1f} MB, {time.perf_counter() - t0:.1f} s); "
              f"input {hw[0]}x{hw[1]}, dynamic {dims}{extra}")
        if spec:
            print(f"note: the {spec['method']} setting ({_spec_value(spec)}) is fixed in this file; "
                  "export again with --keep-rate for another rate")
        if not args.no_verify:
            results = verify_export(model, path, fmt, sizes, in_chans=in_chans)
            worst = max(r.max_abs_diff for r in results)
            where = ", ".join(f"{h}x{w}" for h, w in sizes)
            runner = "onnxruntime" if fmt == "onnx" else "the loaded ExportedProgram"
            print(f"verified with {runner} against eager PyTorch on random inputs (batch 1 and 3 at {where}): "
                  f"max abs diff {worst:.3g}")
    return 0


def _spec_value(spec: dict) -> str:
    rate = spec.get("keep_rate")
    if rate is None:
        return ", ".join(f"{k}={v}" for k, v in spec.items() if k != "method")
    rate = "/".join(f"{r:g}" for r in rate) if isinstance(rate, (list, tuple)) else f"{rate:g}"
    return f"keep rate {rate}"
