"""``leanvit bench``: throughput, latency, peak memory and GMACs of models side by side
(library: :mod:`leanvit.measure`).

    leanvit bench --models deit_small_patch16_224,shunted_t --reduction evit:1.0,0.7,0.5 --img-sizes 224
    leanvit bench --models deit_small_patch16_224 --keep-rates none,0.7      # --keep-rates R = evit:R
    leanvit bench --models runs/seg/best.pth --reduction evit:0.7,0.5 tome:8 --restore keep unmerge

A checkpoint (an entry of --models that is a file or ends in .pth/.pt/.safetensors) is loaded by its task
(:mod:`leanvit.tasks`) and measured at its own input size, unreduced and at every point of --reduction (a
detection or segmentation checkpoint's with each --restore strategy; its own reduction, if it was trained with
one, is a point too), with the head's share of the time where the task has a head apart.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import torch

from leanvit.deploy.runtimes import RUNTIMES
from leanvit.errors import LeanvitError
from leanvit.measure import (
    BENCH_COLUMNS,
    benchmark_models,
    build_configurations,
    format_table,
    plot_benchmark,
    write_csv,
)
from leanvit.measure.load import LoadWatch
from leanvit.measure.report import HEAD_COLUMNS, LATENCY_COLUMNS, RUNTIME_COLUMNS
from leanvit.measure.trained import checkpoint_configurations
from leanvit.reduction import is_none_text, parse_strengths
from leanvit.reduction.reorg import check_keep_rate
from leanvit.tools._common import check_output_folder
from leanvit.utils import busy_note, environment, resolve_device

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def split_list(values: Optional[Sequence[str]]) -> List[str]:
    return [v.strip() for s in (values or []) for v in s.split(",") if v.strip()]


def parse_keep_rates(values: Optional[Sequence[str]]) -> List[Optional[float]]:
    out = []
    for v in split_list(values):
        out.append(None if is_none_text(v) else check_keep_rate(v, "--keep-rates value"))
    return out or [None]


def parse_reductions(values: Optional[Sequence[str]]) -> list:
    """``["evit:1.0,0.7", "evit-drop:0.5", "none"]`` ->
    [("evit", 1.0), ("evit", 0.7), ("evit-drop", 0.5), ("none", None)] (``"none"``: no reduction, even on a
    model built with one)."""
    out = []
    for text in values or []:
        if is_none_text(text):
            out.append(("none", None))
            continue
        method, strengths = parse_strengths(text)
        out += [(method.name, s) for s in (strengths or [method.none_value])]
    return out


CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin", ".ckpt")


def is_checkpoint_entry(entry: str) -> bool:
    """An entry of --models that names a checkpoint file rather than a model: an existing file, or a name
    ending in a checkpoint suffix (a missing one is then reported as a missing file)."""
    return entry.lower().endswith(CHECKPOINT_SUFFIXES) or Path(entry).is_file()


def parse_img_sizes(values: Optional[Sequence[str]]) -> List[Optional[tuple]]:
    out = []
    for v in split_list(values):
        parts = v.lower().split("x")
        try:
            hw = tuple(int(p) for p in parts)
        except ValueError:
            hw = ()
        if len(hw) == 1:
            hw = hw * 2
        if len(hw) != 2 or min(hw) < 1:
            raise LeanvitError(f"--img-sizes: expected S or HxW (e.g. 224 or 256x320), got '{v}'")
        out.append(hw)
    return out or [None]


def add_arguments(p) -> None:
    p.add_argument("--models", nargs="+", required=True, metavar="M1,M2",
                   help="model names and/or checkpoints written by leanvit train (any task), comma- or "
                        "space-separated (e.g. deit_small_patch16_224,shunted_t runs/seg/best.pth)")
    p.add_argument("--reduction", nargs="+", default=None, metavar="METHOD:V1,V2",
                   help="token reductions, e.g. evit:1.0,0.7,0.5 evit-drop:0.7 none ('none', 'off', '-': no reduction, "
                        "even on an evit_* model; default: the model as built); "
                        "applied to class-token ViTs only")
    p.add_argument("--restore", nargs="+", default=None, metavar="NAME",
                   help="detection/segmentation checkpoints: how the reduced backbone restores its token map, "
                        "each measured: keep, reactivate (or reactivate:N), fused (EViT); unmerge, reactivate "
                        "(ToMe); default: every strategy of each method")
    p.add_argument("--keep-rates", nargs="+", default=None, metavar="R",
                   help="EViT keep rates, e.g. none,1.0,0.7 (alias of --reduction none evit:1.0,0.7)")
    p.add_argument("--img-sizes", nargs="+", default=None, metavar="S",
                   help="input sizes, e.g. 224,288 or 256x320 (default: each model's own; a detection or "
                        "segmentation checkpoint is measured at its recipe's size only)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="default float32")
    p.add_argument("--warmup", type=int, default=2, help="untimed forward passes before timing (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported (default 5)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    p.add_argument("--num-classes", type=int, default=None, help="classes of the named models (checkpoints: "
                                                                  "their own)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    # --- runtimes and batch-1 latency ---
    p.add_argument("--runtime", nargs="+", default=["eager"], metavar="R1,R2",
                   help=f"runtimes to measure every model under: {', '.join(RUNTIMES)} (default eager); "
                        "compile = torch.compile (its compile time is shown), onnxruntime = an ONNX export run "
                        "by onnxruntime on the CPU (needs leanvit[export]); keep rates are fixed per entry")
    p.add_argument("--latency-repeats", type=int, default=20, metavar="N",
                   help="batch-1 latency: median and p90 over N interleaved runs (default 20; 0 = skip)")
    p.add_argument("--output", default="leanvit_bench", metavar="DIR",
                   help="folder for bench.csv and bench.png (default ./leanvit_bench)")


def _check_numbers(args) -> None:
    for flag, v, lo in (("--batch-size", args.batch_size, 1), ("--warmup", args.warmup, 0),
                        ("--repeats", args.repeats, 1), ("--threads", args.threads or 1, 1),
                        ("--latency-repeats", args.latency_repeats, 0)):
        if v < lo:
            raise LeanvitError(f"{flag} must be >= {lo}, got {v}")


def run(args) -> int:
    entries = list(dict.fromkeys(split_list(args.models)))
    if not entries:
        raise LeanvitError("--models: name at least one model or checkpoint")
    checkpoints = [e for e in entries if is_checkpoint_entry(e)]
    models = [e for e in entries if e not in checkpoints]
    if args.restore and not checkpoints:
        raise LeanvitError("--restore applies to detection/segmentation checkpoints; --models names none")
    reductions = parse_reductions(args.reduction) if args.reduction else []
    if args.keep_rates or not reductions:
        explicit = ("none", None) if args.keep_rates else (None, None)  # a written 'none': unreduced
        reductions += [("evit", r) if r is not None else explicit for r in parse_keep_rates(args.keep_rates)]
    img_sizes = parse_img_sizes(args.img_sizes)
    runtimes = split_list(args.runtime) or ["eager"]
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        raise LeanvitError(f"--runtime: unknown {', '.join(unknown)} (known: {', '.join(RUNTIMES)})")
    _check_numbers(args)
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    out = check_output_folder(args.output)
    notes: list = []
    configs = build_configurations(models, reductions, img_sizes, args.num_classes, notes) if models else {}
    parts: dict = {}
    for path in checkpoints:
        c, p = checkpoint_configurations(path, reductions, args.restore, img_sizes, notes)
        configs.update(c)
        parts.update(p)
    header = (f"{environment(str(device))} | dtype={str(dtype).replace('torch.', '')} | batch={args.batch_size} | "
              f"warmup={args.warmup}, median of {args.repeats} interleaved runs")
    print(header, flush=True)
    load = LoadWatch()  # say the load at the start and the end, warn when busy
    print(load.line, flush=True)
    busy = busy_note(device)
    for n in notes + ([busy] if busy else []):
        print(f"note: {n}")
    rows = benchmark_models(configs, batch_size=args.batch_size, device=device, dtype=dtype, warmup=args.warmup,
                            repeats=args.repeats, memory=not args.no_memory, progress=not args.no_progress,
                            runtimes=runtimes, latency_repeats=args.latency_repeats, workdir=out / "onnx",
                            backbones=parts)
    columns = BENCH_COLUMNS[:1] + (RUNTIME_COLUMNS[:1] if runtimes != ["eager"] else ()) + BENCH_COLUMNS[1:]
    columns += ((RUNTIME_COLUMNS[1:] if runtimes != ["eager"] else ())
                + (LATENCY_COLUMNS if args.latency_repeats else ()))
    columns += HEAD_COLUMNS if any("head_share" in r for r in rows) else ()
    print(format_table(rows, columns))
    if args.latency_repeats:
        print(f"b1 ms: batch-1 latency, median and 90th percentile of {args.latency_repeats} interleaved runs")
    if "compile" in runtimes:
        print("compile/export (s): torch.compile's first call (compile) or ONNX export + session creation "
              "(onnxruntime); one compiled graph / ONNX file per keep rate")
    if not args.no_memory:
        print("peak mem: " + ("CUDA allocator peak of one forward pass minus what was allocated before it"
                              if device.type == "cuda" else
                              "peak size of the tensors alive together during one forward pass "
                              "(activations on top of the loaded model; kernel scratch buffers not counted)"))
    print("speed-up: img/s over the same model's first configuration at the same image size (a checkpoint's: "
          "its unreduced model)")
    if any("head_share" in r for r in rows):
        print(f"head share: 1 - backbone / whole-model time at batch {args.batch_size}, timed in the same interleaved "
              "run; the backbone part: input preparation, the ViT (with its reduction and restoration) and its "
              "feature maps; the head: everything after them (FPN neck, decoder, upsampling, box decoding)")
    load.stop()
    print(load.line)
    for r in rows:  # each row says under which load it was timed
        r["machine_load"] = load.line
    if load.warning and device.type == "cpu":
        print(f"warning: {load.warning}")
    csv_path = write_csv(rows, out / "bench.csv")
    png_path = plot_benchmark(rows, out / "bench.png", title=header)
    print(f"wrote {csv_path} and {png_path}")
    return 0
