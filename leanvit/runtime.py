"""Plumbing every tool and library module shares: sizes, devices, the environment string, machine load,
input-size checks, and building a ready model from a name and/or a checkpoint.

Nothing here parses arguments or prints; tools turn these into flags and messages.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from leanvit.checkpoints import load_checkpoint, read_checkpoint, state_dict_from
from leanvit.errors import LeanvitError
from leanvit.models.factory import create_model

__all__ = ["to_2tuple", "img_size_arg", "resolve_device", "sync_device", "timed_forward", "environment", "machine_load",
           "busy_note", "check_input_size", "model_input_size", "checkpoint_num_classes", "BuiltModel",
           "build_model", "recorded_spec"]

Size = Union[int, Sequence[int]]
_CLASSIFIER_KEYS = ("head.weight", "head.fc.weight", "fc.weight", "classifier.weight", "head.l.weight")


def to_2tuple(size: Size) -> Tuple[int, int]:
    """``S`` -> ``(S, S)``; ``(H, W)`` -> ``(H, W)`` as ints."""
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        return int(size), int(size)
    h, w = tuple(size)
    return int(h), int(w)


def img_size_arg(values, flag: str = "--img-size") -> Optional[Tuple[int, int]]:
    """An ``--img-size S`` / ``S`` / ``H W`` value as (H, W), or None; a clear error for bad values."""
    if values is None:
        return None
    values = [values] if isinstance(values, int) else list(values)
    if not 1 <= len(values) <= 2 or min(values) < 1:
        raise LeanvitError(f"{flag} takes S or H W with positive values, got {' '.join(map(str, values))}")
    return to_2tuple(values[0] if len(values) == 1 else values)


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
            raise LeanvitError("--device cuda: no CUDA device is available here (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LeanvitError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) available")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise LeanvitError("--device mps: MPS is not available here")
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
            "compare configurations from one run (they are interleaved) or use --threads 1")


# ---------------------------------------------------------------------------------------------
# Input sizes
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


def check_input_size(model: nn.Module, hw: Size, flag: str = "--img-size") -> None:
    """A clear error when a patch model cannot take an (H, W) input (smaller than one patch)."""
    ps = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if ps is None:
        return
    (ph, pw), (h, w) = to_2tuple(ps), to_2tuple(hw)
    if h < ph or w < pw:
        raise LeanvitError(f"{flag} {h}x{w} is smaller than the model's {ph}x{pw} px patches")


# ---------------------------------------------------------------------------------------------
# A model from a name and/or a checkpoint
def checkpoint_num_classes(state_dict: Dict[str, torch.Tensor]) -> Optional[int]:
    """Number of classes of the classifier stored in a state dict, if recognizable."""
    for k in _CLASSIFIER_KEYS:
        v = state_dict.get(k)
        if v is not None and v.ndim == 2:
            return int(v.shape[0])
    return None


def recorded_spec(obj) -> Optional[dict]:
    """The model spec a leanvit training checkpoint (already read) records (``{"name", "kwargs", ...}``)."""
    if isinstance(obj, dict):
        spec = obj.get("model_spec")
        if isinstance(spec, dict) and isinstance(spec.get("name"), str):
            return spec
    return None


def _checkpoint_input_size(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Optional[tuple]:
    """The (H, W) a ViT checkpoint was trained at, from its position embedding, where it differs from
    ``model``'s (square grids only; None when unknown or equal)."""
    pos = state_dict.get("pos_embed")
    own = getattr(model, "pos_embed", None)
    pe = getattr(model, "patch_embed", None)
    if pos is None or own is None or pos.ndim != 3 or getattr(pe, "grid_size", None) is None:
        return None
    gh, gw = pe.grid_size
    prefix = own.shape[1] - gh * gw  # position embeddings of class/distillation tokens, if the model has them
    n = pos.shape[1] - prefix
    side = math.isqrt(max(n, 0))
    if side < 1 or side * side != n or (side, side) == (gh, gw):
        return None
    ph, pw = to_2tuple(pe.patch_size)
    return side * ph, side * pw


def _create(name: str, **kwargs) -> nn.Module:
    try:
        return create_model(name, **kwargs)
    except LeanvitError:
        raise
    except (RuntimeError, ValueError, AssertionError) as e:  # e.g. an input size timm cannot build
        opts = ", ".join(f"{k}={v}" for k, v in kwargs.items() if v is not None)
        raise LeanvitError(f"cannot build {name} ({opts}): {e}") from None


class BuiltModel(NamedTuple):
    model: nn.Module
    name: str
    img_size: Tuple[int, int]     # (H, W) to evaluate at
    config: Optional[dict]        # the training settings a ``leanvit train`` checkpoint records
    checkpoint: Optional[dict]    # the whole checkpoint as read (None without one)


def build_model(name: Optional[str] = None, checkpoint=None, reduction: Optional[dict] = None,
                img_size: Optional[Size] = None, num_classes: Optional[int] = None,
                data_classes: Optional[int] = None) -> BuiltModel:
    """A model ready for evaluation, benchmarking or visualization (eval mode, weights loaded strictly).

    Args:
        name: a registered model name; may be None with a checkpoint written by ``leanvit train``, which
            records its model (``model_spec``: name, options and token reduction).
        checkpoint: a local file (see :func:`leanvit.load_checkpoint`), read once.
        reduction: ``{"method": "evit", "keep_rate": 0.7, ...}`` applied on top (replaces a recorded one).
        img_size: int or (H, W); default: the recorded one, else the size of the checkpoint's position
            embedding, else the model's own.
        num_classes: default: the checkpoint's classifier, else the recorded one, else ``data_classes``.
    """
    if img_size is not None:
        img_size = img_size_arg(img_size)
    if num_classes is not None and num_classes < 1:
        raise LeanvitError(f"--num-classes must be >= 1, got {num_classes}")
    opts: Dict[str, Any] = {}
    sd = obj = None
    if checkpoint is not None:
        obj = read_checkpoint(checkpoint)
        spec = recorded_spec(obj)
        if name is None:
            if spec is None:
                raise LeanvitError(f"{checkpoint} does not record its model; name it with --model")
            name = spec["name"]
        if spec is not None and spec["name"] == name:
            opts = {k: v for k, v in dict(spec.get("kwargs") or {}).items() if k != "pretrained"}
            if spec.get("reduction") and reduction is None:
                opts["reduction"] = dict(spec["reduction"])
        sd = state_dict_from(obj, checkpoint)
        if num_classes is None:
            num_classes = checkpoint_num_classes(sd)
    elif name is None:
        raise LeanvitError("name a model with --model (or give a --checkpoint written by leanvit train)")
    if num_classes is None and opts.get("num_classes") is None:
        num_classes = data_classes
    if reduction is not None:
        opts.pop("keep_rate", None)
        opts.pop("locations", None)
        old = opts.pop("reduction", None) or {}
        if old.get("method") == reduction.get("method") and "locations" in old and "locations" not in reduction:
            reduction = {**reduction, "locations": old["locations"]}  # same method: keep the trained layers
        opts["reduction"] = reduction
    for key, value in (("img_size", img_size), ("num_classes", num_classes)):
        if value is not None:
            opts[key] = value
    try:
        model = _create(name, **opts)
    except LeanvitError:
        if "img_size" not in opts:
            raise
        model = _create(name, **{k: v for k, v in opts.items() if k != "img_size"})
        if hasattr(model, "patch_embed"):  # a ViT that cannot take this size: the first error says why
            raise
    if sd is not None and img_size is None:
        trained = _checkpoint_input_size(sd, model)
        if trained is not None:  # e.g. a 384 px checkpoint: evaluate at the size it was trained at
            opts["img_size"] = trained
            model = _create(name, **opts)
    hw = model_input_size(model, opts.get("img_size"))
    check_input_size(model, hw)
    config = None
    if checkpoint is not None:
        load_checkpoint(model, sd, strict=True, name=str(checkpoint))
        config = obj.get("config") if isinstance(obj, dict) and isinstance(obj.get("config"), dict) else None
    return BuiltModel(model.eval(), name, hw, config, obj if isinstance(obj, dict) else None)
