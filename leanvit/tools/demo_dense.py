"""``leanvit demo --task detect``: the dense stage of the main job, on the embedded scenes (``digits-det``).

1. trains a small Shunted detector (recipe ``shunted_t_fcos_demo``: one block per stage, FCOS, 96 px),
2. trains a PVT v2-style baseline of similar cost with the same head, data and budget
   (``pvt_v2_fcos_demo``: timm ``pvt_v2`` in a small config, single-rate spatial-reduction attention),
3. evaluates both on the fixed validation scenes (COCO mAP, mAP@0.5, AP small/medium),
4. draws both models' predicted boxes on the same validation scenes,
and writes ``OUTPUT/detect/report.md``. It is a separate command rather than a stage of the default demo
because two 5-minute trainings would push the default demo past 10 minutes on 2 cores. ``--quick`` runs
the same steps with tiny budgets (a smoke test; the figures then mean nothing).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List

from leanvit.checkpoints import read_checkpoint
from leanvit.measure import gmacs
from leanvit.measure.load import LoadWatch
from leanvit.tasks import task_of_checkpoint
from leanvit.train import train
from leanvit.utils import environment

__all__ = ["run_detect", "DETECT_STAGES", "verdict"]

DETECT_STAGES = {
    "Shunted (shunted_t_fcos_demo)": "shunted_t_fcos_demo",
    "PVT v2 baseline (pvt_v2_fcos_demo)": "pvt_v2_fcos_demo",
}
_QUICK = {"epochs": 1, "time_limit": 30, "max_train_batches": 3, "digits_dense": {"val_fraction": 0.05}}
_PICTURES = 8


def _train(label: str, recipe: str, out: Path, quick: bool, progress: bool) -> dict:
    print(f"\n== {label}{' (quick)' if quick else ''}", flush=True)
    return train(recipe, device="cpu", progress=progress, output=str(out / recipe), **(_QUICK if quick else {}))


def _evaluate(ckpt: str, progress: bool) -> dict:
    task = task_of_checkpoint(ckpt)
    built = task.load_model(ckpt)
    model, config, classes = built.model, built.config, list(built.checkpoint.get("classes") or [])
    ds, loader = task.eval_data(built, config["data"], batch_size=32)
    res = task.evaluate(model, loader, progress=progress, dataset=ds)
    body = model.backbone.body
    hw = (int(config["min_size"]), int(config["min_size"])) if config.get("min_size") else (96, 96)
    res.update(backbone_params_m=sum(p.numel() for p in body.parameters()) / 1e6,
               params_m=sum(p.numel() for p in model.parameters()) / 1e6,
               backbone_gmacs=gmacs(body, hw), model=model, config=config, classes=classes, dataset=ds, built=built,
               task=task)
    return res


def run_detect(args) -> int:
    out = Path(args.output) / "detect"
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    t0 = time.perf_counter()
    load = LoadWatch()  # the report states the machine load, as `leanvit demo` does
    print(load.line, flush=True)
    rows: List[Dict] = []
    for label, recipe in DETECT_STAGES.items():
        r = _train(label, recipe, out, args.quick, progress)
        steps = int(read_checkpoint(r["last"]).get("step", 0))
        ev = _evaluate(r["best"], progress)
        evals = {h["epoch"]: h for h in r["history"] if "val_map" in h}  # per-epoch validation, for equal steps
        rows.append({"label": label, "recipe": recipe, "train_s": r["seconds"], "steps": steps, "evals": evals,
                     "steps_per_s": steps / max(r["seconds"], 1e-9), **ev})
        print(f"{label}: mAP {_fmt(ev['val_map'])}  mAP@0.5 {_fmt(ev['val_map50'])}  "
              f"AP small {_fmt(ev['val_map_small'])}  "
              f"({steps} steps in {r['seconds']:.0f} s)", flush=True)
    print("\n== predicted boxes", flush=True)
    pictures = []
    ds = rows[0]["dataset"]
    picks = [int(i * len(ds) / _PICTURES) for i in range(min(_PICTURES, len(ds)))]
    images = [ds.image(i) for i in picks]
    for r in rows:
        folder = out / f"boxes_{r['recipe']}"
        paths = r["task"].draw(r["built"], images, folder, [f"val {i}" for i in picks], class_names=r["classes"],
                               score_thresh=0.3)
        pictures.append((r["label"], paths[-1].relative_to(out)))
    seconds = time.perf_counter() - t0
    report = _report(rows, pictures, environment("cpu"), args.quick, seconds, load.stop())
    (out / "report.md").write_text(report)
    print("\n" + _table(rows))
    print(load.line)
    if load.warning:
        print(f"warning: {load.warning}")
    print(f"\nwrote {out / 'report.md'} and {', '.join(str(out / p) for _, p in pictures)} ({seconds:.0f} s in all)")
    return 0


def _fmt(v) -> str:
    return "n/a" if v is None or v < 0 else f"{v:.3f}"  # undefined (None; COCOeval's -1 in older histories)


def _table(rows: List[dict]) -> str:
    lines = ["| model | backbone params (M) | backbone GMACs (96 px) | val mAP | mAP@0.5 | AP small | AP medium | "
             "train steps | train time (s) | steps/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['backbone_params_m']:.2f} | {r['backbone_gmacs']:.3f} | "
                     f"{_fmt(r['val_map'])} | "
                     f"{_fmt(r['val_map50'])} | {_fmt(r['val_map_small'])} | {_fmt(r['val_map_medium'])} | "
                     f"{r['steps']} | {r['train_s']:.0f} | {r['steps_per_s']:.2f} |")
    return "\n".join(lines)


def _equal_steps(rows: List[dict]) -> str:
    """The two models at the same number of steps: their last common validation epoch (same epoch length)."""
    common = sorted(set(rows[0]["evals"]) & set(rows[1]["evals"]))
    if not common:
        return ""
    e = common[-1]
    parts = [f"{r['label']} mAP {_fmt(r['evals'][e]['val_map'])}, mAP@0.5 {_fmt(r['evals'][e]['val_map50'])}, "
             f"AP small {_fmt(r['evals'][e]['val_map_small'])}" for r in rows]
    return f" At equal training (after epoch {e + 1}, the last both validated): " + "; ".join(parts) + "."


def verdict(rows: List[dict]) -> str:
    """Which model scored the higher val mAP, as the report says it: no winner when either score is
    undefined (None; COCOeval's -1 in older records), when both are 0.000 (neither detects anything yet) or
    when they tie at the shown precision."""
    a, b = rows[0], rows[1]
    if any(v is None or v < 0 for v in (a["val_map"], b["val_map"])):
        return "No comparison: the val mAP is undefined (the validation scenes hold no object to score against)."
    if round(a["val_map"], 3) == 0 and round(b["val_map"], 3) == 0:
        return "No winner: both models score 0.000 val mAP (neither detects the digits yet; train longer)."
    if round(a["val_map"], 3) == round(b["val_map"], 3):
        return f"No winner: both models score {a['val_map']:.3f} val mAP."
    better = a if a["val_map"] > b["val_map"] else b
    return f"Higher val mAP here: {better['label']}."


def _report(rows, pictures, env: str, quick: bool, seconds: float, load: LoadWatch = None) -> str:
    cfg = rows[0]["config"]
    d = cfg.get("digits_dense") or {}
    pics = "\n\n".join(f"{label}: predicted boxes (score >= 0.3) on the same validation scenes\n\n![{label}]({p})"
                       for label, p in pictures)
    a, b = rows[0], rows[1]
    load_lines = ""
    if load is not None:
        load_lines = f"\n{load.line}.\n" + (f"\n**Warning: {load.warning}.**\n" if load.warning else "")
    caveat = ""
    if min(a["steps"], b["steps"]) < 0.9 * max(a["steps"], b["steps"]):
        caveat = (f" **Caveat:** the two runs got {a['steps']} and {b['steps']} training steps in the same time "
                  f"budget (similar GMACs): the machine's load changed between them, so this comparison says as "
                  f"much about CPU share as about the backbones.")
    return f"""# leanvit detection demo{' (--quick: tiny budgets, the figures mean nothing)' if quick else ''}

Data: ``digits-det``, the embedded scenes: 1-{d.get('max_objects', 4)} real scikit-learn digit scans of
{d.get('min_digit', 12)}-{d.get('max_digit', 40)} px on {d.get('canvas_size', 96)} px cluttered canvases, \
split by source scan
({len(a['dataset'])} fixed validation scenes). Both detectors: torchvision FCOS, FPN of width
{(cfg.get('head_kwargs') or {}).get('fpn_channels', 256)} over strides 8/16/32, the same data, optimizer and time budget
({cfg.get('time_limit')} s, batch {cfg['batch_size']}). Metrics: pycocotools COCOeval (bbox); \
"small" is COCO's < 32x32 px.
Machine: {env}. CPU time is shared with whatever else runs: steps/s says how much training each model got.

{_table(rows)}

{verdict(rows)}{caveat}{_equal_steps(rows)} Total time: {seconds:.0f} s.
{load_lines}
{pics}
"""
