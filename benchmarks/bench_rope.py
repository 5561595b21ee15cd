"""Token reduction on RoPE ViTs (DINOv3-S, EVA-02-S): speed-ups against the unreduced model and the token-count
bound, batch-1 latency, and what moving the rotary positions costs; every model timed interleaved in one run.

For each model (timm, random weights, fp32, inference mode):

- ``none``: the unreduced model; ``evit 0.7`` (blocks 3/6/9, fused token); ``tome 13`` (r = 13 per block,
  merged positions = size-weighted mean) and ``tome 13 dst`` (a merged token keeps its destination's position);
- ``bound evit`` / ``bound tome``: the unreduced model run at the reduced models' sequence lengths by truncation
  (``leanvit.measure.bound``): what each reduction could reach if its own work were free;
- ``evit 0.7 fixed-pos`` / ``tome 13 fixed-pos``: the reduced model with the rotary rows taken as the first rows
  of the table instead of moved with the tokens (same token counts, wrong positions): the difference to the
  real model is the cost of the position bookkeeping.

Targets (2 threads, batch 32, 224 px): EViT 0.7 and ToMe r=13 >= 1.5x and within 5% of their bound; batch 1 on
DINOv3-S: <= 0.75x the unreduced latency or within 5% of the batch-1 bound; position bookkeeping < 3%.

    python benchmarks/bench_rope.py [--models vit_small_patch16_dinov3 eva02_small_patch14_224]
        [--batch-sizes 32 1] [--repeats 7] [--threads 2] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from contextlib import contextmanager

import timm
import torch

import leanvit
from leanvit.measure import interleaved_measure
from leanvit.measure.bound import TokenCountBound, sequence_lengths
from leanvit.reduction import positions as positions_module
from leanvit.reduction import tome as tome_module
from leanvit.utils import environment

MODELS = ("vit_small_patch16_dinov3", "eva02_small_patch14_224")


@contextmanager
def positions_not_moved():
    """Positions that are the first rows of timm's table at the right count: no gather, no merged angles."""
    cls = positions_module.RotaryPositions
    take, merge = cls.take, tome_module.merge_positions

    def first(pos, n):
        return cls(pos.timm_rope[..., :n, :], None, None, pos.rotate_half, pos.num_prefix_tokens, pos.batch)

    cls.take = lambda self, index, append_identity=False: first(
        self, index.shape[1] - self.num_prefix_tokens + int(append_identity))
    tome_module.merge_positions = lambda pos, size, plan, N, layout=None: first(
        pos, N - plan.src.shape[1] - pos.num_prefix_tokens)
    try:
        yield
    finally:
        cls.take, tome_module.merge_positions = take, merge


class FixedPositions(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        with positions_not_moved():
            return self.model(x)


def configurations(name: str, size: int) -> dict:
    torch.manual_seed(0)
    base = timm.create_model(name, img_size=size).eval() if "eva02" in name else timm.create_model(name).eval()
    x = torch.randn(1, 3, size, size)
    evit = leanvit.apply_reduction(copy.deepcopy(base), "evit", keep_rate=0.7)
    tome = leanvit.apply_reduction(copy.deepcopy(base), "tome", r=13)
    tome_dst = leanvit.apply_reduction(copy.deepcopy(base), "tome", r=13, position="dst")
    return {"none": base, "evit 0.7": evit, "tome 13": tome, "tome 13 dst": tome_dst,
            "bound evit": TokenCountBound(base, sequence_lengths(evit, x)),
            "bound tome": TokenCountBound(base, sequence_lengths(tome, x)),
            "evit 0.7 fixed-pos": FixedPositions(evit), "tome 13 fixed-pos": FixedPositions(tome)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 1])
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="96 px, batch 2, two repeats: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.img_size, args.batch_sizes, args.repeats = 96, [2], 2
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"{environment('cpu')} | fp32, inference mode, {args.threads} threads, {args.img_size} px, median of "
          f"{args.repeats} interleaved runs | load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for name in args.models:
        models = configurations(name, args.img_size)
        for bs in args.batch_sizes:
            with torch.inference_mode():
                res = interleaved_measure(models, batch_size=bs, img_size=args.img_size, repeats=args.repeats,
                                          warmup=2, steps=1 if bs > 4 else 5)
            t0 = res["none"].latency_ms
            print(f"\n{name}, batch {bs}: ms per batch (speed-up over none)")
            for label, m in res.items():
                print(f"  {label:<20} {m.latency_ms:9.1f} ms  {t0 / m.latency_ms:5.2f}x   p90 {m.p90_ms:8.1f} ms")
            for method in ("evit", "tome"):
                red = res["evit 0.7" if method == "evit" else "tome 13"].latency_ms
                bound = res[f"bound {method}"].latency_ms
                fixed = res["evit 0.7 fixed-pos" if method == "evit" else "tome 13 fixed-pos"].latency_ms
                print(f"  {method}: {t0 / red:.2f}x, bound {t0 / bound:.2f}x, reduced / bound time {red / bound:.3f}, "
                      f"latency {red / t0:.2f}x of none, position bookkeeping {100 * (red / fixed - 1):+.1f}%")
        load = os.getloadavg()
        print(f"load average after {name}: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
