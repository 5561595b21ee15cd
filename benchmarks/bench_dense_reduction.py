"""Token reduction inside dense ViT backbones at real input sizes: backbone vs whole-model speed-ups.

Models (random weights: speed, GMACs and memory do not depend on them):
- DeiT III-S (timm ``deit3_small_patch16_224`` built at 512 px: 32 x 32 = 1,024 tokens) under the ``linear``
  head (Segmenter's linear decoder), ``semantic_fpn`` and ``upernet`` (ADE20K's 150 classes), 512 x 512
  (``--heads mask_transformer`` adds Segmenter's mask transformer: 2 blocks at the ViT's width);
- ViT-S (``vit_small_patch16_224``) under RetinaNet (80 classes), 640 x 640 (min_size = max_size = 640).

Reductions (``create_segmenter`` / ``create_detector`` with ``reduction=`` and ``restore=``): EViT 0.7 and 0.5
(blocks 3/6/9) with each restoration (keep, reactivate, fused), and ToMe at the same token budgets (the
constant r per block whose summed sequence lengths match EViT's), with each restoration (unmerge,
reactivate); beside them the unreduced model.

For every model and batch size (1 and 4), one interleaved run (``leanvit.measure.interleaved_measure``:
eval mode, inference mode, warm-up, median of ``--repeats`` runs in balanced orders) times
- the **backbone** (ViT + simple feature pyramid, the levels its head uses) and the **whole model**;
- the **token-count bound**: the unreduced backbone running the reduced sequence lengths with no reduction
  work (after each block's attention the first tokens are kept, the rest dropped; the grid is refilled
  with zeros): what the shorter sequences alone give on this machine, as ``bench_export.py`` does for
  classification. Reduction and restoration cost the gap between it and the reduced backbone. Each schedule
  has its own bound: at the same summed length ToMe's gradual schedule keeps longer sequences in the early
  blocks than EViT's three steps, so its attention (quadratic in the length) costs more.

Printed per configuration: ms per batch, ratio over the unreduced backbone / whole model, the head's share
of the whole model (1 - backbone / whole), GMACs (one image) and, with ``--memory``, peak inference memory.
``--fpn-study``: the Semantic FPN head alone on the same maps and weights, computed step by step as
published (NCHW, each branch upsampled on its own) vs leanvit's head, interleaved, with their max difference.
``--train-memory``: peak *training* memory (forward + backward of one batch with pixel cross-entropy,
``_LiveTensorBytes`` on CPU, the CUDA allocator's peak on CUDA) of the DeiT III-S segmenters, reduced vs
unreduced.

    python benchmarks/bench_dense_reduction.py [--batch-sizes 1 4] [--repeats 5] [--heads linear semantic_fpn
        upernet retinanet] [--threads 2] [--memory] [--train-memory] [--fpn-study] [--quick]

Targets (``keep`` restoration, EViT 0.5 and ToMe at its budget): >= 1.8x on the backbone, >= 1.5x on the
whole model with Semantic FPN, >= 1.8x on the whole model with the linear head; reduced training memory
below the unreduced one. ``--quick``: 128 px (64 tokens), batch 1, one repeat, a smoke run.
Needs a leanvit whose dense builders take ``reduction=`` / ``restore=``; without it only the unreduced
models and the bounds are measured (said in the output).
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
from typing import Dict, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import leanvit  # noqa: F401  (registers leanvit's models and reductions)
from leanvit.dense import create_detector, create_segmenter
from leanvit.dense.segmentation import Segmenter
from leanvit.errors import LeanvitError
from leanvit.measure import count_macs, forward_peak_memory_mb, interleaved_measure
from leanvit.measure.bound import sequence_lengths, truncated_tokens
from leanvit.measure.load import LoadWatch
from leanvit.measure.memory import _LiveTensorBytes
from leanvit.utils import environment, retain_freed_memory, sync_device

SEG_HEADS = ("linear", "semantic_fpn", "upernet")
EXTRA_HEADS = ("mask_transformer",)  # measured when asked for
EVIT_RESTORES = ("keep", "reactivate", "fused")
TOME_RESTORES = ("unmerge", "reactivate")
LOCATIONS = (3, 6, 9)
SEG_BACKBONE = ["deit3_small_patch16_224"]  # --seg-backbone


# ------------------------------------------------------------------------------------ token budgets
def evit_lengths(patches: int, keep: float, depth: int = 12, locations: Sequence[int] = LOCATIONS) -> List[int]:
    """Sequence length after each block's attention (what its MLP and the next block see) under EViT:
    ceil(keep x non-class tokens) kept at each location, plus the class token and one fused token."""
    n, fused, out = patches, 0, []
    for i in range(depth):
        if i in locations:
            n = max(1, min(n + fused, math.ceil(keep * (n + fused))))
            fused = 1
        out.append(1 + n + fused)
    return out


def tome_lengths(patches: int, r: int, depth: int = 12) -> List[int]:
    """Sequence length after each block's merge under ToMe (r per block, at most half of the tokens)."""
    n, out = patches + 1, []
    for _ in range(depth):
        n -= min(r, n // 2)
        out.append(n)
    return out


def matched_r(patches: int, keep: float, depth: int = 12) -> int:
    """The constant ToMe r whose summed sequence lengths are closest to EViT's at ``keep``."""
    budget = sum(evit_lengths(patches, keep, depth))
    return min(range(0, patches // 2 + 1), key=lambda r: abs(sum(tome_lengths(patches, r, depth)) - budget))


class BoundBackbone(nn.Module):
    """The unreduced simple-feature-pyramid backbone running given sequence lengths with no reduction work
    (the token-count bound); ``forward(x)`` returns the pyramid maps like the backbone it wraps."""

    def __init__(self, backbone: nn.Module, lengths: Sequence[int]):
        super().__init__()
        self.inner = backbone
        self.lengths = list(lengths)
        for attr in ("out_channels", "strides", "mean", "std", "out_indices"):
            setattr(self, attr, getattr(backbone, attr))

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        vit = self.inner.vit
        H, W = vit.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
        P = vit.num_prefix_tokens
        t = truncated_tokens(vit, x, self.lengths)
        t = vit.norm(t)[:, P:]
        B, k, C = t.shape
        grid = torch.cat([t, t.new_zeros(B, H * W - k, C)], 1) if k < H * W else t[:, :H * W]
        m = grid.transpose(1, 2).reshape(B, C, H, W)
        return [self.inner.levels[str(i)](m) for i in self.inner.out_indices]


def with_backbone(model: nn.Module, body: nn.Module) -> nn.Module:
    """A shallow copy of a segmenter or a torchvision detector whose backbone (the detector's
    ``backbone.body``) is ``body``; every other module is shared with ``model``."""
    out = copy.copy(model)
    out._modules = dict(model._modules)
    if isinstance(model, Segmenter):
        out._modules["backbone"] = body
        return out
    fpn = copy.copy(model.backbone)
    fpn._modules = dict(model.backbone._modules)
    fpn._modules["body"] = body
    out._modules["backbone"] = fpn
    return out


class BatchDetector(nn.Module):
    """A torchvision detector on a (B, 3, H, W) batch (``interleaved_measure`` passes tensors)."""

    def __init__(self, det: nn.Module):
        super().__init__()
        self.det = det

    def forward(self, x):
        return self.det(list(x))


class DetectorBackbone(nn.Module):
    """The detector's backbone (ViT + pyramid, without the FPN neck) on a normalized batch."""

    def __init__(self, det: nn.Module):
        super().__init__()
        self.det = det
        t = det.transform
        self.register_buffer("mean", torch.tensor(t.image_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(t.image_std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return self.det.backbone.body((x - self.mean) / self.std)


class StepByStepFPN(nn.Module):
    """A Semantic FPN head computed as published, step by step in NCHW: every branch upsampled to the finest
    stride on its own, then summed (``--fpn-study``: what ``SemanticFPNHead``'s reordering, channels-last
    layout and composed finest level save, on the same weights)."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, feats):
        from collections import OrderedDict
        h = self.head
        levels = list(h.fpn(OrderedDict((str(i), f.contiguous()) for i, f in enumerate(feats))).values())
        out = None
        for branch, f in zip(h.branches, levels):
            y = f
            for layer in branch:
                y = layer(y.contiguous())
            if out is not None and y.shape[-2:] != out.shape[-2:]:
                y = F.interpolate(y, size=out.shape[-2:], mode="bilinear", align_corners=False)
            out = y if out is None else out + y
        return h.classifier(h.dropout(out))


class OnFeatures(nn.Module):
    """A head applied to fixed backbone maps (the input batch is ignored): times the head alone."""

    def __init__(self, head: nn.Module, feats):
        super().__init__()
        self.head, self.feats = head, feats

    def forward(self, x):
        return self.head(self.feats)


def fpn_study(size: int, batch_sizes, repeats: int, device) -> None:
    torch.manual_seed(0)
    seg = create_segmenter("semantic_fpn", "deit3_small_patch16_224", 150, img_size=size).eval().to(device)
    print(f"\n## Semantic FPN head alone (DeiT III-S maps at {size}x{size}, 150 classes): step by step in NCHW "
          "vs leanvit's (coarse branches summed before one upsampling, channels-last, the finest level's two "
          "convolutions composed)")
    for bs in batch_sizes:
        with torch.inference_mode():
            feats = seg.backbone(torch.rand(bs, 3, size, size, device=device))
            a, b = StepByStepFPN(seg.head)(feats), seg.head(feats)
        diff = (a - b).abs().max().item() / a.abs().max().item()
        watch = LoadWatch()
        res = interleaved_measure({"step by step": OnFeatures(StepByStepFPN(seg.head), feats),
                                   "leanvit": OnFeatures(seg.head, feats)},
                                  batch_size=1, img_size=8, device=device, warmup=1, repeats=repeats)
        watch.stop()
        s, n = res["step by step"].latency_ms, res["leanvit"].latency_ms
        print(f"batch {bs}: step by step {s:.1f} ms, leanvit {n:.1f} ms: {s / n:.2f}x faster; max |diff| "
              f"{diff:.1e} of the largest logit; {watch.line}", flush=True)


# ------------------------------------------------------------------------------------ building
def configurations(patches: int) -> List[dict]:
    confs = [dict(label="unreduced", reduction=None, restore=None, lengths=None)]
    for keep in (0.7, 0.5):
        for restore in EVIT_RESTORES:
            confs.append(dict(label=f"EViT {keep} {restore}", reduction=f"evit:{keep}", restore=restore,
                              lengths=evit_lengths(patches, keep), schedule=f"EViT {keep}"))
        r = matched_r(patches, keep)
        for restore in TOME_RESTORES:
            confs.append(dict(label=f"ToMe r={r} {restore}", reduction=f"tome:{r}", restore=restore,
                              lengths=tome_lengths(patches, r), schedule=f"ToMe r={r}"))
    return confs


def build(kind: str, conf: dict, size: int):
    torch.manual_seed(0)
    extra = {} if conf["reduction"] is None else dict(reduction=conf["reduction"], restore=conf["restore"])
    if kind == "retinanet":
        det = create_detector("retinanet", "vit_small_patch16_224", 80, img_size=size, min_size=size, max_size=size,
                              **extra)
        return BatchDetector(det).eval(), DetectorBackbone(det).eval()
    seg = create_segmenter(kind, SEG_BACKBONE[0], 150, img_size=size, **extra).eval()
    return seg, seg.backbone


def _fmt_mb(v) -> str:
    return "-" if v is None else f"{v:,.0f}"


def bench_model(kind: str, size: int, batch_sizes, repeats: int, memory: bool, device) -> None:
    patches = (size // 16) ** 2
    built: Dict[str, tuple] = {}
    unavailable = None
    for conf in configurations(patches):
        try:
            built[conf["label"]] = (conf, *build(kind, conf, size))
        except (TypeError, LeanvitError) as e:
            if conf["reduction"] is None:
                raise
            unavailable = unavailable or f"{conf['label']}: {e}"
    base_whole = built["unreduced"][1]
    bounds = {}
    for conf in configurations(patches):
        if conf["lengths"] is not None and conf["schedule"] not in bounds:
            lengths = conf["lengths"]
            if conf["label"] in built:  # the reduced model's own lengths (prefix tokens and all)
                whole = built[conf["label"]][1]
                vit = whole.det.backbone.body.vit if kind == "retinanet" else whole.backbone.vit
                lengths = [m for _, m in sequence_lengths(vit, torch.rand(1, 3, size, size))]
            if kind == "retinanet":
                body = BoundBackbone(base_whole.det.backbone.body, lengths)
                whole = BatchDetector(with_backbone(base_whole.det, body))
                bounds[conf["schedule"]] = (whole, DetectorBackbone(whole.det))
            else:
                body = BoundBackbone(base_whole.backbone, lengths)
                bounds[conf["schedule"]] = (with_backbone(base_whole, body), body)
    print(f"\n## {kind} on {'ViT-S' if kind == 'retinanet' else SEG_BACKBONE[0]}, {size}x{size} ({patches:,} tokens)"
          + (f"\n(reduced models unavailable: {unavailable})" if unavailable else ""), flush=True)
    gm = {}
    for label, (_, whole, bb) in built.items():
        gm[label] = (count_macs(bb, size) / 1e9, count_macs(whole, size) / 1e9)
    for schedule, (whole, bb) in bounds.items():
        gm[f"bound {schedule}"] = (count_macs(bb, size) / 1e9, count_macs(whole, size) / 1e9)
    for bs in batch_sizes:
        models = {}
        for label, (_, whole, bb) in built.items():
            models[(label, "backbone")] = bb
            models[(label, "whole")] = whole
        for schedule, (whole, bb) in bounds.items():
            models[(f"bound {schedule}", "backbone")] = bb
            models[(f"bound {schedule}", "whole")] = whole
        watch = LoadWatch()
        res = interleaved_measure(models, batch_size=bs, img_size=size, device=device,
                                  warmup=1, repeats=repeats)
        watch.stop()
        mem = {}
        if memory:
            for label, (_, whole, _bb) in built.items():
                mem[label] = forward_peak_memory_mb(whole, bs, size, device)
        b0, w0 = res[("unreduced", "backbone")].latency_ms, res[("unreduced", "whole")].latency_ms
        print(f"\nbatch {bs}; {watch.line}" + (f"\nWARNING: {watch.warning}" if watch.warning else ""))
        print("| configuration | backbone ms | backbone x | whole ms | whole x | head share | backbone GMACs "
              "| whole GMACs | peak inference MiB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for label in list(built) + [f"bound {b}" for b in bounds]:
            b, w = res[(label, "backbone")].latency_ms, res[(label, "whole")].latency_ms
            print(f"| {label} | {b:.1f} | {b0 / b:.2f}x | {w:.1f} | {w0 / w:.2f}x | {max(0.0, 1 - b / w):.0%} "
                  f"| {gm[label][0]:.2f} | {gm[label][1]:.2f} | {_fmt_mb(mem.get(label))} |", flush=True)
        for label in built:
            conf = built[label][0]
            if conf["lengths"] is None:
                continue
            bl = res[(f"bound {conf['schedule']}", "backbone")].latency_ms
            b = res[(label, "backbone")].latency_ms
            print(f"  {label}: backbone {b0 / b:.2f}x, token-count bound {b0 / bl:.2f}x, "
                  f"reduced over bound {b / bl:.2f}x")


def train_memory(size: int, batch: int, device) -> None:
    print(f"\n## peak training memory: DeiT III-S segmenters, {size}x{size}, batch {batch}, "
          "forward + backward with pixel cross-entropy")
    print("| head | configuration | peak MiB | x unreduced |")
    print("|---|---|---|---|")
    y = torch.randint(0, 150, (batch, size, size), device=device)
    x = torch.rand(batch, 3, size, size, device=device)
    for head in ("linear", "semantic_fpn"):
        base = None
        for conf in configurations((size // 16) ** 2):
            if conf["reduction"] is not None and conf["restore"] not in ("keep", "unmerge"):
                continue
            try:
                torch.manual_seed(0)
                extra = {} if conf["reduction"] is None else dict(reduction=conf["reduction"], restore=conf["restore"])
                seg = create_segmenter(head, "deit3_small_patch16_224", 150, img_size=size, **extra).to(device).train()
            except (TypeError, LeanvitError) as e:
                print(f"| {head} | {conf['label']} | unavailable ({str(e).splitlines()[0][:80]}) | - |")
                continue
            if device.type == "cuda":
                sync_device(device)
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                F.cross_entropy(seg(x), y).backward()
                sync_device(device)
                peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
            else:
                owned = [*seg.parameters(), *seg.buffers(), x, y]
                with _LiveTensorBytes(ignore={t.untyped_storage().data_ptr() for t in owned}) as counter:
                    F.cross_entropy(seg(x), y).backward()
                peak = counter.peak / 2**20
            base = base or peak
            print(f"| {head} | {conf['label']} | {peak:,.0f} | {peak / base:.2f}x |", flush=True)
            del seg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", nargs="*", default=list(SEG_HEADS) + ["retinanet"],
                   choices=list(SEG_HEADS) + list(EXTRA_HEADS) + ["retinanet"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seg-size", type=int, default=512)
    p.add_argument("--seg-backbone", default=SEG_BACKBONE[0],
                   help="the segmenters' ViT (e.g. vit_small_patch16_dinov3, eva02_small_patch14_224: RoPE)")
    p.add_argument("--det-size", type=int, default=640)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--memory", action="store_true", help="also peak inference memory of every whole model")
    p.add_argument("--train-memory", action="store_true", help="peak training memory of the segmenters")
    p.add_argument("--train-batch", type=int, default=1)
    p.add_argument("--fpn-study", action="store_true",
                   help="also time the Semantic FPN head alone, step by step vs leanvit's, on the same weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="128 px, batch 1, one repeat: a smoke run")
    p.add_argument("--system-malloc", action="store_true",
                   help="leave glibc's malloc as it is (default: retain freed memory, see leanvit.utils."
                        "retain_freed_memory: the 157 MB logits of a 512x512 image are then not page-faulted "
                        "in on every call)")
    args = p.parse_args(argv)
    SEG_BACKBONE[0] = args.seg_backbone
    if args.quick:
        args.seg_size = args.det_size = 128
        args.batch_sizes, args.repeats = [1], 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    retained = False if args.system_malloc else retain_freed_memory()
    malloc = "freed memory retained (mallopt)" if retained else "glibc malloc as is (large blocks unmapped on free)"
    print(f"# {environment(device)}; fp32; random weights; {malloc}")
    for kind in args.heads:
        size = args.det_size if kind == "retinanet" else args.seg_size
        bench_model(kind, size, args.batch_sizes, args.repeats, args.memory, device)
    if args.fpn_study:
        fpn_study(args.seg_size, args.batch_sizes, args.repeats, device)
    if args.train_memory:
        train_memory(args.seg_size, args.train_batch, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
