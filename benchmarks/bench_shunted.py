"""Shunted Transformer: SDPA attention vs the reference's explicit softmax, and timm's PVT v2 as peers.

leanvit's ``shunted_t`` / ``shunted_s`` with attention through ``F.scaled_dot_product_attention`` (the default)
and through the explicit ``softmax(q k^T) v`` of the official code, on the *same weights*, at 224 and
512x512; timm's ``pvt_v2_b1`` / ``pvt_v2_b2`` (the closest peers in size) at 224. Inference mode, fp32,
batch 16 on CPU by default. Throughput is the median of interleaved timed runs after warm-up
(``leanvit.measure.interleaved_measure``); peak memory is the extra memory one forward pass needs
(``leanvit.measure.forward_peak_memory_mb``, which says how it counts on CPU), measured first, so that its
untimed pass also warms the models up.

Targets: SDPA path no slower than the explicit path at 224 (img/s ratio >= 1.00);
lower peak memory than the explicit path at 512x512 (ratio < 1.00).

    python benchmarks/bench_shunted.py [--batch-size 16] [--repeats 7] [--repeats-512 3] [--device cpu] [--quick]

A full run on 2 CPU cores takes about 10 minutes (shunted_s at 512x512, batch 16, is ~550 GMACs a pass).
"""
from __future__ import annotations

import argparse
import copy
import sys

import timm
import torch

import leanvit
from leanvit.measure import forward_peak_memory_mb, interleaved_measure
from leanvit.models.shunted import set_fused_attn
from leanvit.utils import environment

SPEED_TARGET = 1.00  # SDPA img/s / explicit img/s at 224, at least
MEMORY_TARGET = 1.00  # SDPA peak / explicit peak at 512, below


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7, help="timed runs at 224 (median reported)")
    p.add_argument("--repeats-512", type=int, default=3, help="timed runs at 512x512 (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="extra untimed passes per model before timing "
                   "at 224 (after the pass of the memory measurement)")
    p.add_argument("--warmup-512", type=int, default=0, help="the same at 512x512")
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", nargs="+", default=["shunted_t", "shunted_s"])
    p.add_argument("--peers", nargs="+", default=["pvt_v2_b1", "pvt_v2_b2"])
    p.add_argument("--quick", action="store_true", help="batch 2, 1 repeat, 224 and 256 (a smoke run)")
    args = p.parse_args(argv)
    sizes = [224, 512]
    if args.quick:
        args.batch_size, args.repeats, args.repeats_512, args.warmup, args.warmup_512 = 2, 1, 1, 0, 0
        sizes = [224, 256]

    torch.manual_seed(0)
    shunted = {}
    for name in args.models:
        sdpa = timm.create_model(name).eval()
        explicit = set_fused_attn(copy.deepcopy(sdpa), False)  # same weights, explicit softmax
        shunted[name] = {"sdpa": sdpa, "explicit": explicit}
    peers = {name: timm.create_model(name).eval() for name in args.peers}

    print(f"Shunted Transformer: SDPA vs explicit softmax, timm PVT v2 peers | {environment(args.device)} | "
          f"dtype=float32 | batch={args.batch_size} | inference_mode | memory pass + warmup "
          f"{args.warmup} (224) / {args.warmup_512} ({sizes[1]}), median of "
          f"{args.repeats} (224) / {args.repeats_512} ({sizes[1]}) interleaved runs")
    rows = []
    for size in sizes:
        group = {f"{n} {path}": m for n, paths in shunted.items() for path, m in paths.items()}
        if size == 224:
            group.update({f"{n} (timm)": m for n, m in peers.items()})
        reps = args.repeats if size == 224 else args.repeats_512
        # peak memory first: its untimed pass also warms every model up (kernel caches, allocator)
        mems = {}
        for label, model in group.items():
            mems[label] = forward_peak_memory_mb(model, args.batch_size, size, args.device)
            print(f"  {label} @ {size}: peak {_fmt(mems[label], '.0f')} MiB", file=sys.stderr, flush=True)
        res = interleaved_measure(group, batch_size=args.batch_size, img_size=size, device=args.device,
                                  warmup=args.warmup if size == 224 else args.warmup_512, repeats=reps)
        for label, model in group.items():
            rows.append(dict(label=label, size=size, gmacs=leanvit.gmacs(model, size),
                             params=sum(q.numel() for q in model.parameters()) / 1e6,
                             img_s=res[label].img_per_s, ms=res[label].latency_ms, mem=mems[label]))
            print(f"  {label} @ {size}: {res[label].img_per_s:.1f} img/s", file=sys.stderr, flush=True)

    by = {(r["label"], r["size"]): r for r in rows}
    for r in rows:
        name, _, path = r["label"].partition(" ")
        ref = by.get((f"{name} explicit", r["size"]))
        r["speed"] = r["img_s"] / ref["img_s"] if path in ("sdpa", "explicit") and ref else None
        r["memr"] = (r["mem"] / ref["mem"] if path in ("sdpa", "explicit") and ref and r["mem"] is not None
                     and ref["mem"] else None)

    head = (f"{'model':<22} {'size':>7} {'params(M)':>9} {'GMACs':>7} {'img/s':>8} {'ms/batch':>9} "
            f"{'peak MiB':>9} {'speed vs expl':>13} {'mem vs expl':>11}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['label']:<22} {r['size']:>3}x{r['size']:<3} {r['params']:9.2f} {r['gmacs']:7.2f} "
              f"{r['img_s']:8.1f} {r['ms']:9.1f} {_fmt(r['mem'], '9.0f'):>9} "
              f"{_fmt(r['speed'], '12.2f') + 'x' if r['speed'] else 'n/a':>13} "
              f"{_fmt(r['memr'], '10.2f') + 'x' if r['memr'] else 'n/a':>11}")

    print("\nTargets")
    failed = []
    for name in args.models:
        s = by[(f"{name} sdpa", 224)]["speed"]
        ok = s >= SPEED_TARGET
        failed += [] if ok else [f"{name} speed@224"]
        print(f"  {name}: SDPA / explicit img/s at 224 = {s:.2f}x (target >= {SPEED_TARGET:.2f}x) "
              f"{'ok' if ok else 'MISSED'}")
        m = by[(f"{name} sdpa", sizes[1])]["memr"]
        ok = m is not None and m < MEMORY_TARGET
        failed += [] if ok else [f"{name} memory@{sizes[1]}"]
        print(f"  {name}: SDPA / explicit peak memory at {sizes[1]}x{sizes[1]} = {_fmt(m, '.2f')}x "
              f"(target < {MEMORY_TARGET:.2f}x) {'ok' if ok else 'MISSED'}")
    pairs = list(zip(args.models, args.peers))
    if pairs:
        print("Peers at 224 (img/s of leanvit's SDPA path / timm's PVT v2; no target)")
        for mine, peer in pairs:
            a, b = by[(f"{mine} sdpa", 224)], by.get((f"{peer} (timm)", 224))
            if b:
                print(f"  {mine} / {peer}: {a['img_s'] / b['img_s']:.2f}x img/s, "
                      f"{a['gmacs'] / b['gmacs']:.2f}x GMACs, {a['params'] / b['params']:.2f}x params")
    if failed and not args.quick:
        print(f"targets missed: {', '.join(failed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
