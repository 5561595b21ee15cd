"""Loading and saving checkpoints safely.

Reads plain state dicts, ``{"model": state_dict}`` (EViT/DeiT/DeiT III training files, leanvit's own)
and ``.safetensors`` files, only with ``torch.load(weights_only=True)``: nothing is ever unpickled.
For timm Vision Transformers (EViT models included) timm's own ``checkpoint_filter_fn`` maps the
official layouts (DeiT III ``gamma_1/gamma_2`` -> ``ls1/ls2.gamma``) and resamples the position
embedding to the model's grid, so a 224 px checkpoint loads into a 288 px or 256x320 model.
Other models may define ``filter_checkpoint(state_dict) -> state_dict`` for their own mapping.

Writes are atomic: a temporary file in the same folder, flushed to disk, then renamed over the
target, so a crash never leaves a half-written checkpoint in place of a good one.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import torch
import torch.nn as nn
from timm.models.eva import Eva
from timm.models.eva import checkpoint_filter_fn as eva_checkpoint_filter_fn
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from leanvit.errors import DISK_ERRNOS, LeanvitError

__all__ = ["read_checkpoint", "read_state_dict", "state_dict_from", "load_checkpoint", "save_checkpoint",
           "write_atomically", "LoadResult", "disk_error", "check_writable", "DISK_ERRNOS"]


def _cause(folder: Path, e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
        return e.strerror or os.strerror(e.errno)
    try:  # torch.save reports a failed write as a RuntimeError without the reason: look at the disk
        st = os.statvfs(folder)
        if st.f_bavail * st.f_frsize < 64 * 2 ** 20:
            return f"no space left on device ({st.f_bavail * st.f_frsize / 2 ** 20:.1f} MB free)"
    except OSError:
        pass
    first = str(e).strip().splitlines()
    return first[-1].strip() if first else type(e).__name__


def disk_error(path, e: BaseException) -> Optional[LeanvitError]:
    """A one-line :class:`LeanvitError` naming the folder and the cause when ``e`` is a failed write to
    ``path`` (a full, read-only or unwritable disk; torch.save's "file write failed"), else None."""
    write_failed = isinstance(e, RuntimeError) and ("write" in str(e).lower() and "fail" in str(e).lower())
    if not (isinstance(e, OSError) and e.errno in DISK_ERRNOS) and not write_failed:
        return None
    folder = Path(path).parent
    return LeanvitError(f"cannot write {Path(path).name} in {folder}: {_cause(folder, e)}")


def check_writable(folder, what: str = "the output folder") -> Path:
    """Create ``folder`` (and its parents) if needed and write a small file in it, before any work whose
    result would go there: a full, read-only or unwritable disk is a one-line :class:`LeanvitError` now,
    not after the work."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".leanvit-probe.", dir=str(folder))
        try:
            os.write(fd, b"0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(tmp)
    except OSError as e:
        raise LeanvitError(f"cannot write in {what} {folder}: {e.strerror or e}") from None
    return folder

_WRAPPER_KEYS = ("model", "state_dict", "model_state", "module")
_PREFIXES = ("module.", "_orig_mod.")


class LoadResult(NamedTuple):
    missing_keys: List[str]
    unexpected_keys: List[str]
    skipped_keys: List[str]  # present in both but dropped (e.g. a classifier of another size)


_ONCE: Optional[dict] = None  # while reading_once() is active: the last file read, {"key": ..., "obj": ...}


@contextmanager
def reading_once():
    """Within it, reading the same unchanged checkpoint file again returns what the first read returned (a
    shallow copy of it): a command that asks for a checkpoint's task, model and data options reads the file once.
    Only the last file read is kept, so a command going through several checkpoints holds one at a time."""
    global _ONCE
    outer, _ONCE = _ONCE, {}
    try:
        yield
    finally:
        _ONCE = outer


def read_checkpoint(path) -> Any:
    """What a checkpoint file holds (``torch.load(weights_only=True)`` or safetensors), clear errors otherwise."""
    path = Path(path)
    if _ONCE is not None and path.is_file():
        st = path.stat()
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
        if _ONCE.get("key") != key:
            _ONCE.clear()
            _ONCE.update(key=key, obj=_read_checkpoint_file(path))
        obj = _ONCE["obj"]
        return dict(obj) if isinstance(obj, dict) else obj
    return _read_checkpoint_file(path)


def _read_checkpoint_file(path: Path) -> Any:
    if not path.exists():
        raise FileNotFoundError(2, "No such checkpoint", str(path))
    if path.is_dir():
        raise LeanvitError(f"checkpoint path is a directory: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise LeanvitError(f"cannot read {path} as safetensors: {e}") from None
    try:
        # Official DeiT/EViT/DeiT III training files also store their ``args`` (an argparse.Namespace, plain
        # attributes): allow exactly that class, nothing else, in the weights-only unpickler.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LeanvitError(f"cannot read checkpoint {path} (torch.load with weights_only=True): {first}") from None


def read_state_dict(path) -> Dict[str, torch.Tensor]:
    """The model state dict stored in ``path``, unwrapped and without DDP/compile prefixes."""
    return state_dict_from(read_checkpoint(path), path)


def state_dict_from(obj: Any, path="the checkpoint") -> Dict[str, torch.Tensor]:
    """The model state dict inside an already-read checkpoint ``obj`` (``path`` names it in errors)."""
    for _ in range(2):
        if isinstance(obj, dict) and not _is_state_dict(obj):
            key = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if key is None:
                raise LeanvitError(
                    f"{path} holds no model state dict (top-level keys: {sorted(obj)[:8]}); "
                    f"expected a state dict or a dict with one of {list(_WRAPPER_KEYS)}")
            obj = obj[key]
    if not isinstance(obj, dict) or not _is_state_dict(obj):
        raise LeanvitError(f"{path} does not contain a state dict of tensors")
    out = {}
    for k, v in obj.items():
        for p in _PREFIXES:
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def _is_state_dict(d: dict) -> bool:
    return bool(d) and all(isinstance(k, str) for k in d) and all(torch.is_tensor(v) for v in d.values())


def _filter_for_model(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    custom = getattr(model, "filter_checkpoint", None)
    if callable(custom):
        return custom(state_dict)
    if isinstance(model, (VisionTransformer, Eva)):  # official layouts mapped, position embeddings resampled
        try:
            if isinstance(model, Eva):
                return eva_checkpoint_filter_fn(state_dict, model)
            return checkpoint_filter_fn(state_dict, model, adapt_layer_scale=True)
        except Exception as e:
            raise LeanvitError(f"checkpoint does not fit {type(model).__name__}: {e}") from None
    return state_dict


def _classifier_names(model: nn.Module) -> List[str]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or "head"
    return [names] if isinstance(names, str) else list(names)


def _list(keys: List[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_checkpoint(model: nn.Module, path, strict: bool = True, ignore_classifier: bool = False,
                    name: Optional[str] = None) -> LoadResult:
    """Load the weights in ``path`` into ``model``.

    Args:
        path: a checkpoint file, or a checkpoint already read (e.g. by :func:`read_checkpoint`), so that
            callers that also need its other entries read the file once.
        name: how errors name the checkpoint (default: ``path``, or "the checkpoint" for a read one).
        strict: every model key must be in the checkpoint and vice versa, with equal shapes;
            otherwise a :class:`LeanvitError` names the missing, unexpected and mismatched keys.
            With ``strict=False`` matching entries load and the rest is reported in the result.
        ignore_classifier: drop the checkpoint's classifier (``head``) when its shape differs from the
            model's (fine-tuning to another number of classes); those keys stay as initialized.
    """
    if isinstance(path, Mapping):
        name = name or "the checkpoint"
        state_dict = _filter_for_model(state_dict_from(path, name), model)
    else:
        name = name or path
        state_dict = _filter_for_model(read_state_dict(path), model)
    own = model.state_dict()
    skipped = []
    if ignore_classifier:
        for name in _classifier_names(model):
            for suffix in (".weight", ".bias"):
                k = name + suffix
                if k in state_dict and (k not in own or own[k].shape != state_dict[k].shape):
                    state_dict.pop(k)
                    skipped.append(k)
    missing = [k for k in own if k not in state_dict and k not in skipped]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in state_dict if k in own and state_dict[k].shape != own[k].shape]
    if mismatched or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"missing keys: {_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_list(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatch: {_list(mismatched, 4)}")
        raise LeanvitError(f"checkpoint {name} does not fit {type(model).__name__}: " + "; ".join(parts))
    fitting = {k: v for k, v in state_dict.items() if k in own}
    params = dict(model.named_parameters())
    broken = [k for k, v in fitting.items() if k in params and v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:  # a diverged or corrupted save: every output would be NaN, so refuse it by name
        raise LeanvitError(f"checkpoint {name} holds NaN or infinite weights in {_list(broken)}")
    model.load_state_dict(fitting, strict=False)
    return LoadResult(missing, unexpected, skipped)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path, write: Callable[[Any], None], binary: bool = True) -> Path:
    """Write ``path`` through ``write(file)`` atomically: a temporary file in the same folder, flushed to
    disk, then renamed over ``path``; on any failure the temporary file is removed and ``path`` is
    untouched. Checkpoints and the metrics log are written this way."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    except OSError as e:
        err = disk_error(path, e)
        if err is None:
            raise
        raise err from None
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would create it (mkstemp's file is 0600)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        err = disk_error(path, e)
        if err is not None:  # a full or read-only disk: one line; path is as it was
            raise err from None
        raise
    return path


def save_checkpoint(obj: Any, path) -> Path:
    """``torch.save(obj, path)`` atomically (:func:`write_atomically`).

    A ``.safetensors`` path stores a flat state dict of tensors (``obj`` or ``obj["model"]``)."""
    path = Path(path)

    def write(f) -> None:
        if path.suffix == ".safetensors":
            from safetensors.torch import save

            sd = obj["model"] if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
            f.write(save({k: v.detach().contiguous().cpu() for k, v in sd.items()}))
        else:
            torch.save(obj, f)

    return write_atomically(path, write)
