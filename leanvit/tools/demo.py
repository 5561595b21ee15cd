"""``leanvit demo``: the main job, on the embedded digits, on CPU, in minutes.

1. trains a DeiT III-style ViT (recipe ``deit3_demo``),
2. fine-tunes its EViT version at keep rate 0.7 (``evit_demo``),
3. trains a small Shunted Transformer (``shunted_demo``),
4. evaluates them (and the DeiT III model reorganized off the shelf, without fine-tuning),
5. benchmarks them side by side (interleaved, same batch, one process),
6. draws which tokens the EViT model kept,
and writes ``OUTPUT/report.md`` with the table and two plots (accuracy vs throughput, kept tokens).
``--quick`` runs the same steps with short budgets (about 2 minutes; accuracy is then far from final).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List

import torch

from leanvit.data import build_eval_dataset
from leanvit.errors import LeanvitError
from leanvit.measure import benchmark_models
from leanvit.measure.load import LoadWatch
from leanvit.models.build import build_model
from leanvit.reduction.evit import apply_evit
from leanvit.tasks.classification_eval import evaluate
from leanvit.train import train
from leanvit.utils import environment, model_input_size
from leanvit.viz import render_kept_tokens

# per stage: recipe overrides for the full run and for --quick
_STAGES = {
    # fixed work (epochs, batches), never wall-time limits: a busy machine takes longer, same result
    "deit3": {"recipe": "deit3_demo", "quick": {"epochs": 2, "max_train_batches": 15}},
    "evit": {"recipe": "evit_demo", "quick": {"epochs": 1, "max_train_batches": 8}},
    "shunted": {"recipe": "shunted_demo", "quick": {"epochs": 1, "max_train_batches": 8}},
}
# --quick also validates every stage on one render of each validation scan instead of four (the same scans)
_QUICK_VAL = {"digits": {"val_renders": 1}}


_BENCH_BATCH = 256  # the demo models are tiny: a large batch keeps per-call overheads out of the ratios


def add_arguments(p) -> None:
    p.add_argument("--quick", action="store_true", help="short budgets (about 2 minutes), for a smoke test")
    p.add_argument("--output", default="demo_out", metavar="DIR", help="where runs, plots and report.md go")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    # the dense stage is its own run (two 5-minute detector trainings would push the default
    # demo past 10 minutes on 2 cores); see leanvit/tools/demo_dense.py
    p.add_argument("--task", default="classify", choices=("classify", "detect", "segment"),
                   help="classify (default: the ViT/EViT/Shunted classification demo), detect (a Shunted "
                        "detector beside a PVT v2 baseline on the embedded scenes, about 11 minutes) or segment "
                        "(a ViT segmenter, EViT/ToMe with each restoration swept, a reduced fine-tune)")


def _train_stage(name: str, out: Path, quick: bool, progress: bool, **extra) -> dict:
    st = _STAGES[name]
    over = {**st["quick"], **_QUICK_VAL} if quick else {}
    over.update(extra)
    print(f"\n== {name}: recipe {st['recipe']}{' (quick)' if quick else ''}", flush=True)
    # overwrite: a rerun of the demo rebuilds its runs (a run folder is otherwise never replaced silently)
    return train(st["recipe"], device="cpu", progress=progress, output=str(out / st["recipe"]), overwrite=True,
                 **over)


def _val_loader(cfg: dict, hw, model, batch_size: int = 128):
    ds = build_eval_dataset(cfg["data"], model, hw, config=cfg, split="val")
    return ds, torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)


def _load(ckpt: str):
    built = build_model(None, ckpt)
    return built.model, built.config


def annotate_apart(ax, points, labels, fontsize: int = 8) -> list:
    """Label each point right of it; a label that would overlap one placed before moves down (then up) in
    steps of its height until it overlaps none, with a thin line to its point. Returns the texts."""
    fig = ax.figure
    fig.canvas.draw()  # the final data limits: placement is in display space
    renderer = fig.canvas.get_renderer()
    placed, texts = [], []
    for (x, y), label in zip(points, labels):
        text = ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=fontsize)
        box = text.get_window_extent(renderer)
        dx = 6
        if box.x1 > ax.get_window_extent(renderer).x1:  # would leave the axes: left of the point instead
            dx = -6
            text.set_horizontalalignment("right")
            text.set_position((dx, 4))
            box = text.get_window_extent(renderer)
        step = box.height * 72 / fig.dpi + 2  # points
        for k in range(1, 40):
            if not any(box.overlaps(b) for b in placed):
                break
            dy = 4 - step * ((k + 1) // 2) * (1 if k % 2 else -1)
            text.set_position((dx, dy))
            box = text.get_window_extent(renderer)
        if text.get_position()[1] != 4:
            ax.annotate("", (x, y), xytext=(dx, text.get_position()[1] + box.height * 36 / fig.dpi),
                        textcoords="offset points", arrowprops=dict(arrowstyle="-", lw=0.5, color="0.5"))
        placed.append(box)
        texts.append(text)
    return texts


def _accuracy_plot(rows: List[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in rows:
        ax.scatter(r["img_per_s"], r["top1"], s=60)
    ax.margins(x=0.3, y=0.12)  # room for the labels right of the points
    ax.set_xlabel("throughput (images/s, CPU, fp32)")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title("digits: accuracy vs throughput")
    ax.grid(alpha=0.3)
    fig.tight_layout()  # before the labels: a layout change afterwards would move the points under them
    annotate_apart(ax, [(r["img_per_s"], r["top1"]) for r in rows], [r["label"] for r in rows])
    fig.savefig(path)
    plt.close(fig)
    return path


def run(args) -> int:
    if args.threads is not None:
        if args.threads < 1:
            raise LeanvitError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if getattr(args, "task", "classify") == "detect":
        from leanvit.tools.demo_dense import run_detect

        return run_detect(args)
    if getattr(args, "task", "classify") == "segment":
        from leanvit.tools.demo_segment import run_segment

        return run_segment(args)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    t0 = time.perf_counter()
    times: Dict[str, float] = {}
    load = LoadWatch()  # the report states the load and any stage stopped early
    print(load.line, flush=True)
    early: List[str] = []

    r = _train_stage("deit3", out, args.quick, progress)
    times["deit3"] = r["seconds"]
    early += [f"deit3: {r['stopped_early']}"] if r.get("stopped_early") else []
    deit3_ckpt = r["best"]
    r = _train_stage("evit", out, args.quick, progress, finetune=deit3_ckpt)
    times["evit"] = r["seconds"]
    early += [f"evit: {r['stopped_early']}"] if r.get("stopped_early") else []
    evit_ckpt = r["best"]
    r = _train_stage("shunted", out, args.quick, progress)
    times["shunted"] = r["seconds"]
    early += [f"shunted: {r['stopped_early']}"] if r.get("stopped_early") else []
    shunted_ckpt = r["best"]

    print("\n== evaluation", flush=True)
    deit3, cfg = _load(deit3_ckpt)
    evit, evit_cfg = _load(evit_ckpt)
    shunted, sh_cfg = _load(shunted_ckpt)
    off_shelf, _ = _load(deit3_ckpt)
    apply_evit(off_shelf, keep_rate=evit.keep_rate, locations=evit.evit_locations)
    models = {
        "DeiT III (deit3_demo)": (deit3, cfg, times["deit3"]),
        f"EViT/{evit.keep_rate} fine-tuned (evit_demo)": (evit, evit_cfg, times["evit"]),
        f"EViT/{evit.keep_rate} off the shelf": (off_shelf, cfg, 0.0),
        "Shunted (shunted_demo)": (shunted, sh_cfg, times["shunted"]),
    }
    rows = []
    for label, (m, c, secs) in models.items():
        hw = model_input_size(m)
        ds, loader = _val_loader(c, hw, m)
        res = evaluate(m, loader, progress=progress, desc=label[:20])
        rows.append({"label": label, "top1": res["top1"], "top5": res["top5"], "train_s": secs, "hw": hw})
        print(f"{label}: top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%", flush=True)

    print(f"\n== benchmark (interleaved, batch {_BENCH_BATCH}, fp32, inference mode)", flush=True)
    bench_rows = benchmark_models({r["label"]: (models[r["label"]][0], r["hw"]) for r in rows},
                                  batch_size=_BENCH_BATCH,
                                  repeats=3 if args.quick else 7, warmup=1 if args.quick else 2, memory=False,
                                  progress=progress)
    by_label = {b["label"]: b for b in bench_rows}
    base_ips = by_label[rows[0]["label"]]["img_per_s"]
    for r in rows:
        b = by_label[r["label"]]
        r.update(params_m=b["params_m"], gmacs=b["gmacs"], img_per_s=b["img_per_s"],
                 speedup=b["img_per_s"] / base_ips)

    print("\n== kept tokens", flush=True)
    ds, _ = _val_loader(evit_cfg, model_input_size(evit), evit)
    picks = [ds.image(i) for i in range(0, len(ds), max(1, len(ds) // 6))][:6]
    names = [f"val {i} (digit {ds[i][1]})" for i in range(0, len(ds), max(1, len(ds) // 6))][:6]
    kept_png = render_kept_tokens(evit, picks, out / "kept_tokens.png", names=names, class_names=list(ds.classes))
    acc_png = _accuracy_plot(rows, out / "accuracy_vs_throughput.png")
    report = _report(rows, times, environment("cpu"), args.quick, time.perf_counter() - t0, kept_png, acc_png, cfg)
    report += _sweep_section(out, deit3_ckpt, evit, args.quick, progress)  # leanvit sweep
    banner = truth_banner(early, load.stop())
    report = report.replace("\n\n", "\n\n" + banner + "\n\n", 1) if banner else report
    (out / "report.md").write_text(report + f"\n{load.line}.\n")
    if banner:
        print("\n" + banner)
    print("\n" + _table(rows))
    print(load.line)
    print(f"\nwrote {out / 'report.md'}, {acc_png}, {kept_png} ({time.perf_counter() - t0:.0f} s in all)")
    return 0


def truth_banner(early: List[str], load: "LoadWatch") -> str:
    """Bold lines for the top of the report: stages stopped before their recipe's end, a busy machine."""
    lines = [f"**Warning: {e}; its accuracy is not the recipe's.**" for e in early]
    if load.warning:
        lines.append(f"**Warning: {load.warning}.**")
    return "\n\n".join(lines)


def _table(rows: List[dict]) -> str:
    lines = ["| model | params (M) | GMACs | val top-1 (%) | img/s | speed-up | train time (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        train_s = f"{r['train_s']:.0f}" if r["train_s"] else "0 (no training)"
        lines.append(f"| {r['label']} | {r['params_m']:.2f} | {r['gmacs']:.4f} | {r['top1']:.2f} | "
                     f"{r['img_per_s']:.0f} | {r['speedup']:.2f}x | {train_s} |")
    return "\n".join(lines)


def _report(rows, times, env: str, quick: bool, seconds: float, kept_png: Path, acc_png: Path, cfg: dict) -> str:
    d = cfg.get("digits") or {}
    return f"""# leanvit demo report{' (--quick: short budgets, accuracy not final)' if quick else ''}

Data: the embedded digits (real scikit-learn scans on {d.get('canvas_size', 32)} px cluttered canvases, split
by source scan; validation images fixed). Throughput: {env}; batch {_BENCH_BATCH}, fp32, inference mode, models
interleaved in one run, median of repeats. Speed-up is relative to the DeiT III model.

{_table(rows)}

Total time: {seconds:.0f} s.

![accuracy vs throughput]({acc_png.name})

Which patches the EViT model kept after each reorganizing layer (removed or fused patches are black):

![kept tokens]({kept_png.name})
"""


# ---------------------------------------------------------------------------------------------------------
# a `leanvit sweep` of the DeiT III demo model (EViT fused / dropping, ToMe) with the fine-tuned
# EViT model among the points; the Pareto picture and the chosen point go into report.md.
_SWEEP = {"full": dict(grid=["evit:1.0,0.9,0.8,0.7,0.6,0.5", "evit-drop:0.7,0.5", "tome:2,4,6,8"], limit=None,
                       repeats=5, latency_repeats=15, max_drop=1.0),
          "quick": dict(grid=["evit:0.7", "evit-drop:0.7", "tome:4"], limit=200, repeats=2, latency_repeats=5,
                        max_drop=1.0)}


def _sweep_section(out: Path, deit3_ckpt: str, evit_model, quick: bool, progress: bool) -> str:
    """Run the sweep, write ``sweep.csv`` / ``pareto.png`` into ``out`` and return the report's section."""
    from leanvit.measure.report import format_table, write_csv
    from leanvit.measure.sweep import SWEEP_COLUMNS, apply_line, choose, parse_grid, plot_pareto, run_sweep

    st = _SWEEP["quick" if quick else "full"]
    print("\n== sweep (accuracy vs throughput and batch-1 latency)", flush=True)
    built = build_model(None, deit3_ckpt)
    result = run_sweep(lambda size: (built.model, built.img_size), parse_grid(st["grid"]), built.config["data"],
                       config=built.config, batch_size=_BENCH_BATCH, limit_images=st["limit"],
                       repeats=st["repeats"], latency_repeats=st["latency_repeats"], progress=progress,
                       extra_models={"evit fine-tuned": evit_model})
    rows = result.rows
    write_csv(rows, out / "sweep.csv")
    chosen = choose(rows, max_drop=st["max_drop"])
    png = plot_pareto(rows, out / "pareto.png", title="deit3_demo on the digits: accuracy vs speed", chosen=chosen)
    table = format_table(rows, SWEEP_COLUMNS)
    print(table)
    if chosen is None:
        pick = f"No configuration stays within {st['max_drop']:g} top-1 points of the unreduced model."
    else:
        opts, py = apply_line(chosen)
        pick = (f"Chosen (fastest within {st['max_drop']:g} top-1 points of the unreduced model): "
                f"**{chosen['label']}**: top-1 {chosen['top1']:.2f}% (drop {chosen['top1_drop']:.2f}), "
                f"{chosen['speedup']:.2f}x throughput, batch-1 latency {chosen['latency_ms']:.2f} ms. "
                f"Apply it with `leanvit eval --checkpoint {deit3_ckpt} --data digits {opts}` or `{py}`.")
    return f"""
## Sweep: which reduction, at which strength (`leanvit sweep`)

The DeiT III demo model with EViT (fused, dropping) and ToMe applied off the shelf at several strengths,
and the EViT fine-tuned model, on {rows[0]['images']} validation images; throughput at batch {_BENCH_BATCH} and
batch-1 latency (median, p90) measured for all points in one interleaved run. Drop: top-1 points below
the unreduced model; pareto: on the front of top-1 vs throughput (thr) / latency (lat).

```
{table}
```

{pick}

![Pareto front]({png.name})
"""
