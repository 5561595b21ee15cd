"""Everything in leanvit that needs CUDA, in one command (a few minutes on one GPU): prints tables and exits 1 if
any check fails, 0 if all pass. On a machine without CUDA it says so and exits 0.

    python benchmarks/gpu_check.py [--batch-size 256] [--no-compile] [--quick]

Checks (random weights; every figure names the device, dtype and batch):
1. training steps in bf16 autocast and in fp16 autocast with a GradScaler of DeiT III-S, EViT-DeiT-S 0.7,
   ToMe-DeiT-S r=13, Shunted-T, a Shunted-T RetinaNet and a Shunted-T Semantic FPN: finite losses and gradients,
   ms per step, peak memory;
2. EViT and ToMe under bf16 vs fp32 on the same weights and random inputs: max |logit difference| and top-1
   agreement;
3. which SDPA kernel each model's attention calls can use (flash / efficient / cudnn / math; ToMe's float bias
   rules flash out) and the throughput with the math kernel forced, as a ratio;
4. inference img/s at batch 256 under fp16 autocast of timm DeiT-S, EViT-DeiT-S 0.7, ToMe r=13, DeiT III-S,
   Shunted-T/S and pvt_v2_b1/b2, side by side (interleaved rounds), with and without ``torch.compile``, and the
   peak memory;
5. one NCCL all-reduce (a 1-process group).

The CPU half (``cpu_half``: bf16 autocast training steps of every task) runs in the test suite.
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

import leanvit
from leanvit.dense import create_detector, create_segmenter

FAILURES: List[str] = []


# --------------------------------------------------------------------------------------------- models
# narrow and shallow versions of the same architectures for the CPU half (the code paths, not the sizes)
TINY_VIT = dict(patch_size=8, embed_dim=64, depth=4, num_heads=2)
TINY_SHUNTED = dict(embed_dims=(64, 32, 32, 32), num_heads=(2, 2, 2, 2), depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2))


def classification_models(img: int = 224, tiny: bool = False) -> Dict[str, Callable[[], nn.Module]]:
    """Builders of the classification models the checks train and time (random weights)."""
    import timm

    vit = TINY_VIT if tiny else {}
    shunted_kw = TINY_SHUNTED if tiny else {}

    def deit3():
        return timm.create_model("deit3_small_patch16_224", img_size=img, **vit)

    def evit():
        return leanvit.create_model("deit_small_patch16_224", reduction={"method": "evit", "keep_rate": 0.7},
                                    img_size=img, **vit)

    def tome():
        return leanvit.apply_reduction(timm.create_model("deit_small_patch16_224", img_size=img, **vit), "tome",
                                       r=13)

    def shunted():
        return timm.create_model("shunted_t", img_size=img, **shunted_kw)

    return {"DeiT III-S": deit3, "EViT-DeiT-S 0.7": evit, "ToMe-DeiT-S r=13": tome, "Shunted-T": shunted}


def dense_models(img: int, tiny: bool = False) -> Dict[str, Callable[[], nn.Module]]:
    kw = dict(TINY_SHUNTED, fpn_channels=32) if tiny else {}
    seg_kw = dict(TINY_SHUNTED, fpn_channels=16, channels=16) if tiny else {}
    return {"Shunted-T RetinaNet": lambda: create_detector("retinanet", "shunted_t", 80, min_size=img, max_size=img,
                                                            img_size=img, **kw),
            "Shunted-T Semantic FPN": lambda: create_segmenter("semantic_fpn", "shunted_t", 150, img_size=img,
                                                               **seg_kw)}


def _loss(name: str, model: nn.Module, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The task's loss on a random batch ``x`` (targets drawn from ``g``)."""
    b, _, h, w = x.shape
    if "RetinaNet" in name:
        boxes = []
        for _ in range(b):
            xy = torch.rand(2, generator=g) * (w / 2)
            wh = torch.rand(2, generator=g) * (w / 3) + w / 8
            boxes.append(torch.cat([xy, xy + wh]).clamp(max=w - 1)[None].to(x.device))
        targets = [{"boxes": bx, "labels": torch.randint(0, 80, (1,), generator=g).to(x.device)} for bx in boxes]
        losses = model(list(x), targets)
        return sum(v.float() for v in losses.values())
    if "FPN" in name:
        y = torch.randint(0, 150, (b, h, w), generator=g).to(x.device)
        return F.cross_entropy(model(x).float(), y)
    y = torch.randint(0, 1000, (b,), generator=g).to(x.device)
    return F.cross_entropy(model(x).float(), y)


def train_steps(name: str, build: Callable[[], nn.Module], device, dtype, img: int, batch: int, steps: int = 3,
                scaler: bool = False) -> dict:
    """``steps`` AdamW steps under autocast(``dtype``) (with a GradScaler if ``scaler``): the losses must be
    finite and the gradients finite after unscaling. Returns ms per step (after the first) and peak MiB."""
    device = torch.device(device)
    torch.manual_seed(0)
    model = build().to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gs = torch.amp.GradScaler(device.type) if scaler else None
    g = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for _ in range(steps):
        x = torch.randn(batch, 3, img, img, generator=g).to(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype):
            loss = _loss(name, model, x, g)
        opt.zero_grad(set_to_none=True)
        if gs is not None:
            gs.scale(loss).backward()
            gs.unscale_(opt)
        else:
            loss.backward()
        grads_ok = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        if gs is not None:
            gs.step(opt)
            gs.update()
        else:
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        # a GradScaler may skip a step with inf gradients at its first scale: only its losses must be finite
        if not math.isfinite(losses[-1]) or (gs is None and not grads_ok):
            return {"ok": False, "loss": losses[-1], "ms": float("nan"), "peak_mib": None}
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"ok": True, "loss": losses[-1], "ms": 1e3 * statistics.median(times[1:] or times), "peak_mib": peak}


def cpu_half(img: int = 64, batch: int = 2, steps: int = 2) -> List[dict]:
    """bf16 autocast training steps of every task on the CPU (the part of this check the test suite runs), on
    narrow versions of the checked architectures."""
    rows = []
    # dense models at twice the size: at 64 px RetinaNet's P6/P7 maps are 1x1, where bf16 convolution gradients
    # on the CPU came out non-finite now and then (oneDNN); 128 px keeps the check about leanvit's code
    builds = [(n, b, img) for n, b in classification_models(img, tiny=True).items()]
    builds += [(n, b, 2 * img) for n, b in dense_models(2 * img, tiny=True).items()]
    for name, build, size in builds:
        r = train_steps(name, build, "cpu", torch.bfloat16, size, batch, steps)
        rows.append({"model": name, "img": size, **r})
    return rows


# --------------------------------------------------------------------------------------------- GPU checks
def _table(title: str, header: List[str], rows: List[list]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    for r in [header, ["-" * w for w in widths]] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def check_training(device, img: int, batch: int) -> None:
    rows = []
    builds = {**classification_models(img), **dense_models(img)}
    for name, build in builds.items():
        for label, dtype, scaler in (("bf16", torch.bfloat16, False), ("fp16+GradScaler", torch.float16, True)):
            b = batch if "RetinaNet" not in name and "FPN" not in name else max(2, batch // 8)
            try:
                r = train_steps(name, build, device, dtype, img, b, steps=4, scaler=scaler)
            except Exception as e:  # noqa: BLE001 - a failure is a row of the table, not the end of the check
                r = {"ok": False, "loss": float("nan"), "ms": float("nan"), "peak_mib": None, "error": str(e)[:80]}
            if not r["ok"]:
                FAILURES.append(f"training {name} {label}: {r.get('error', 'non-finite loss or gradients')}")
            rows.append([name, label, b, "ok" if r["ok"] else "FAIL", f"{r['loss']:.3f}", f"{r['ms']:.1f}",
                         "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"])
            torch.cuda.empty_cache()
    _table(f"1. training steps ({img} px, AdamW)", ["model", "autocast", "batch", "status", "loss", "ms/step",
                                                   "peak MiB"], rows)


@torch.inference_mode()
def check_bf16_agreement(device, batch: int = 64) -> None:
    rows = []
    builds = classification_models(224)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 224, 224, generator=g).to(device)
    for name in ("EViT-DeiT-S 0.7", "ToMe-DeiT-S r=13"):
        torch.manual_seed(0)
        m = builds[name]().to(device).eval()
        ref = m(x).float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = m(x).float()
        diff = (ref - low).abs().max().item()
        agree = (ref.argmax(1) == low.argmax(1)).float().mean().item() * 100
        ok = math.isfinite(diff) and agree >= 90.0
        if not ok:
            FAILURES.append(f"bf16 vs fp32 {name}: top-1 agreement {agree:.1f}%")
        rows.append([name, f"{diff:.4f}", f"{agree:.1f}%", "ok" if ok else "FAIL"])
    _table(f"2. bf16 vs fp32 on the same weights (batch {batch} of random inputs)",
           ["model", "max |logit diff|", "top-1 agreement", "status"], rows)


def _record_sdpa(model: nn.Module, x: torch.Tensor) -> list:
    """The (q, k, v, attn_mask, kwargs) of every SDPA call of one forward, as tensors kept for replay."""
    calls, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, *args, **kwargs):
        calls.append((q.clone(), k.clone(), v.clone(), None if attn_mask is None else attn_mask.clone(), kwargs))
        return real(q, k, v, attn_mask, *args, **kwargs)

    F.scaled_dot_product_attention = spy
    try:
        with torch.autocast("cuda", dtype=torch.float16):
            model(x)
    finally:
        F.scaled_dot_product_attention = real
    return calls


def _kernels(call) -> List[str]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, mask, kw = call
    ok = []
    for label, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                           ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)):
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)
            ok.append(label)
        except RuntimeError:
            pass
    return ok


@torch.inference_mode()
def _img_per_s(model, x, iters: int = 10, rounds: int = 3, ctx=None) -> float:
    from contextlib import nullcontext

    ctx = ctx or nullcontext
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with ctx(), torch.autocast("cuda", dtype=torch.float16):
            for _ in range(iters):
                model(x)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return x.shape[0] * iters / statistics.median(times)


@torch.inference_mode()
def check_sdpa(device, batch: int) -> None:
    import timm
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    builds = {**classification_models(224), "pvt_v2_b1": lambda: timm.create_model("pvt_v2_b1")}
    x = torch.randn(batch, 3, 224, 224, device=device)
    for name, build in builds.items():
        m = build().to(device).eval()
        calls = _record_sdpa(m, x[:2])
        if not calls:
            rows.append([name, 0, "(no SDPA call)", "-", "-"])
            continue
        usable = [_kernels(c) for c in calls]
        common = [k for k in ("flash", "efficient", "cudnn", "math") if all(k in u for u in usable)]
        masked = sum(c[3] is not None for c in calls)
        for _ in range(2):
            m(x)
        fast = _img_per_s(m, x)
        slow = _img_per_s(m, x, ctx=lambda: sdpa_kernel([SDPBackend.MATH]))
        rows.append([name, f"{len(calls)} ({masked} with a bias)", ", ".join(common) or "mixed",
                     f"{fast:.0f}", f"{fast / slow:.2f}x"])
        if not common:
            FAILURES.append(f"SDPA {name}: no kernel accepts every call")
    _table(f"3. SDPA kernels usable by every attention call, fp16 (batch {batch}); speed-up over the math kernel",
           ["model", "SDPA calls", "kernels", "img/s", "vs math"], rows)


def inference_models() -> Dict[str, Callable[[], nn.Module]]:
    import timm

    b = classification_models(224)
    return {"DeiT-S (timm)": lambda: timm.create_model("deit_small_patch16_224"),
            "EViT-DeiT-S 0.7": b["EViT-DeiT-S 0.7"], "ToMe r=13": b["ToMe-DeiT-S r=13"],
            "DeiT III-S": b["DeiT III-S"], "Shunted-T": b["Shunted-T"],
            "Shunted-S": lambda: timm.create_model("shunted_s"),
            "pvt_v2_b1": lambda: timm.create_model("pvt_v2_b1"), "pvt_v2_b2": lambda: timm.create_model("pvt_v2_b2")}


@torch.inference_mode()
def check_inference(device, batch: int, compile_: bool, rounds: int = 3) -> None:
    models, peaks = {}, {}
    x = torch.randn(batch, 3, 224, 224, device=device)
    for name, build in inference_models().items():
        m = build().to(device).eval()
        variants = {"eager": m}
        if compile_:
            variants["compiled"] = torch.compile(copy.deepcopy(m))
        for v, mv in variants.items():
            try:
                torch.cuda.reset_peak_memory_stats(device)
                with torch.autocast("cuda", dtype=torch.float16):
                    for _ in range(3):  # warm-up (compiles)
                        mv(x)
                torch.cuda.synchronize()
                peaks[(name, v)] = torch.cuda.max_memory_allocated(device) / 2**20
                models[(name, v)] = mv
            except Exception as e:  # noqa: BLE001
                FAILURES.append(f"inference {name} {v}: {str(e)[:80]}")
    rates = {k: [] for k in models}
    keys = list(models)
    for r in range(rounds):  # interleaved: every round times every model, in a rotated order
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            rates[k].append(_img_per_s(models[k], x, iters=10, rounds=1))
    base = statistics.median(rates.get(("DeiT-S (timm)", "eager"), [float("nan")]))
    rows = []
    for (name, v), rs in rates.items():
        ips = statistics.median(rs)
        rows.append([name, v, f"{ips:.0f}", f"{ips / base:.2f}x", f"{peaks[(name, v)]:.0f}"])
    _table(f"4. inference, batch {batch}, fp16 autocast, 224 px ({torch.cuda.get_device_name(device)})",
           ["model", "mode", "img/s", "vs timm DeiT-S eager", "peak MiB"], rows)


def check_nccl(device) -> None:
    import torch.distributed as dist

    try:
        store = dist.TCPStore("127.0.0.1", 0, 1, True)
        dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device(device))
        t = torch.ones(4, device=device)
        dist.all_reduce(t)
        ok = bool((t == 1).all())
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001
        ok = False
        print(f"NCCL: {str(e)[:120]}")
    if not ok:
        FAILURES.append("NCCL all-reduce")
    _table("5. NCCL", ["check", "status"], [["1-process all-reduce", "ok" if ok else "FAIL"]])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=256, help="inference batch (training: batch / 4)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile columns")
    p.add_argument("--quick", action="store_true", help="batch 32, no compile (a smoke run)")
    p.add_argument("--cpu-half", action="store_true", help="run only the CPU half (bf16 training steps)")
    args = p.parse_args(argv)
    if args.cpu_half:
        rows = cpu_half()
        _table("bf16 autocast training steps on the CPU (batch 2, narrow models)", ["model", "px", "status", "loss",
               "ms/step"], [[r["model"], r["img"], "ok" if r["ok"] else "FAIL", f"{r['loss']:.3f}", f"{r['ms']:.0f}"]
                            for r in rows])
        return 0 if all(r["ok"] for r in rows) else 1
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (the CPU half runs in the test suite, or with --cpu-half)")
        return 0
    if args.quick:
        args.batch_size, args.no_compile = 32, True
    device = torch.device("cuda", torch.cuda.current_device())
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"leanvit {leanvit.__version__}")
    t0 = time.perf_counter()
    check_training(device, 224, max(2, args.batch_size // 4))
    check_bf16_agreement(device)
    check_sdpa(device, min(args.batch_size, 128))
    check_inference(device, args.batch_size, compile_=not args.no_compile)
    check_nccl(device)
    print(f"\n{time.perf_counter() - t0:.0f} s; {len(FAILURES)} failure(s)")
    for f in FAILURES:
        print(f"FAIL: {f}")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
