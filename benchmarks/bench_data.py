"""Data-loading throughput per loader worker: the DeiT III training pipeline (JPEG decode + RandomResizedCrop +
flip + 3-Augment + colour jitter, 224 px) from an ImageFolder and from tar shards of the same JPEGs, next to
timm's own loader (``timm.data.create_loader``, its default training transform) on the same files, and the cost
of exact resumption's per-sample seeding. Timed rounds are interleaved (every round times every pipeline).

    python benchmarks/bench_data.py [--images 512] [--size 500x375] [--workers 1] [--rounds 3] [--quick]
    python benchmarks/bench_data.py --data /data/imagenet      # real JPEGs: DIR/train/<class>/*.JPEG

Prints images/s per worker and how many loader workers one GPU needs to keep up with DeiT-S and DeiT III-B
training, from anchors (images/s per GPU) derived from timm's published inference figures (see --anchors).
"""
from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# training img/s per GPU: timm's published DeiT-S AMP inference on one consumer / workstation GPU is ~8-11k img/s;
# a training step (forward + backward + optimizer) costs about 3 forwards, so DeiT-S trains at ~2.7-3.7k img/s.
# DeiT III-B has 3.8x DeiT-S's GMACs (17.6 vs 4.6): ~0.7-1.0k img/s. The upper ends are used (the worst case
# for the loaders).
ANCHORS = {"DeiT-S": 3700.0, "DeiT III-B": 1000.0}


def make_jpegs(root: Path, n: int, size, classes: int = 10, seed: int = 0) -> Path:
    """``root/train/<class>/*.jpg``: ``n`` JPEGs (quality 90) of smooth random content at ``size`` (w, h)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(n):
        d = root / "train" / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        img.save(d / f"{i:06d}.jpg", quality=90)
    return root


def write_shards(tree: Path, out: Path, per_shard: int = 128) -> str:
    """The training images as ``out/train-NNNN.tar`` (WebDataset layout); returns a brace pattern."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    classes = sorted(p.name for p in (tree / "train").iterdir() if p.is_dir())
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((tree / "train" / name).iterdir())]
    random.Random(0).shuffle(files)  # shards mix the classes, as real shard sets do
    n_shards = max(1, math.ceil(len(files) / per_shard))
    for s in range(n_shards):
        with wds.TarWriter(str(out / f"train-{s:04d}.tar")) as w:
            for f, c in files[s::n_shards]:
                w.write({"__key__": f"{f.parent.name}_{f.stem}", "jpg": f.read_bytes(), "cls": c})
    return str(out / f"train-{{0000..{n_shards - 1:04d}}}.tar")


def pipelines(tree: Path, pattern: str, batch: int, workers: int) -> dict:
    """name -> a function returning a fresh iterator over training batches."""
    import timm.data

    from leanvit.data import build_train_dataset
    from leanvit.data.sampling import EpochShuffleSampler, ResumableSampler, SeededSamples

    tf = dict(crop="rrc", hflip=0.5, three_augment=True, color_jitter=0.3)
    folder = build_train_dataset(str(tree), 224, transform=tf)
    shards = build_train_dataset(pattern, 224, transform=tf)
    kw = dict(batch_size=batch, num_workers=workers, drop_last=True)  # workers start per round (not timed)

    def plain(ds):
        loader = torch.utils.data.DataLoader(ds, sampler=EpochShuffleSampler(len(ds), 0), **kw)
        return lambda: iter(loader)

    def seeded(ds):  # what the training engine runs: per-sample seeds from (seed, epoch, rank, position)
        sampler = ResumableSampler(ds.train_sampler(1, 0, 0) if hasattr(ds, "train_sampler")
                                   else EpochShuffleSampler(len(ds), 0))
        loader = torch.utils.data.DataLoader(SeededSamples(ds, 0), sampler=sampler, **kw)
        return lambda: iter(loader)

    timm_ds = timm.data.create_dataset("", root=str(tree / "train"), is_training=True)
    timm_loader = timm.data.create_loader(timm_ds, input_size=(3, 224, 224), batch_size=batch, is_training=True,
                                          num_workers=workers, use_prefetcher=False, persistent_workers=False)
    return {"ImageFolder (leanvit)": plain(folder), "ImageFolder + per-sample seeds": seeded(folder),
            "shards (leanvit)": plain(shards), "shards + per-sample seeds": seeded(shards),
            "timm create_loader (ImageFolder)": lambda: iter(timm_loader)}


def rate(make_iter, batches: int) -> float:
    """Images/s over ``batches`` batches after one warm-up batch (worker start-up and first decodes)."""
    it = make_iter()
    x, _ = next(it)
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        try:
            x, _ = next(it)
        except StopIteration:
            it = make_iter()
            x, _ = next(it)
        n += x.shape[0]
    return n / (time.perf_counter() - t0)


def seeding_cost_us(n: int = 20000) -> float:
    """Microseconds per sample of exact resumption's seeding (hash + Python, NumPy and torch CPU reseeding)."""
    from leanvit.data.sampling import sample_seed

    t0 = time.perf_counter()
    for i in range(n):
        s = sample_seed(0, 1, 0, i)
        random.seed(s)
        np.random.seed(s % (2 ** 32))
        torch.default_generator.manual_seed(s)
    return (time.perf_counter() - t0) / n * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="an ImageFolder tree with train/ (default: generated JPEGs)")
    p.add_argument("--images", type=int, default=512, help="generated JPEGs")
    p.add_argument("--size", default="500x375", help="generated JPEG size WxH (ImageNet's typical size)")
    p.add_argument("--workers", type=int, default=1, help="loader workers (the rate is divided by them)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=8, help="timed batches per pipeline and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="128 images, 3 batches of 16, 1 round (a smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.batch_size, args.batches, args.rounds = 128, 16, 3, 1
    torch.set_num_threads(1)
    w, h = (int(v) for v in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tree = Path(args.data) if args.data else make_jpegs(tmp / "tree", args.images, (w, h))
        pattern = write_shards(tree, tmp / "shards")
        pipes = pipelines(tree, pattern, args.batch_size, args.workers)
        rates = {name: [] for name in pipes}
        names = list(pipes)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                rates[name].append(rate(pipes[name], args.batches) / max(1, args.workers))
    seed_us = seeding_cost_us()
    print(f"data loading per worker: {args.workers} worker(s), batch {args.batch_size}, 224 px, "
          f"{'generated ' + args.size + ' JPEGs' if not args.data else args.data}, {args.rounds} interleaved "
          f"round(s), {os.cpu_count()} CPUs, torch {torch.__version__}")
    width = max(len(n) for n in rates)
    base = statistics.median(rates["ImageFolder (leanvit)"])
    for name, rs in rates.items():
        m = statistics.median(rs)
        print(f"  {name.ljust(width)}  {m:7.1f} img/s per worker  ({m / base:.2f}x ImageFolder)")
    per_img_us = 1e6 / base
    print(f"  per-sample seeding of exact resumption: {seed_us:.1f} us per image "
          f"({100 * seed_us / per_img_us:.2f}% of the {per_img_us / 1e3:.1f} ms an image takes)")
    slowest = min(statistics.median(rates["ImageFolder + per-sample seeds"]),
                  statistics.median(rates["shards + per-sample seeds"]))
    for model, anchor in ANCHORS.items():
        print(f"  {model} training at ~{anchor:.0f} img/s per GPU needs ~{math.ceil(anchor / slowest)} loader "
              f"workers per GPU at this rate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
