"""Deployment: export a model to ONNX or a ``torch.export`` program and check the file against PyTorch
(:mod:`leanvit.deploy.export`, which also holds the onnxruntime runner), and the same model behind the eager,
``torch.compile`` and onnxruntime runtimes for benchmarks (:mod:`leanvit.deploy.runtimes`)."""
from leanvit.deploy.export import (
    FORMATS,
    OnnxRuntimeModel,
    VerifyResult,
    export_model,
    format_from_path,
    keep_rate_path,
    load_exported,
    min_dynamic_side,
    supports_dynamic_size,
    verify_export,
)
from leanvit.deploy.runtimes import RUNTIMES, RuntimeModel, compile_model, prepare_runtime

__all__ = ["FORMATS", "OnnxRuntimeModel", "VerifyResult", "export_model", "format_from_path", "keep_rate_path",
           "load_exported", "min_dynamic_side", "supports_dynamic_size", "verify_export", "RUNTIMES",
           "RuntimeModel", "compile_model", "prepare_runtime"]
