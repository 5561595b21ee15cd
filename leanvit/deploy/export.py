"""Export a model to ONNX or a ``torch.export`` program (``.pt2``) and check the file against PyTorch.

- The batch dimension is always dynamic (any batch size from 1).
- ``dynamic_size=True`` also makes height and width dynamic, for models whose computation does not depend
  on a fixed patch grid (the Shunted Transformer: its input-size check is recorded with ``torch._check``,
  so the graph keeps the sizes symbolic instead of specializing to the example's). The smallest side an
  exported dynamic-size graph accepts is :func:`min_dynamic_side` (63 px for Shunted: below it a stage grid
  would be 1 x 1, which export specializes); export a fixed size for smaller inputs.
- Token reduction settings are fixed in the file: an EViT model exported at keep rate 0.7 always keeps
  70 % of the tokens (the kept count is a constant of the graph). Export one file per keep rate.

:func:`verify_export` runs the file (:class:`OnnxRuntimeModel`, onnxruntime, for ONNX; the loaded
ExportedProgram for .pt2) on random inputs and returns the max abs difference to eager PyTorch.

ONNX needs the optional ``onnx``, ``onnxscript`` and ``onnxruntime`` (``pip install leanvit[export]``).
"""
from __future__ import annotations

import importlib
import logging
import os
import tempfile
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import to_2tuple
from torch.export import Dim

from leanvit.errors import LeanvitError
from leanvit.models.shunted import ShuntedTransformer, min_input_size

__all__ = ["FORMATS", "export_model", "load_exported", "verify_export", "VerifyResult", "supports_dynamic_size",
           "min_dynamic_side", "keep_rate_path", "format_from_path", "OnnxRuntimeModel", "require"]

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "pt2")
MAX_SIDE = 8192
MAX_BATCH = 4096


def require(module: str, extra: str = "export"):
    """Import an optional dependency, or a clear error naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise LeanvitError(f"{module} is not installed; pip install 'leanvit[{extra}]' "
                           "(onnx, onnxscript, onnxruntime)") from None


class OnnxRuntimeModel(nn.Module):
    """An ONNX file run by onnxruntime (CPU), callable like the PyTorch model: image tensor in, logits out.

    ``threads``: onnxruntime's intra-op threads (default: torch's current thread count, so that the
    runtimes compare at equal parallelism).

    ``spinning``: onnxruntime's worker threads busy-wait after each run by default. That keeps the cores
    busy while whatever runs next (PyTorch, another session) competes with them: in an interleaved
    benchmark on 2 cores it slowed the following model up to 2x and made batch-1 comparisons meaningless.
    Off by default here (it costs onnxruntime itself ~5 %); turn it on for a process that only serves this
    one session."""

    def __init__(self, path, threads: Optional[int] = None, spinning: bool = False):
        super().__init__()
        ort = require("onnxruntime")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or torch.get_num_threads())
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = str(path)
        try:
            self.session = ort.InferenceSession(self.path, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own error types for unreadable files
            raise LeanvitError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}") from None
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: arr})[0])

    def extra_repr(self) -> str:
        return f"path={self.path!r}"


def format_from_path(path) -> Optional[str]:
    suffix = Path(path).suffix.lower()
    return {".onnx": "onnx", ".pt2": "pt2"}.get(suffix)


def supports_dynamic_size(model: nn.Module) -> bool:
    """Whether the model's graph can keep height and width symbolic (Shunted: yes; ViTs: their position
    embedding and EViT's kept-token counts follow one patch grid, so no)."""
    return isinstance(model, ShuntedTransformer)


def min_dynamic_side(model: nn.Module) -> int:
    """The smallest side a dynamic-size export accepts: every stage grid at least 2 and at least twice its
    aggregation rate, so that no feature map is 1 x 1 (sizes 0 and 1 are specialized by torch.export)."""
    rates = tuple(getattr(model, "sr_ratios", (8, 4, 2, 1)))[:getattr(model, "num_stages", 4)]
    return min_input_size(tuple(max(2, 2 * r) for r in rates))


def keep_rate_path(path, rate: float) -> Path:
    """``evit.onnx`` + 0.7 -> ``evit_keep0.7.onnx`` (one file per keep rate)."""
    p = Path(path)
    return p.with_name(f"{p.stem}_keep{rate:g}{p.suffix}")


def _dynamic_shapes(model: nn.Module, hw: Tuple[int, int], dynamic_size: bool):
    dims = {0: Dim("batch", min=1, max=MAX_BATCH)}
    if dynamic_size:
        if not supports_dynamic_size(model):
            raise LeanvitError(
                f"`dynamic_size`: {type(model).__name__} computes on a fixed patch grid (position embedding, "
                "EViT's kept-token counts); export one file per input size instead")
        lo = min_dynamic_side(model)
        if min(hw) < lo:
            raise LeanvitError(f"`dynamic_size` needs an example size with each side >= {lo} px, got "
                               f"{hw[0]}x{hw[1]}")
        dims[2] = Dim("height", min=lo, max=MAX_SIDE)
        dims[3] = Dim("width", min=lo, max=MAX_SIDE)
    return (dims,)


def export_model(model: nn.Module, path, fmt: Optional[str] = None, img_size=224, dynamic_size: bool = False,
                 in_chans: int = 3, opset: Optional[int] = None, example_batch: int = 2) -> Path:
    """Write ``model`` (eval mode, its current keep rate) to ``path`` as ONNX or .pt2; returns the path.

    Written to a temporary file next to ``path`` and renamed over it, so a failed export leaves no
    half-written file."""
    path = Path(path)
    fmt = fmt or format_from_path(path)
    if fmt not in FORMATS:
        raise LeanvitError(f"unknown export format {fmt!r} (use {' or '.join(FORMATS)}, or a .onnx/.pt2 path)")
    if path.is_dir():
        raise LeanvitError(f"`output` {path} is a folder; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    hw = to_2tuple(img_size)
    example = torch.randn(example_batch, in_chans, *hw)
    shapes = _dynamic_shapes(model, hw, dynamic_size)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=str(path.parent))
    os.close(fd)
    try:
        with torch.no_grad():
            if fmt == "pt2":
                program = torch.export.export(model, (example,), dynamic_shapes=shapes)
                torch.export.save(program, tmp)
            else:
                require("onnx")
                require("onnxscript")
                kwargs = {} if opset is None else {"opset_version": opset}
                torch.onnx.export(model, (example,), tmp, dynamo=True, dynamic_shapes=shapes,
                                  input_names=["image"], output_names=["logits"], external_data=False,
                                  verbose=False, **kwargs)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; an export is an ordinary file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.debug("exported %s to %s", type(model).__name__, path)
    return path


def load_exported(path, fmt: Optional[str] = None, threads: Optional[int] = None):
    """A callable (images -> logits) running an exported file: onnxruntime for ONNX, the ExportedProgram's
    module for .pt2."""
    path = Path(path)
    fmt = fmt or format_from_path(path)
    if not path.exists():
        raise FileNotFoundError(2, "No such exported model", str(path))
    if fmt == "onnx":
        return OnnxRuntimeModel(path, threads=threads)
    if fmt == "pt2":
        return torch.export.load(str(path)).module()
    raise LeanvitError(f"unknown export format {fmt!r} (use {' or '.join(FORMATS)})")


class VerifyResult(NamedTuple):
    batch_size: int
    img_size: Tuple[int, int]
    max_abs_diff: float


def verify_export(model: nn.Module, path, fmt: Optional[str] = None,
                  img_sizes: Sequence = ((224, 224),), batch_sizes: Sequence[int] = (1, 3), in_chans: int = 3,
                  seed: int = 0, threads: Optional[int] = None) -> List[VerifyResult]:
    """Max abs difference between the exported file and eager ``model`` on random inputs (N(0, 1) images,
    one per batch size and image size)."""
    runner = load_exported(path, fmt, threads=threads)
    gen = torch.Generator().manual_seed(seed)
    out = []
    model = model.eval()
    for hw in img_sizes:
        hw = to_2tuple(hw)
        for b in batch_sizes:
            x = torch.randn(b, in_chans, *hw, generator=gen)
            with torch.no_grad():
                want = model(x)
                got = runner(x)
            if tuple(got.shape) != tuple(want.shape):
                raise LeanvitError(f"{path}: output shape {tuple(got.shape)} differs from PyTorch's "
                                   f"{tuple(want.shape)} at batch {b}, {hw[0]}x{hw[1]}")
            out.append(VerifyResult(b, hw, float((got.float() - want.float()).abs().max())))
    return out
