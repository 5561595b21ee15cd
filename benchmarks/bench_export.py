"""Exported models: ONNX accuracy against eager PyTorch, onnxruntime speed, batch-1 latency.

1. ONNX (dynamo exporter, dynamic batch) vs eager max abs diff, batch 1 and 3 of N(0, 1) images:
   deit_small, evit_deit_small (0.7), evit_deit3_small (0.7), shunted_t at 224 and, exported with dynamic
   height/width, at 256x320.                                         target: <= 1e-4
2. Throughput (img/s), timed interleaved: onnxruntime EViT-S/0.7 vs onnxruntime DeiT-S at batch 8 and 32
   (target >= 1.5x) and vs timm DeiT-S in eager PyTorch (target >= 2.5x); beside them the token-count
   bound (see 3.) in onnxruntime.
3. Batch-1 latency, median and p90 over interleaved runs: EViT-S/0.7 vs DeiT-S in eager PyTorch and in
   onnxruntime.                                                      target: <= 0.70x
   Beside them, the *token-count bound*: DeiT-S running EViT's token counts with no reorganization work
   (the first k tokens kept, the rest summed; no scores, sort or gather). EViT does that work and more;
   the gap between the two is all the reorganization costs, and the bound over DeiT-S is what the shorter
   sequences alone give on this machine.
4. (--compile) torch.compile of EViT-S: compile time of the first keep rate and of a second one, with
   ``dynamic=None`` (the default: recompiles, then marks sizes dynamic) and ``dynamic=True``, and batch-1
   latency of each at the second keep rate.

Random weights (speed and export fidelity do not depend on them); 2 threads for PyTorch and onnxruntime.

    python benchmarks/bench_export.py [--threads 2] [--repeats 7] [--latency-repeats 40] [--compile] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import timm
import torch

import leanvit
from leanvit.deploy.export import OnnxRuntimeModel, export_model, verify_export
from leanvit.deploy.runtimes import compile_model
from leanvit.measure import interleaved_measure
from leanvit.utils import busy_note, environment


class TokenCountBound(torch.nn.Module):
    """DeiT-S computing with EViT's sequence lengths but without choosing tokens (see the module doc)."""

    def __init__(self, vit, evit):
        super().__init__()
        self.vit = vit
        self.keep = {i: evit.blocks[i].keep_rate for i in evit.evit_locations}

    def forward(self, x):
        v = self.vit
        x = v.norm_pre(v._pos_embed(v.patch_embed(x)))
        for i, blk in enumerate(v.blocks):
            if i not in self.keep:
                x = blk(x)
                continue
            k = leanvit.reduction.reorg.num_kept(self.keep[i], x.shape[1] - 1)
            x = x + blk.ls1(blk.attn(blk.norm1(x)))
            x = torch.cat([x[:, :1 + k], x[:, 1 + k:].sum(1, keepdim=True)], dim=1)
            x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        return v.forward_head(v.norm(x))


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


def accuracy(models: dict, folder: Path, quick: bool, reuse: bool = False) -> dict:
    print("\n1. ONNX (dynamo exporter, dynamic batch) vs eager PyTorch: max abs diff (batch 1 and 3)")
    files = {}
    for name, (model, dynamic) in models.items():
        t0 = time.perf_counter()
        path = folder / f"{name}.onnx"
        if not (reuse and path.exists()):
            export_model(model, path, "onnx", 224, dynamic_size=dynamic)
        sizes = [(224, 224)] + ([(256, 320)] if dynamic else [])
        res = verify_export(model, path, "onnx", sizes, batch_sizes=(1,) if quick else (1, 3))
        files[name] = path
        for hw in sizes:
            worst = max(r.max_abs_diff for r in res if r.img_size == hw)
            tag = " (dynamic H/W)" if dynamic else ""
            print(f"   {name:24s} {hw[0]}x{hw[1]}{tag:16s} max abs diff {worst:.2e}  "
                  f"{'ok' if worst <= 1e-4 else 'ABOVE 1e-4'}   (export {time.perf_counter() - t0:.0f} s)")
    return files


def throughput(deit, evit, files: dict, batch_sizes, threads: int, warmup: int, repeats: int) -> None:
    print(f"\n2. Throughput (img/s, median of {repeats} interleaved runs, {threads} threads)")
    runners = {
        "DeiT-S eager": deit,
        "EViT-S/0.7 eager": evit,
        "DeiT-S onnxruntime": OnnxRuntimeModel(files["deit_small"], threads=threads),
        "EViT-S/0.7 onnxruntime": OnnxRuntimeModel(files["evit_deit_small_0.7"], threads=threads),
        "bound onnxruntime": OnnxRuntimeModel(files["token_count_bound"], threads=threads),
    }
    for b in batch_sizes:
        res = interleaved_measure(runners, batch_size=b, warmup=warmup, repeats=repeats)
        ips = {k: v.img_per_s for k, v in res.items()}
        print(f"   batch {b:2d}: " + ", ".join(f"{k} {v:.1f}" for k, v in ips.items()))
        print(f"            onnxruntime EViT/0.7 over onnxruntime DeiT-S: "
              f"{_ratio(ips['EViT-S/0.7 onnxruntime'], ips['DeiT-S onnxruntime'])} (target >= 1.5x); "
              f"over eager DeiT-S: {_ratio(ips['EViT-S/0.7 onnxruntime'], ips['DeiT-S eager'])} (target >= 2.5x); "
              f"eager EViT/0.7 over eager DeiT-S: {_ratio(ips['EViT-S/0.7 eager'], ips['DeiT-S eager'])}")
        print(f"            token-count bound in onnxruntime over onnxruntime DeiT-S: "
              f"{_ratio(ips['bound onnxruntime'], ips['DeiT-S onnxruntime'])}")


def latency(deit, evit, files: dict, threads: int, repeats: int) -> None:
    print(f"\n3. Batch-1 latency (ms, median / p90 of {repeats} interleaved runs, {threads} threads)")
    runners = {
        "DeiT-S eager": deit,
        "EViT-S/0.7 eager": evit,
        "bound eager": TokenCountBound(deit, evit),
        "DeiT-S onnxruntime": OnnxRuntimeModel(files["deit_small"], threads=threads),
        "EViT-S/0.7 onnxruntime": OnnxRuntimeModel(files["evit_deit_small_0.7"], threads=threads),
        "bound onnxruntime": OnnxRuntimeModel(files["token_count_bound"], threads=threads),
    }
    res = interleaved_measure(runners, batch_size=1, warmup=3, repeats=repeats)
    for k, v in res.items():
        print(f"   {k:24s} {v.latency_ms:8.2f} / {v.p90_ms:8.2f}")
    for rt in ("eager", "onnxruntime"):
        e, d, b = res[f"EViT-S/0.7 {rt}"], res[f"DeiT-S {rt}"], res[f"bound {rt}"]
        print(f"   {rt:11s} EViT/0.7 over DeiT-S latency: median {e.latency_ms / d.latency_ms:.2f}x, "
              f"p90 {e.p90_ms / d.p90_ms:.2f}x (target <= 0.70x); token-count bound over DeiT-S "
              f"{b.latency_ms / d.latency_ms:.2f}x; EViT over the bound {e.latency_ms / b.latency_ms:.3f}x")


def compile_study(evit, threads: int, repeats: int) -> None:
    print("\n4. torch.compile of EViT-S: compile time (first call) per keep rate, batch-1 latency at the second "
          "(inductor's on-disk caches off: cold compiles)")
    import torch._inductor.config as inductor_config

    inductor_config.force_disable_caches = True  # an earlier run's cache would make the next compile look free
    x = torch.randn(1, 3, 224, 224)
    eager = copy.deepcopy(evit)
    eager.keep_rate = 0.5
    for dynamic in (None, True):
        torch._dynamo.reset()
        model = copy.deepcopy(evit)
        model.keep_rate = 0.7
        compiled = compile_model(model, dynamic=dynamic)
        times = []
        with torch.inference_mode():
            for rate in (0.7, 0.5):
                model.keep_rate = rate
                t0 = time.perf_counter()
                compiled(x)
                times.append(time.perf_counter() - t0)
        res = interleaved_measure({"compiled": compiled, "eager": eager}, batch_size=1, warmup=3, repeats=repeats)
        print(f"   dynamic={dynamic!s:5s}: compile {times[0]:.1f} s at keep 0.7, {times[1]:.1f} s more at keep 0.5; "
              f"batch-1 at 0.5: compiled {res['compiled'].latency_ms:.2f} ms vs eager {res['eager'].latency_ms:.2f} ms")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--latency-repeats", type=int, default=40)
    p.add_argument("--compile", action="store_true", help="also measure torch.compile (minutes on 2 cores)")
    p.add_argument("--quick", action="store_true", help="batch 8 only, few repeats (a smoke run)")
    p.add_argument("--workdir", default=None, help="where the ONNX files go (default: a temporary folder)")
    p.add_argument("--reuse-files", action="store_true",
                   help="use the ONNX files already in --workdir (same seed, so the same weights)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.latency_repeats, args.warmup = 3, 8, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    folder = Path(args.workdir or tempfile.mkdtemp(prefix="leanvit_bench_export_"))
    folder.mkdir(parents=True, exist_ok=True)

    deit = timm.create_model("deit_small_patch16_224").eval()
    evit = leanvit.apply_evit(copy.deepcopy(deit), keep_rate=0.7)
    evit3 = timm.create_model("evit_deit3_small_patch16_224", keep_rate=0.7).eval()
    gen = torch.Generator().manual_seed(1)  # its own generator: the other models' weights stay as they were
    with torch.no_grad():  # timm inits LayerScale at 1e-6 (blocks ~ identity): make the blocks count
        for name, param in evit3.named_parameters():
            if name.endswith(".gamma"):
                param.copy_(torch.rand(param.shape, generator=gen) * 0.45 + 0.05)
    shunted = timm.create_model("shunted_t").eval()
    print(f"bench_export | {environment('cpu')} | onnxruntime threads={args.threads} | fp32 | random weights")
    note = busy_note("cpu")
    if note:
        print(f"note: {note}")
    files = accuracy({"deit_small": (deit, False), "evit_deit_small_0.7": (evit, False),
                      "evit_deit3_small_0.7": (evit3, False), "shunted_t": (shunted, True)}, folder, args.quick,
                     args.reuse_files)
    bound = folder / "token_count_bound.onnx"
    if not (args.reuse_files and bound.exists()):
        export_model(TokenCountBound(deit, evit), bound, "onnx", 224)
    files["token_count_bound"] = bound
    throughput(deit, evit, files, (8,) if args.quick else (8, 32), args.threads, args.warmup, args.repeats)
    latency(deit, evit, files, args.threads, args.latency_repeats)
    if args.compile:
        compile_study(evit, args.threads, max(5, args.latency_repeats // 3))
    note = busy_note("cpu")
    if note:
        print(f"note (end): {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
