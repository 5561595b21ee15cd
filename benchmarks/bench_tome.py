"""ToMe vs vanilla DeiT-S (and EViT beside): throughput and GMACs, measured side by side in one run.

timm's ``deit_small_patch16_224`` (random weights) against leanvit's ToMe version of the same weights
(``r`` tokens merged per block, proportional attention through SDPA) and EViT keep 0.7 (fused, blocks
3/6/9). Inference mode, fp32, batch 32, 2 threads by default; the timed runs are interleaved so that
drifts of a shared machine hit all models alike.

Target: ToMe r=13 >= 1.7x timm DeiT-S (published: 1.67x on a V100 for the explicit-softmax
implementation).

``--rows``: instead, the row moves token reduction is made of (``leanvit.reduction.rows``: whole rows through
``index_select`` / ``index_copy`` / ``index_add_`` on a (B x N, C) view) against ``gather`` / ``scatter`` /
``scatter_add_`` with an index expanded over the channels, interleaved, at the shapes ToMe and EViT meet
(the demo's ViT at batch 64, DeiT-S at batch 32, DeiT III-S at 512 px, batch 1); same values checked.

    python benchmarks/bench_tome.py [--batch-size 32] [--repeats 7] [--threads 2] [--r 13 8] [--quick] [--rows]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import timm
import torch

import leanvit
from leanvit.measure import interleaved_measure
from leanvit.utils import environment

TARGETS = {"tome r=13": 1.7}

# (B, N, C, rows moved): the demo segmenter's ViT at batch 64, DeiT-S at batch 32, DeiT III-S at 512 px
ROW_SHAPES = [(64, 145, 128, 115), (32, 197, 384, 184), (1, 1025, 384, 941)]


def _row_pairs(x: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> dict:
    """operation -> (channel-expanded gather / scatter, leanvit's row version) on the same tensors."""
    from leanvit.reduction.rows import add_rows_, put_rows, take_rows

    wide = index.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    return {"read": (lambda: x.gather(1, wide), lambda: take_rows(x, index)),
            "write": (lambda: x.scatter(1, wide, src), lambda: put_rows(x, index, src)),
            "add": (lambda: x.clone().scatter_add_(1, wide, src), lambda: add_rows_(x.clone(), index, src))}


class _Call(torch.nn.Module):
    """A function as a module (``interleaved_measure`` times modules; the input it passes is ignored)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, _ignored):
        return self.fn()


def bench_rows(repeats: int) -> int:
    """Row moves as leanvit does them against channel-expanded gather / scatter: median microseconds."""
    load = os.getloadavg()
    print(f"row moves | {environment('cpu')} | median of {repeats} interleaved runs of 20 calls | "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'B, N, C, rows':<22} {'operation':<10} {'gather/scatter us':>18} {'rows us':>9} {'speed-up':>9}")
    g = torch.Generator().manual_seed(0)
    for B, N, C, M in ROW_SHAPES:
        x = torch.randn(B, N, C, generator=g)
        src = torch.randn(B, M, C, generator=g)
        index = torch.argsort(torch.rand(B, N, generator=g), dim=1)[:, :M]
        for op, (old, new) in _row_pairs(x, index, src).items():
            if not torch.allclose(old(), new(), atol=1e-6):
                print(f"{op}: the row version differs from gather / scatter")
                return 1
            res = interleaved_measure({"old": _Call(old), "new": _Call(new)}, batch_size=1, img_size=8,
                                      warmup=2, repeats=repeats, steps=20)
            t_old, t_new = res["old"].latency_ms * 1e3, res["new"].latency_ms * 1e3
            print(f"{f'{B}, {N}, {C}, {M}':<22} {op:<10} {t_old:18.0f} {t_new:9.0f} {t_old / t_new:8.1f}x")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--r", type=int, nargs="+", default=[13])
    p.add_argument("--evit", type=float, nargs="*", default=[0.7], help="EViT keep rates measured beside")
    p.add_argument("--quick", action="store_true", help="batch 8, 3 repeats (a smoke run, not a measurement)")
    p.add_argument("--rows", action="store_true", help="time the row moves of token reduction instead (see above)")
    args = p.parse_args(argv)
    if args.rows:
        torch.set_num_threads(args.threads)
        return bench_rows(3 if args.quick else args.repeats)
    if args.quick:
        args.batch_size, args.repeats, args.warmup = 8, 3, 1
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    vanilla = timm.create_model("deit_small_patch16_224").eval()
    models = {"deit_small (timm)": vanilla}
    for r in args.r:
        models[f"tome r={r}"] = leanvit.apply_reduction(copy.deepcopy(vanilla), "tome", r=r)
    for k in args.evit:
        models[f"evit keep {k:g}"] = leanvit.apply_reduction(copy.deepcopy(vanilla), "evit", keep_rate=k)
    macs = {name: leanvit.gmacs(m) for name, m in models.items()}

    load = os.getloadavg()
    print(f"ToMe/EViT-DeiT-S vs timm deit_small_patch16_224 | {environment(args.device)} | dtype=float32 | "
          f"batch={args.batch_size} | warmup={args.warmup}, median of {args.repeats} interleaved runs | "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    res = interleaved_measure(models, batch_size=args.batch_size, device=args.device, warmup=args.warmup,
                              repeats=args.repeats)
    base = res["deit_small (timm)"].img_per_s
    base_macs = macs["deit_small (timm)"]
    print(f"{'model':<20} {'GMACs':>6} {'img/s':>9} {'ms/batch':>9} {'p90 ms':>9} {'speed-up':>9} "
          f"{'FLOPs bound':>12}  target")
    failed = []
    for name, m in res.items():
        ratio = m.img_per_s / base
        target = TARGETS.get(name)
        verdict = "" if target is None else (f">= {target:.2f}x " + ("ok" if ratio >= target else "MISSED"))
        if target is not None and ratio < target:
            failed.append(name)
        print(f"{name:<20} {macs[name]:6.2f} {m.img_per_s:9.1f} {m.latency_ms:9.1f} {m.p90_ms:9.1f} "
              f"{ratio:8.2f}x {base_macs / macs[name]:11.2f}x  {verdict}")
    if failed and not args.quick:
        print(f"targets missed: {', '.join(failed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
