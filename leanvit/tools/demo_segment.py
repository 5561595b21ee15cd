"""``leanvit demo --task segment``: token reduction in a ViT segmenter, on the embedded scenes (``digits-seg``).

1. trains the plain-ViT segmenter with the light linear head (recipe ``vit_linear_seg_demo``: DeiT III-style,
   LayerScale, patch 8, 144 tokens at 96 px) and, for the head comparison, the same ViT under a small
   Semantic FPN (``vit_semfpn_seg_demo``);
2. sweeps EViT and ToMe at several strengths, each with every restoration strategy, off the shelf
   (mIoU, throughput and batch-1 latency measured side by side, Pareto fronts);
3. fine-tunes the ViT with EViT at keep rate 0.5 (``vit_linear_seg_evit_demo``, restore ``keep``) and with ToMe at
   r = 30 (``vit_linear_seg_tome_demo``, restore ``unmerge``: the same token budget) and places them among the
   sweep's points, with the Semantic FPN model and EViT 0.5 in blocks 1-2 restored by ``keep`` and
   by ``reactivate`` (EViT's default blocks of the depth-4 ViT, 1-3, leave no block to reactivate in);
4. writes ``OUTPUT/segment/report.md`` with the table, the Pareto picture, the chosen point (the fastest within
   1 mIoU point of the unreduced model) and the restoration comparison.
``--quick`` runs the same steps with tiny budgets (a smoke test; the figures then mean nothing).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List

from leanvit.dense import apply_dense_reduction
from leanvit.measure.load import LoadWatch
from leanvit.measure.report import format_table, write_csv
from leanvit.measure.sweep import choose, parse_grid, plot_pareto, run_sweep, sweep_columns
from leanvit.tasks import get_task
from leanvit.train import train
from leanvit.utils import environment

__all__ = ["run_segment", "SEGMENT_GRID"]

SEGMENT_GRID = ["evit:0.7,0.5", "tome:10,20,30"]
_QUICK = {"epochs": 1, "time_limit": 30, "max_train_batches": 3, "digits_dense": {"val_fraction": 0.05}}
_MAX_DROP = 0.01  # one mIoU point (eval prints mIoU as a fraction)
_THROUGHPUT_BATCH = 64


def _train(label: str, recipe: str, out: Path, quick: bool, progress: bool, **extra) -> dict:
    print(f"\n== {label}{' (quick)' if quick else ''}", flush=True)
    over = dict(_QUICK) if quick else {}
    over.update(extra)
    return train(recipe, device="cpu", progress=progress, output=str(out / recipe), overwrite=True, **over)


def run_segment(args) -> int:
    out = Path(args.output) / "segment"
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    t0 = time.perf_counter()
    task = get_task("segmentation")
    base = _train("ViT + linear head (vit_linear_seg_demo)", "vit_linear_seg_demo", out, args.quick, progress)
    fpn = _train("the same ViT + Semantic FPN (vit_semfpn_seg_demo)", "vit_semfpn_seg_demo", out, args.quick,
                 progress)
    tuned = _train("EViT 0.5 fine-tune, restore keep (vit_linear_seg_evit_demo)", "vit_linear_seg_evit_demo", out,
                   args.quick, progress, finetune=base["best"])
    tuned_tome = _train("ToMe r=30 fine-tune, restore unmerge (vit_linear_seg_tome_demo)", "vit_linear_seg_tome_demo",
                        out, args.quick, progress, finetune=base["best"])
    print("\n== sweep: EViT and ToMe x restorations, off the shelf", flush=True)
    first = task.load_model(base["best"])
    hw = first.img_size
    fpn_built = task.load_model(fpn["best"])
    bounds = [task.stride_bound(first), task.stride_bound(fpn_built)]
    extra = {"evit/keep 0.5 fine-tuned": (task.load_model(tuned["best"]).model, hw),
             "tome/unmerge 30 fine-tuned": (task.load_model(tuned_tome["best"]).model, hw),
             "semantic_fpn (unreduced)": (fpn_built.model, hw)}
    # EViT's default blocks of a depth-4 ViT (1, 2, 3) leave no block to reactivate in: blocks 1 and 2 do
    for restore in ("keep", "reactivate"):
        model = task.load_model(base["best"]).model
        apply_dense_reduction(model, {"method": "evit", "keep_rate": 0.5, "locations": [1, 2]}, restore=restore)
        extra[f"evit/{restore} 0.5, blocks 1-2"] = (model, hw)
    # Throughput at batch 64, 9 interleaved batches a model. At batch 16 (16 x 145 tokens of width 128) the
    # per-operation overhead of the small kernels dominated: a batch's p90 was 15-20% above its median and the
    # same computation (a fine-tune and its off-the-shelf twin) was timed 1.19x and 1.35x in one run; at
    # batch 64 the p90 is within 2-4% of the median. Latency (batch 1) is measured separately.
    quick = dict(limit_images=16, batch_size=16, repeats=1, latency_repeats=2, warmup=0) if args.quick else \
        dict(batch_size=_THROUGHPUT_BATCH, repeats=9, latency_repeats=10, warmup=2)
    load = LoadWatch()
    result = run_sweep(lambda s: first, parse_grid(SEGMENT_GRID), first.config["data"], config=first.config,
                       eval_batch_size=32, device="cpu", progress=progress, extra_models=extra, task=task, **quick)
    load.stop()
    rows = result.rows
    chosen = choose(rows, _MAX_DROP, score="val_miou")
    png = plot_pareto(rows, out / "pareto.png", title="ViT segmenter (linear head) on digits-seg: mIoU vs speed",
                      chosen=chosen, score="val_miou", score_label="val mIoU")
    write_csv(rows, out / "sweep.csv")
    table = format_table(rows, sweep_columns(task))
    print(table)
    seconds = time.perf_counter() - t0
    timing = f"throughput at batch {quick['batch_size']}, latency at batch 1, all points interleaved; {load.line}"
    (out / "report.md").write_text(_report(rows, table, chosen, png.name, base, fpn, bounds, args.quick, seconds,
                                           timing + (f". Warning: {load.warning}" if load.warning else "")))
    print(load.line)
    if load.warning:
        print(f"warning: {load.warning}")
    print(f"\nwrote {out / 'report.md'}, {png} and {out / 'sweep.csv'} ({seconds:.0f} s in all)")
    return 0


def _restorations(rows: List[dict]) -> str:
    """mIoU of each restoration at the same method and strength (off the shelf)."""
    by: Dict[tuple, Dict[str, float]] = {}
    for r in rows:
        if r.get("restore"):
            by.setdefault((r["method"], r["strength"]), {})[r["restore"]] = r["val_miou"]
    names = sorted({n for d in by.values() for n in d})
    lines = ["| method | strength | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for (method, strength), d in sorted(by.items()):
        lines.append(f"| {method} | {strength} | " + " | ".join(f"{d[n]:.4f}" if n in d else "-" for n in names)
                     + " |")
    return "\n".join(lines)


def _report(rows, table, chosen, png, base, fpn, bounds, quick, seconds, timing) -> str:
    b = rows[0]
    lin_b, fpn_b = bounds
    light = (f"linear head {base['best_metric']:.4f} vs Semantic FPN {fpn['best_metric']:.4f} (the best validation "
             "mIoU of each training run, on the whole validation split: what `leanvit eval` prints for its "
             "best.pth). "
             f"Their output strides bound them: perfect logits at stride {lin_b['stride']} (the linear head's) "
             f"would score {lin_b['val_miou']:.4f}, at stride {fpn_b['stride']} (the Semantic FPN's) "
             f"{fpn_b['val_miou']:.4f}: the digits' ink is a few pixels thin")
    if chosen is None or chosen is b:
        pick = f"no reduced point is within {_MAX_DROP * 100:g} mIoU point of the unreduced model."
    else:
        pick = (f"**{chosen['label']}**: mIoU {chosen['val_miou']:.4f} (drop {chosen['val_miou_drop'] * 100:.2f} "
                f"points), {chosen['speedup']:.2f}x the unreduced model's throughput.")
    title = "leanvit segmentation demo: token reduction in a ViT segmenter"
    return f"""# {title}{' (--quick: the figures mean nothing)' if quick else ''}

Data: ``digits-seg`` (the embedded scenes: digit scans on cluttered canvases, a label per pixel). Model: a
DeiT III-style ViT (patch 8, 144 tokens at 96 px) with the linear head (a 1x1 convolution on the patch map).
Reductions applied off the shelf to the trained model, each with every restoration strategy (keep /
reactivate / fused for EViT, unmerge / reactivate for ToMe), and an EViT and a ToMe fine-tune.
Machine: {environment("cpu")}; {timing}.
Total time: {seconds:.0f} s.

Light head: {light}.

Sweep (every row: its mIoU on {b['images']} validation images{', a subset: --quick' if quick else ''}, at
{b['img_size']}; the unreduced row is the linear-head model above, evaluated on these images):

{table}

Chosen point (fastest within {_MAX_DROP * 100:g} mIoU point): {pick}

![mIoU vs throughput and latency]({png})

## Restorations at the same strength (val mIoU, off the shelf)

{_restorations(rows)}
"""
