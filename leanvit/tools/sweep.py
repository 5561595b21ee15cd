"""``leanvit sweep``: which token reduction, at which strength and input size, costs how much accuracy on
your model and data and buys how much speed on this machine (library: :mod:`leanvit.measure.sweep`).

    leanvit sweep --checkpoint runs/deit3_demo/best.pth --data digits \\
        --reduction evit:1.0,0.9,0.8,0.7,0.6,0.5 tome:0,4,8,12,16 evit-drop:0.7,0.5 --max-drop 0.5
    leanvit sweep --model deit_small_patch16_224 --checkpoint deit_s.pth --data /data/imagenet \\
        --reduction evit:0.7 tome:8,13 --img-sizes 224,256 --limit-images 2000 --target-speedup 1.5

On a detection or segmentation checkpoint the points are ranked by mAP (with mAP@0.5 and AP small beside
it) or mIoU, measured on the whole model at the recipe's input size (the checkpoint's task says how:
:mod:`leanvit.tasks`).

Prints a table (the task's metrics, e.g. val top-1/top-5, drop from the unreduced model, GMACs, img/s at
--batch-size, speed-up, batch-1 latency median and p90, Pareto membership), writes sweep.csv and pareto.png
into --output, and with --max-drop / --target-speedup the chosen configuration with the command and Python
line applying it.
"""
from __future__ import annotations

import json
import shlex

import torch

from leanvit.errors import LeanvitError
from leanvit.measure.load import LoadWatch
from leanvit.measure.report import format_table, write_csv
from leanvit.measure.sweep import apply_line, choose, parse_grid, plot_pareto, run_sweep, sweep_columns
from leanvit.tasks import check_data, task_of_checkpoint
from leanvit.tools._common import add_data_overrides, check_output_folder, data_overrides_from_args
from leanvit.utils import busy_note, environment, img_size_arg, resolve_device


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, metavar="M",
                   help="model name (optional with a checkpoint written by leanvit train)")
    p.add_argument("--checkpoint", default=None, metavar="PATH", help="local weights (.pth/.pt/.safetensors)")
    p.add_argument("--data", required=True, metavar="DATA",
                   help="evaluation data, as for leanvit eval (read with the data options the checkpoint records)")
    add_data_overrides(p)
    p.add_argument("--reduction", nargs="+", default=["none"], metavar="METHOD:V1,V2",
                   help="the grid, e.g. evit:1.0,0.9,0.8,0.7,0.6,0.5 tome:0,4,8,12,16 evit-drop:0.7,0.5 "
                        "(the unreduced model is always measured)")
    p.add_argument("--restore", nargs="+", default=None, metavar="NAME",
                   help="detection/segmentation checkpoints: the restoration strategies to sweep for each method, "
                        "e.g. keep reactivate fused unmerge (default: every strategy of each method)")
    p.add_argument("--img-sizes", nargs="+", default=None, metavar="S",
                   help="input sizes besides the model's own, e.g. 224,256,288 or 256x320")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--max-drop", type=float, default=None, metavar="PTS",
                   help="choose the fastest point within PTS points of the unreduced model's metric (top-1 in "
                        "percent; mAP / mIoU as the fractions eval prints, e.g. 0.01 = one point)")
    p.add_argument("--target-speedup", type=float, default=None, metavar="X",
                   help="choose the most accurate point at least X times faster (with --max-drop: both)")
    p.add_argument("--by", choices=("throughput", "latency"), default="throughput",
                   help="what 'fastest' means for --max-drop (default throughput)")
    p.add_argument("--limit-images", type=int, default=None, metavar="N",
                   help="evaluate on N images spread over the data (a quick look at a large set)")
    p.add_argument("--batch-size", type=int, default=64, help="batch of the throughput measurement (default 64)")
    p.add_argument("--eval-batch-size", type=int, default=64, help="batch of the accuracy evaluation (default 64)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs at --batch-size; median (default 5)")
    p.add_argument("--latency-repeats", type=int, default=15, help="timed batch-1 calls (default 15)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    p.add_argument("--workers", type=int, default=0, help="data-loading processes (default 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--output", default="leanvit_sweep", metavar="DIR",
                   help="folder for sweep.csv and pareto.png (default ./leanvit_sweep)")


def _img_sizes(values):
    out = []
    for v in (x.strip() for s in values or [] for x in s.split(",") if x.strip()):
        try:
            hw = tuple(int(p) for p in v.lower().split("x"))
        except ValueError:
            hw = ()
        hw = hw * 2 if len(hw) == 1 else hw
        if len(hw) != 2 or min(hw) < 1:
            raise LeanvitError(f"--img-sizes: expected S or HxW (e.g. 224 or 256x320), got '{v}'")
        out.append(hw)
    return out


def run(args) -> int:
    if args.model is None and args.checkpoint is None:
        raise LeanvitError("give --model and/or --checkpoint")
    if args.max_drop is not None and args.max_drop < 0:
        raise LeanvitError(f"--max-drop must be >= 0, got {args.max_drop}")
    if args.target_speedup is not None and args.target_speedup <= 0:
        raise LeanvitError(f"--target-speedup must be > 0, got {args.target_speedup}")
    for flag, v in (("--batch-size", args.batch_size), ("--eval-batch-size", args.eval_batch_size),
                    ("--repeats", args.repeats), ("--latency-repeats", args.latency_repeats),
                    ("--limit-images", 1 if args.limit_images is None else args.limit_images)):
        if v < 1:
            raise LeanvitError(f"{flag} must be >= 1, got {v}")
    if args.threads is not None:
        if args.threads < 1:
            raise LeanvitError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    grid = parse_grid(args.reduction)
    sizes = _img_sizes(args.img_sizes)
    out = check_output_folder(args.output)
    device = resolve_device(args.device)
    task = task_of_checkpoint(args.checkpoint)
    check_data(task, args.data, f"{args.checkpoint}'s task" if args.checkpoint else "the model's task")

    def build(size):
        return task.load_model(args.checkpoint, args.model, None, None if size is None else img_size_arg(list(size)),
                               args.num_classes, data=args.data, **data_overrides_from_args(args))

    print(f"{environment(str(device))} | batch {args.batch_size} (throughput, median of {args.repeats}) and 1 "
          f"(latency, median/p90 of {args.latency_repeats}), all points interleaved", flush=True)
    busy = busy_note(device)
    if busy:
        print(f"note: {busy}")
    first = build(None)  # fail early (and record the checkpoint's config) before the grid starts
    cache = {None: first}
    load = LoadWatch()
    result = run_sweep(lambda s: cache.pop(s) if s in cache else build(s), grid, args.data, [None] + sizes,
                       config=first.config, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
                       limit_images=args.limit_images, device=device, warmup=args.warmup, repeats=args.repeats,
                       latency_repeats=args.latency_repeats, workers=args.workers, progress=not args.no_progress,
                       task=task, variant_options={"restore": args.restore} if args.restore else None)
    load.stop()
    rows = result.rows
    score, score_head, fmt = task.sweep_columns[0]
    name = task.title(first)
    options = task.data_record(first, args.data)
    for r in rows:  # every row names what was measured and under which load
        r.setdefault("restore", "-")
        r.update(model=first.name, checkpoint=args.checkpoint or "", data=str(args.data),
                 data_options=json.dumps(options, sort_keys=True) if options else "", machine_load=load.line)
    print(f"{name} on {args.data} ({rows[0]['images']} images); drop = {score_head} points below the unreduced "
          "model; pareto: on the front of it vs throughput (thr) / batch-1 latency (lat)")
    print(format_table(rows, sweep_columns(task)))
    print(load.line)
    if load.warning and device.type == "cpu":
        print(f"warning: {load.warning}")
    csv_path = write_csv(rows, out / "sweep.csv")
    chosen = choose(rows, args.max_drop, args.target_speedup,
                    speed_key="latency_ms" if args.by == "latency" else "img_per_s", score=score,
                    score_higher=task.higher_is_better)
    png = plot_pareto(rows, out / "pareto.png", title=f"{name} on {args.data}: {score_head} vs speed", chosen=chosen,
                      score=score, score_label=f"val {score_head}", score_higher=task.higher_is_better)
    print(f"wrote {csv_path} and {png}")
    if args.max_drop is not None or args.target_speedup is not None:
        want = " and ".join(s for s in (f"{score_head} drop <= {args.max_drop:g}" if args.max_drop is not None else "",
                                        f"speed-up >= {args.target_speedup:g}x" if args.target_speedup is not None
                                        else "") if s)
        if chosen is None:
            print(f"no configuration meets {want}")
        else:
            opts, py = apply_line(chosen)
            src = (f"--checkpoint {shlex.quote(args.checkpoint)}" if args.checkpoint else "") + \
                  (f" --model {args.model}" if args.model else "")
            print(f"chosen ({want}): {chosen['label']}: {score_head} {chosen[score]:{fmt}} (drop "
                  f"{chosen[score + '_drop']:{fmt}}), {chosen['speedup']:.2f}x throughput, batch-1 "
                  f"{chosen['latency_ms']:.2f} ms")
            print(f"  command: leanvit eval {src.strip()} --data {shlex.quote(str(args.data))} {opts}".rstrip())
            print(f"  python:  {py}")
    return 0
