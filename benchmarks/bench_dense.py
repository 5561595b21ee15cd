"""Dense prediction at COCO size: Shunted-S vs PVT v2-b2 under RetinaNet and Mask R-CNN, one training step.

Each detector (``leanvit.dense.create_detector``, 80 classes, torchvision's transform at shorter side 800 /
longer side <= 1333) gets one 800x1333 image with 5 boxes (and masks for Mask R-CNN), batch 1, and runs
training steps (forward with the loss, backward, AdamW step) with gradient checkpointing on in the
backbone (``grad_checkpointing=True``; Shunted's stage-1 attention is what needs it, see the reference).

- **Peak memory** (first step, also the warm-up): the peak total size of the tensors the step creates that
  are alive at the same time, counted operator by operator with leanvit's ``_LiveTensorBytes`` torch
  dispatch mode (``leanvit/measure/memory.py``), which sees the forward, the checkpoint recomputation, the
  backward and the optimizer step: activations kept for the backward, gradients, AdamW's two state tensors
  per weight. Not counted: the weights and the input image themselves, and scratch buffers a kernel
  allocates and frees inside one call. Exact and repeatable on CPU; on CUDA, ``torch.cuda`` peak memory
  minus what was allocated before the step instead.
- **Seconds per step**: median of ``--repeats`` timed steps after that, models interleaved (A B C D A B ...)
  so that the load of a shared machine spreads over all of them.

Ratios are Shunted-S / PVT v2-b2 with the same head, measured side by side in this run; the machine load
(``uptime``) is printed with them. Random weights (the cost does not depend on them).

    python benchmarks/bench_dense.py [--repeats 1] [--size 800 1333] [--heads retinanet maskrcnn]
                                     [--backbones shunted_s pvt_v2_b2] [--no-checkpointing] [--quick]

On 2 busy CPU cores the full run takes 10-20 minutes and several GB of memory.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import leanvit  # noqa: F401  (registers shunted_*)
from leanvit.dense import create_detector
from leanvit.measure.memory import _LiveTensorBytes
from leanvit.utils import environment, machine_load, sync_device


def _sample(h: int, w: int, masks: bool, device):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, h, w, generator=g)
    boxes = []
    for _ in range(5):
        bw, bh = int(torch.randint(32, w // 3, (1,), generator=g)), int(torch.randint(32, h // 3, (1,), generator=g))
        x0, y0 = int(torch.randint(0, w - bw, (1,), generator=g)), int(torch.randint(0, h - bh, (1,), generator=g))
        boxes.append([x0, y0, x0 + bw, y0 + bh])
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.arange(5) * 7}
    if masks:
        m = torch.zeros(5, h, w, dtype=torch.uint8)
        for j, (x0, y0, x1, y1) in enumerate(boxes):
            m[j, y0:y1, x0:x1] = 1
        target["masks"] = m
    return [image.to(device)], [{k: v.to(device) for k, v in target.items()}]


class Case:
    def __init__(self, backbone: str, head: str, size, ckpt: bool, device):
        self.backbone, self.head = backbone, head
        torch.manual_seed(0)
        self.model = create_detector(head, backbone, 80, min_size=size[0], max_size=size[1],
                                     grad_checkpointing=ckpt).to(device).train()
        self.params_m = sum(p.numel() for p in self.model.parameters()) / 1e6
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=1e-4)
        self.images, self.targets = _sample(size[0], size[1], head == "maskrcnn", device)
        self.device = device
        self.peak_mb = None
        self.times = []

    def step(self) -> None:
        losses = self.model(self.images, self.targets)
        sum(losses.values()).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def measure_memory(self) -> None:
        if self.device.type == "cuda":
            sync_device(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.step()
            sync_device(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - before) / 2**20
            return
        owned = [*self.model.parameters(), *self.model.buffers(), *self.images]
        with _LiveTensorBytes(ignore={t.untyped_storage().data_ptr() for t in owned}) as counter:
            self.step()
        self.peak_mb = counter.peak / 2**20

    def time_step(self) -> None:
        sync_device(self.device)
        t = time.perf_counter()
        self.step()
        sync_device(self.device)
        self.times.append(time.perf_counter() - t)

    @property
    def seconds(self) -> float:
        return statistics.median(self.times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["shunted_s", "pvt_v2_b2"],
                   help="the first is compared with the second")
    p.add_argument("--heads", nargs="+", default=["retinanet", "maskrcnn"])
    p.add_argument("--size", nargs=2, type=int, default=[800, 1333], metavar=("SHORT", "LONG"),
                   help="input image height and width = torchvision's min_size/max_size")
    p.add_argument("--repeats", type=int, default=1, help="timed steps per model after the memory step")
    p.add_argument("--no-checkpointing", action="store_true", help="without gradient checkpointing")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="256x320 input, a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.size = [256, 320]
    device = torch.device(args.device)
    ckpt = not args.no_checkpointing
    print(f"# {environment(device)}; batch 1, fp32, {args.size[0]}x{args.size[1]} input, "
          f"gradient checkpointing {'on' if ckpt else 'off'}; load before: {machine_load()}", flush=True)

    cases = []
    for head in args.heads:
        for backbone in args.backbones:
            c = Case(backbone, head, args.size, ckpt, device)
            t = time.perf_counter()
            c.measure_memory()
            print(f"  {backbone:>10} + {head:<9}: {c.params_m:.1f} M params, peak {c.peak_mb:,.0f} MiB "
                  f"(memory step {time.perf_counter() - t:.0f} s)", flush=True)
            cases.append(c)
    for r in range(args.repeats):
        for c in cases:
            c.time_step()
            print(f"  {c.backbone:>10} + {c.head:<9}: timed step {r + 1}: {c.times[-1]:.1f} s "
                  f"(load {machine_load()})", flush=True)

    print("\n| backbone | head | params (M) | peak train-step memory (MiB) | s / step |")
    print("|---|---|---|---|---|")
    for c in cases:
        print(f"| {c.backbone} | {c.head} | {c.params_m:.1f} | {c.peak_mb:,.0f} | {c.seconds:.1f} |")
    if len(args.backbones) >= 2:
        a, b = args.backbones[:2]
        print()
        for head in args.heads:
            ca = next(c for c in cases if c.backbone == a and c.head == head)
            cb = next(c for c in cases if c.backbone == b and c.head == head)
            print(f"{head}: {a} / {b}: memory x{ca.peak_mb / cb.peak_mb:.2f}, "
                  f"time per step x{ca.seconds / cb.seconds:.2f}")
    print(f"# memory: live tensors per operator (_LiveTensorBytes) on {device.type}"
          if device.type != "cuda" else "# memory: torch.cuda peak allocated minus allocated before the step")
    print(f"# load after: {machine_load()}; threads {torch.get_num_threads()}; pid {os.getpid()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
