"""Benchmark tables: several models (or one model at several reduction strengths and input sizes)
measured side by side in one run.

    from leanvit.measure import benchmark_models, format_table, BENCH_COLUMNS
    rows = benchmark_models({"DeiT-T": deit, "EViT-T 0.7": (evit, (224, 224))}, batch_size=32)
    print(format_table(rows, BENCH_COLUMNS))
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from tqdm import tqdm

from leanvit.deploy.runtimes import RUNTIMES, prepare_runtime
from leanvit.errors import LeanvitError
from leanvit.measure.flops import gmacs
from leanvit.measure.memory import forward_peak_memory_mb
from leanvit.measure.timing import interleaved_measure
from leanvit.models.factory import create_model
from leanvit.reduction import ReductionMethod, applied_reduction, get_reduction, is_none_text
from leanvit.reduction.fixed import AtStrength
from leanvit.utils import check_input_size, model_input_size, to_2tuple

#: a configuration without any reduction (``"none"``), even on a model built with one
NO_REDUCTION = "none"

__all__ = ["ReducedView", "benchmark_models", "build_configurations", "reduction_label", "Configuration",
           "keep_rate_column"]

#: (reduction method name or None, strength or None): None/None = the model as built
Configuration = Tuple[Optional[str], Any]


#: a reduced model at a fixed strength (the one view of :mod:`leanvit.reduction.fixed`)
ReducedView = AtStrength


def reduction_label(model: nn.Module) -> Tuple[str, str]:
    """(method name or '-', strength as text or '-') of a model, a :class:`ReducedView` or a plain model."""
    if isinstance(model, ReducedView):
        return model.method.name, model.method.format_strength(model.value)
    method = applied_reduction(model)
    if method is None:
        return "-", "-"
    return method.name, method.format_strength(method.get_strength(model))


def _row_fields(model: nn.Module) -> Dict[str, str]:
    method, strength = reduction_label(model)
    return dict(reduction=method, strength=strength, keep_rate=keep_rate_column(method, strength))


def keep_rate_column(method: str, strength: str) -> str:
    """The older ``keep_rate`` column: the strength of a method whose knob is a keep rate, else "-"."""
    try:
        return strength if get_reduction(method).knob == "keep_rate" else "-"
    except LeanvitError:  # "-" / "none": no method
        return "-"


def _hw_str(hw) -> str:
    return f"{hw[0]}x{hw[1]}"


def _as_config(label: str, value, img_size) -> Tuple[nn.Module, tuple, dict]:
    if isinstance(value, nn.Module):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not value or not isinstance(value[0], nn.Module):
        raise LeanvitError(f"benchmark_models: '{label}' must map to a model, (model, (H, W)) or "
                           "(model, (H, W), extra fields)")
    model = value[0]
    hw = value[1] if len(value) > 1 and value[1] is not None else None
    if hw is None:
        inner = model.model if isinstance(model, ReducedView) else model
        hw = model_input_size(inner, img_size)
    extra = dict(value[2]) if len(value) > 2 and value[2] else {}
    return model, to_2tuple(hw), extra


def benchmark_models(models: Dict[str, object], batch_size: int = 32, device="cpu", dtype=torch.float32,
                     warmup: int = 2, repeats: int = 5, memory: bool = True, progress: bool = True,
                     img_size=None, runtimes: Sequence[str] = ("eager",), latency_repeats: int = 0,
                     workdir=None, backbones: Optional[Dict[str, nn.Module]] = None) -> List[dict]:
    """Measure several ready-made models; returns one row (a dict) per model, in order.

    Args:
        models: maps a label to a model, to ``(model, (H, W))`` or to ``(model, (H, W), extra)`` where
            ``extra`` is a dict of fields copied into the row (e.g. ``model``). Without a size, ``img_size``
            (int or (H, W)) is used, else the model's own input size.
        batch_size: images per timed forward pass.
        device: where the models run.
        dtype: the models' and inputs' dtype.
        warmup: untimed runs first.
        repeats: models of the same input size are timed interleaved (:func:`interleaved_measure`), the
            median of ``repeats`` runs is reported.
        memory: also measure the peak memory of one forward pass (:func:`forward_peak_memory_mb`).

    Each row has ``label, model, reduction, strength, keep_rate, img_size ("HxW"), batch_size, params_m,
    gmacs, img_per_s, latency_ms, p90_ms, peak_mem_mb, speedup, device, dtype, threads``; ``speedup`` is
    img/s over the first configuration of the same ``model`` and input size. Models are left in eval mode
    on ``device`` in ``dtype``.

    ``runtimes``: measure every model under each of ``eager``, ``compile``, ``onnxruntime``
    (:mod:`leanvit.deploy.runtimes`; labels of non-eager entries get `` [runtime]``); rows then also have
    ``runtime`` and ``setup_s`` (compile time, or ONNX export + session creation). ``latency_repeats > 0``
    adds a batch-1 latency pass, interleaved over all entries of a size: ``lat1_ms`` (median) and
    ``lat1_p90_ms`` (90th percentile) over ``latency_repeats`` runs.

    ``backbones``: maps labels of ``models`` to the part of the model before its head, taking the same input
    (:meth:`leanvit.tasks.Task.backbone_part`); each is timed in the same interleaved run as the whole models,
    and its row gets ``backbone_ms`` (ms per batch) and ``head_share`` (1 - backbone / whole model time, at
    least 0)."""
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise LeanvitError(f"benchmark_models: need batch_size >= 1, repeats >= 1, warmup >= 0 "
                           f"(got {batch_size}, {repeats}, {warmup})")
    if not models:
        raise LeanvitError("benchmark_models: no models given")
    configs = {label: _as_config(label, v, img_size) for label, v in models.items()}
    sources = {label: c[0] for label, c in configs.items()}  # the eager module: params, GMACs, memory
    # --- runtimes (leanvit.deploy.runtimes) -------------------------------------------------------------
    if tuple(runtimes) != ("eager",):
        configs, sources = _with_runtimes(configs, runtimes, batch_size, device, dtype, workdir)
    # -------------------------------------------------------------------------------------------------------
    by_size: Dict[tuple, List[str]] = {}
    for label, (_, hw, _) in configs.items():
        by_size.setdefault(hw, []).append(label)
    steps = tqdm(total=len(configs) * (2 if memory else 1) + len(by_size), desc="bench", unit="step",
                 disable=not progress, leave=False)
    info = {}
    for label, (_model, hw, _extra) in configs.items():
        src = sources[label].eval()
        key = id(src), hw
        if key not in info:
            info[key] = dict(params_m=sum(p.numel() for p in src.parameters()) / 1e6, gmacs=gmacs(src, hw))
        info[label] = info[key]
        steps.update()
    results = {}
    parts = {(k, "backbone"): v for k, v in (backbones or {}).items() if k in configs}
    for hw, labels in by_size.items():
        group = {k: configs[k][0] for k in labels}
        group.update({(k, "backbone"): parts[(k, "backbone")] for k in labels if (k, "backbone") in parts})
        results.update(interleaved_measure(group, batch_size=batch_size, img_size=hw, device=device, dtype=dtype,
                                           warmup=warmup, repeats=repeats))
        steps.update()
    latency = {}
    if latency_repeats > 0:  # batch-1 latency: median and p90 over interleaved runs
        for hw, labels in by_size.items():
            latency.update(interleaved_measure({k: configs[k][0] for k in labels}, batch_size=1, img_size=hw,
                                               device=device, dtype=dtype, warmup=max(warmup, 2),
                                               repeats=latency_repeats))
    rows, base = [], {}
    for label, (model, hw, extra) in configs.items():
        m = results[label]
        if memory:
            if extra.get("runtime", "eager") == "eager":
                m.peak_mem_mb = forward_peak_memory_mb(model, batch_size, hw, device, dtype)
            steps.update()
        if label in latency:
            extra = dict(extra, lat1_ms=latency[label].latency_ms, lat1_p90_ms=latency[label].p90_ms)
        if (label, "backbone") in results:
            b = results[(label, "backbone")].latency_ms
            extra = dict(extra, backbone_ms=b, head_share=max(0.0, 1.0 - b / m.latency_ms))
        row = {"label": label, **_row_fields(sources[label]), **extra}
        row.setdefault("model", label)
        ref = base.setdefault((row["model"], hw), m.img_per_s)
        row.update(img_size=_hw_str(hw), batch_size=batch_size, **info[label], img_per_s=m.img_per_s,
                   latency_ms=m.latency_ms, p90_ms=m.p90_ms, peak_mem_mb=m.peak_mem_mb,
                   speedup=m.img_per_s / ref, device=m.device, dtype=m.dtype, threads=m.threads)
        rows.append(row)
    steps.close()
    return rows


def _with_runtimes(configs: dict, runtimes: Sequence[str], batch_size: int, device, dtype, workdir):
    """One entry per (configuration, runtime), the eager one first under its own label."""
    bad = [r for r in runtimes if r not in RUNTIMES]
    if bad or not runtimes:
        raise LeanvitError(f"unknown runtime(s) {', '.join(bad) or '(none)'} (known: {', '.join(RUNTIMES)})")
    if "onnxruntime" in runtimes and (torch.device(device).type != "cpu" or dtype != torch.float32):
        raise LeanvitError("the onnxruntime runtime is measured on the CPU in float32 here")
    out, sources = {}, {}
    for label, (model, hw, extra) in configs.items():
        model = model.to(device=device, dtype=dtype).eval()
        for rt in runtimes:
            example = torch.randn(batch_size, 3, *hw, device=device, dtype=dtype)
            prepared = prepare_runtime(model, rt, example, workdir=workdir)
            name = label if rt == "eager" else f"{label} [{rt}]"
            row = dict(extra, runtime=rt, setup_s=prepared.setup_s)
            row.setdefault("model", label)
            out[name] = (prepared.model, hw, row)
            sources[name] = model
    return out, sources


def _create_at_size(name: str, size, num_classes):
    if size is None:
        return create_model(name, num_classes=num_classes)
    try:
        model = create_model(name, img_size=size, num_classes=num_classes)
    except LeanvitError:
        model = create_model(name, num_classes=num_classes)
        if hasattr(model, "patch_embed"):  # a model with a fixed input size that cannot change it
            raise
        return model  # convolutional models take any input size as they are
    except (RuntimeError, ValueError, AssertionError) as e:
        raise LeanvitError(f"{name} cannot be built for input size {size[0]}x{size[1]}: {e}") from None
    check_input_size(model, size, "`img_sizes`")
    return model


def _can_reduce(model: nn.Module) -> bool:
    if applied_reduction(model) is not None:
        return True
    return (all(hasattr(model, a) for a in ("blocks", "patch_embed", "_pos_embed"))
            and getattr(model, "cls_token", None) is not None)


def _normalize(item) -> Tuple[Optional[ReductionMethod], Any]:
    """(method, strength) from a pair, None (the model as built) or a bare number (an EViT keep rate)."""
    if item is None:
        return None, None
    if not isinstance(item, (tuple, list)):
        item = ("evit", item)
    name, value = item
    if name is None:
        return None, None
    if is_none_text(name):
        return NO_REDUCTION, None
    method = get_reduction(name)
    return method, method.check_strength(method.none_value if value is None else value)


def build_configurations(model_names: Sequence[str], reductions: Sequence[Configuration] = ((None, None),),
                         img_sizes: Sequence[Optional[tuple]] = (None,), num_classes: Optional[int] = None,
                         notes: Optional[list] = None) -> Dict[str, Tuple[nn.Module, tuple, dict]]:
    """Models for every (image size, model, reduction), ready for :func:`benchmark_models`.

    ``reductions``: (method, strength) pairs, e.g. ``[(None, None), ("evit", 0.7), ("evit", 0.5)]``
    (a bare number is an EViT keep rate); (None, None) measures the model as built (an ``evit_*`` model at
    its own rate, others unmodified), ``("none", None)`` the model without any reduction;
    a method runs a model that has it at that strength, or applies it to a plain timm ViT (all strengths
    of one method share one model). Models that cannot be reduced (no class-token ViT) are measured once,
    as built, and a note says so."""
    notes = [] if notes is None else notes
    wanted_all = [_normalize(r) for r in reductions]
    configs: Dict[str, Tuple[nn.Module, tuple, dict]] = {}
    for size in img_sizes:
        for name in model_names:
            model = _create_at_size(name, size, num_classes)
            hw = model_input_size(model, size)
            wanted = wanted_all
            if not _can_reduce(model) and any(m not in (None, NO_REDUCTION) for m, _ in wanted):
                notes.append(f"{name} is not a ViT with a class token: measured once, without a reduction")
                wanted = [(None, None)]
            own = applied_reduction(model)
            reduced: Dict[str, nn.Module] = {}  # one model per method, shared by its strengths
            if own is not None:
                reduced[own.name] = model
            for method, value in wanted:
                if method is None:
                    m = model
                elif method is NO_REDUCTION:  # no reduction, even on a model built with one
                    m = model if own is None else own.remove(copy.deepcopy(model))
                else:
                    if method.name not in reduced:
                        base = copy.deepcopy(model)
                        if own is not None:
                            own.remove(base)
                        reduced[method.name] = method.apply(base, **{method.knob: method.none_value})
                    m = ReducedView(reduced[method.name], method, value)
                fields = _row_fields(m)
                shown = f" {fields['reduction']} {fields['strength']}" if fields["reduction"] != "-" else ""
                if method is NO_REDUCTION and own is not None:
                    shown = " none"
                label = f"{name}{shown} @{_hw_str(hw)}"
                label = label.replace(" evit ", " keep ")  # EViT rows read as before: "deit keep 0.7 @224x224"
                if label not in configs:  # e.g. 'none' and the EViT model's own rate: measured once
                    configs[label] = (m, hw, dict(model=name, **fields))
    return configs
