"""The same model behind different runtimes, as callables that :mod:`leanvit.measure.timing` can time
(``leanvit bench --runtime``).

- ``eager``: the PyTorch module as it is;
- ``compile``: ``torch.compile(model)``; the compile time is measured (the first call) and reported;
- ``onnxruntime``: the model exported to ONNX (dynamo exporter, dynamic batch) and run by an onnxruntime
  ``InferenceSession`` on the CPU, wrapped in an ``nn.Module`` that takes and returns torch tensors.

A token-reduction setting (EViT's keep rate) is part of what an exported or compiled graph computes: an
ONNX file has its keep rate baked in, and a compiled EViT model recompiles for every new keep rate
(see :func:`compile_model`). Prepare one runtime model per keep rate.

onnx, onnxscript and onnxruntime are optional (``pip install leanvit[export]``); they are imported only
when an ONNX runtime is asked for (:mod:`leanvit.deploy.export` exports and runs the file).
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from leanvit.deploy.export import OnnxRuntimeModel, export_model
from leanvit.errors import LeanvitError

__all__ = ["RUNTIMES", "RuntimeModel", "prepare_runtime", "compile_model"]

logger = logging.getLogger(__name__)

RUNTIMES = ("eager", "compile", "onnxruntime")


def compile_model(model: nn.Module, dynamic: Optional[bool] = None, **kwargs) -> nn.Module:
    """``torch.compile(model, dynamic=dynamic)``.

    EViT: the number of kept tokens is a Python int derived from the keep rate, so a new keep rate is a
    new graph (a recompile; by default dynamo then marks the sizes dynamic, ``dynamic=None``).
    ``benchmarks/bench_export.py`` measures one compile per keep rate against ``dynamic=True``; the
    README quotes the result. Either way, prepare (and warm up) one compiled model per keep rate you use.
    """
    return torch.compile(model, dynamic=dynamic, **kwargs)


class RuntimeModel(NamedTuple):
    model: nn.Module      # callable: images -> logits
    runtime: str
    setup_s: float        # compile time (compile), export + session creation time (onnxruntime), 0 (eager)


def prepare_runtime(model: nn.Module, runtime: str, example: torch.Tensor, workdir=None,
                    threads: Optional[int] = None, dynamic: Optional[bool] = None) -> RuntimeModel:
    """``model`` ready to run under ``runtime`` (one of :data:`RUNTIMES`), warmed up on ``example``.

    ``workdir``: where the ONNX file goes (default: a temporary folder kept for the session's lifetime)."""
    if runtime not in RUNTIMES:
        raise LeanvitError(f"unknown runtime '{runtime}' (known: {', '.join(RUNTIMES)})")
    model = model.eval()
    if runtime == "eager":
        return RuntimeModel(model, runtime, 0.0)
    t0 = time.perf_counter()
    if runtime == "compile":
        compiled = compile_model(model, dynamic=dynamic)
        with torch.inference_mode():
            compiled(example)
        return RuntimeModel(compiled, runtime, time.perf_counter() - t0)
    if example.device.type != "cpu":
        raise LeanvitError("the onnxruntime runtime runs on the CPU here; use `device` cpu")
    folder = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="leanvit_ort_"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"model_{id(model):x}_{example.shape[-2]}x{example.shape[-1]}.onnx"
    export_model(model, path, "onnx", tuple(example.shape[-2:]), in_chans=example.shape[1])
    ort_model = OnnxRuntimeModel(path, threads=threads)
    ort_model(example)
    return RuntimeModel(ort_model, runtime, time.perf_counter() - t0)
