"""Small helpers every part of leanvit shares: image sizes, devices and the machine (threads, load).

Nothing here builds models, parses arguments or prints.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import platform
import time
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from leanvit.errors import LeanvitError

__all__ = ["Size", "to_2tuple", "img_size_arg", "model_input_size", "check_input_size", "resolve_device",
           "sync_device", "timed_forward", "environment", "machine_load", "busy_note", "retain_freed_memory",
           "format_metric"]

Size = Union[int, Sequence[int]]


# ---------------------------------------------------------------------------------------------
# Input sizes
def to_2tuple(size: Size) -> Tuple[int, int]:
    """``S`` -> ``(S, S)``; ``(H, W)`` -> ``(H, W)`` as ints."""
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        return int(size), int(size)
    h, w = tuple(size)
    return int(h), int(w)


def img_size_arg(values, what: str = "`img_size`") -> Optional[Tuple[int, int]]:
    """An image size given as ``S`` or ``(H, W)`` (``--img-size S`` / ``H W``) as (H, W), or None; a clear error
    for bad values (naming the setting as ``what``)."""
    if values is None:
        return None
    values = [values] if isinstance(values, int) else list(values)
    if not 1 <= len(values) <= 2 or min(values) < 1:
        raise LeanvitError(f"{what} takes S or H W with positive values, got {' '.join(map(str, values))}")
    return to_2tuple(values[0] if len(values) == 1 else values)


def model_input_size(model: nn.Module, img_size: Optional[Size] = None) -> Tuple[int, int]:
    """(H, W) the model expects: ``img_size`` if given, else from the model or its pretrained cfg."""
    if img_size is not None:
        return to_2tuple(img_size)
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        return to_2tuple(pe.img_size)
    size = getattr(model, "img_size", None)
    if size is not None:
        return to_2tuple(size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return to_2tuple(cfg.get("input_size", (3, 224, 224))[-2:])


def check_input_size(model: nn.Module, hw: Size, what: str = "`img_size`") -> None:
    """A clear error when a patch model cannot take an (H, W) input (smaller than one patch)."""
    ps = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if ps is None:
        return
    (ph, pw), (h, w) = to_2tuple(ps), to_2tuple(hw)
    if h < ph or w < pw:
        raise LeanvitError(f"{what} {h}x{w} is smaller than the model's {ph}x{pw} px patches")


# ---------------------------------------------------------------------------------------------
# Devices and the machine
def resolve_device(name: Optional[str]) -> torch.device:
    """``cpu`` / ``cuda`` / ``cuda:N`` / ``mps`` checked against this machine (None: cuda when available)."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise LeanvitError(f"unknown device '{name}' (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LeanvitError("`device` cuda: no CUDA device is available here (use cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LeanvitError(f"`device` {name}: only {torch.cuda.device_count()} CUDA device(s) available")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise LeanvitError("`device` mps: MPS is not available here")
    elif dev.type != "cpu":
        raise LeanvitError(f"unsupported device '{name}' (use cpu, cuda or cuda:N)")
    return dev


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_forward(model, inputs, device: torch.device, amp: bool = False, **kwargs):
    """``model(inputs, **kwargs)`` under autocast when ``amp`` (fp16 on CUDA, bf16 on CPU), and the seconds
    it took with the device synchronized before and after: what evaluations report as forward time."""
    sync_device(device)
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16, enabled=amp):
        out = model(inputs, **kwargs)
    sync_device(device)
    return out, time.perf_counter() - t0


def format_metric(value, spec: str = ".4f") -> str:
    """A metric as text; an undefined one (None, NaN) as ``n/a``, never as a score."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def environment(device="cpu") -> str:
    """One line naming the device, torch version and CPU threads (printed beside every timing)."""
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    return f"device={dev} ({name}), torch {torch.__version__}, threads={torch.get_num_threads()}"


def machine_load() -> Optional[Tuple[float, int]]:
    """(1-minute load average, CPU cores available to this process), or None where unknown."""
    if not hasattr(os, "getloadavg"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return os.getloadavg()[0], cores


def busy_note(device="cpu") -> Optional[str]:
    """A warning when the load is above the cores available (other work competes: CPU timings are then not
    trustworthy). The same rule as :class:`leanvit.measure.load.LoadWatch`; a measurement's own threads alone
    do not trip it."""
    if torch.device(device).type != "cpu":
        return None
    load = machine_load()
    if load is None or load[0] <= load[1]:
        return None
    return (f"the machine is busy (load {load[0]:.1f} on {load[1]} cores): timings vary with the other work; "
            "compare configurations from one run (they are interleaved) or measure on one thread")


# ---------------------------------------------------------------------------------------------
# The process's memory allocator

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def retain_freed_memory(threshold_bytes: int = 2 ** 31 - 1) -> bool:
    """Make glibc's malloc keep the memory PyTorch frees in the process, for the next tensor, instead of
    handing every large block back to the operating system; returns whether it applied (glibc only).

    Why: glibc serves each allocation above its mmap threshold (at most 32 MB by default) with a fresh
    ``mmap`` and unmaps it when freed, so a tensor of that size is page-faulted in, one zeroed page at a
    time, on every call. At 512x512 a segmenter's 150-class logits are 157 MB per image: on a 2-core
    machine faulting them in costs about as much as a third of the ViT's forward pass, a cost no model
    change can remove. PyTorch's CPU performance guide recommends tcmalloc or jemalloc for the same reason;
    this sets glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` (``mallopt``) to ``threshold_bytes``,
    which the environment can do too:
    ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...:glibc.malloc.trim_threshold=...``. The process keeps
    its peak memory (it is not returned until exit). Values computed are unchanged.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        value = ctypes.c_int(max(0, min(int(threshold_bytes), 2 ** 31 - 1)))
        ok_mmap = libc.mallopt(_M_MMAP_THRESHOLD, value)
        ok_trim = libc.mallopt(_M_TRIM_THRESHOLD, value)
    except (OSError, AttributeError):
        return False
    return bool(ok_mmap and ok_trim)
