"""EViT vs vanilla DeiT-S: throughput and GMACs, measured side by side in one run.

timm's ``deit_small_patch16_224`` against leanvit's EViT version of the same weights at keep rates
1.0 ... 0.5 (fused, blocks 3/6/9). Inference mode, fp32, batch 32 on CPU by default; the models'
timed runs are interleaved so that drifts of a shared machine hit all of them alike.

Targets: keep 1.0 >= 0.97x vanilla, keep 0.7 >= 1.45x (the FLOPs bound is 1.52x).

    python benchmarks/bench_evit.py [--batch-size 32] [--repeats 7] [--device cpu] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import sys

import timm
import torch

import leanvit
from leanvit.measure import interleaved_measure
from leanvit.utils import environment

TARGETS = {1.0: 0.97, 0.7: 1.45}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--keep-rates", type=float, nargs="+", default=[1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    p.add_argument("--quick", action="store_true", help="batch 8, 3 repeats (a smoke run, not a measurement)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size, args.repeats, args.warmup = 8, 3, 1

    torch.manual_seed(0)
    vanilla = timm.create_model("deit_small_patch16_224").eval()
    models = {"deit_small (timm)": vanilla}
    for r in args.keep_rates:
        models[f"evit keep {r:.1f}"] = leanvit.apply_evit(copy.deepcopy(vanilla), keep_rate=r)
    macs = {name: leanvit.gmacs(m) for name, m in models.items()}

    print(f"EViT-DeiT-S vs timm deit_small_patch16_224 | {environment(args.device)} | dtype=float32 | "
          f"batch={args.batch_size} | warmup={args.warmup}, median of {args.repeats} interleaved runs")
    res = interleaved_measure(models, batch_size=args.batch_size, device=args.device, warmup=args.warmup,
                              repeats=args.repeats)
    base = res["deit_small (timm)"].img_per_s
    base_macs = macs["deit_small (timm)"]
    print(f"{'model':<20} {'GMACs':>6} {'img/s':>9} {'ms/batch':>9} {'speed-up':>9} {'FLOPs bound':>12}  target")
    failed = []
    for name, m in res.items():
        ratio = m.img_per_s / base
        bound = base_macs / macs[name]
        rate = None if name.startswith("deit") else float(name.split()[-1])
        target = TARGETS.get(rate)
        verdict = "" if target is None else (f">= {target:.2f}x " + ("ok" if ratio >= target else "MISSED"))
        if target is not None and ratio < target:
            failed.append(name)
        print(f"{name:<20} {macs[name]:6.2f} {m.img_per_s:9.1f} {m.latency_ms:9.1f} {ratio:8.2f}x "
              f"{bound:11.2f}x  {verdict}")
    if failed and not args.quick:
        print(f"targets missed: {', '.join(failed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
