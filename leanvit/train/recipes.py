"""Training recipes: a flat dict of settings, shipped as YAML files and overridable key by key.

The engine declares its own settings (:data:`ENGINE_DEFAULTS`: model, optimization, run); each task
(:attr:`leanvit.tasks.Task.settings`, e.g. ``detector``) and dataset kind
(:attr:`leanvit.data.DatasetKind.settings` and its ``options_key`` mapping, e.g. ``digits``) declares its own.
Every key of :data:`DEFAULTS` can be set by a recipe file and overridden from the command line
(``--key value`` or ``--set key=value``) or from Python (``train("deit3_demo", epochs=3)``).
A recipe file may name a ``base`` recipe whose values it extends.
"""
from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import yaml

from leanvit.data.registry import check_dataset_options, dataset_settings
from leanvit.errors import LeanvitError
from leanvit.reduction import ReductionSpec
from leanvit.tasks import check_task_settings, task_settings

__all__ = ["DEFAULTS", "ENGINE_DEFAULTS", "defaults", "RECIPE_DIR", "list_recipes", "load_recipe", "resolve_config",
           "parse_value", "reduction_settings", "NULL"]

RECIPE_DIR = Path(__file__).parent / "recipes"

ENGINE_DEFAULTS: Dict[str, Any] = {
    # model
    "model": "deit3_small_patch16_224",
    "model_kwargs": {},          # extra keyword arguments of create_model (e.g. patch_size, depth)
    "img_size": 224,
    "num_classes": None,         # default: the number of classes of the data
    "drop_path": 0.0,
    "reduction": None,           # token reduction: {method: evit, keep_rate: 0.7, locations: [...],
                                 #   start_epoch: 0, epochs: 0} (any registered method and its knob)
    # aliases of reduction's EViT settings (older recipes and flags keep working):
    "keep_rate": None,           # EViT target keep rate (applies EViT to a plain ViT)
    "keep_rate_start_epoch": 0,  # epochs at no reduction before the schedule starts
    "keep_rate_epochs": 0,       # epochs of the cosine from no reduction to the target (0: straight to it)
    "evit_locations": None,      # blocks that reorganize (default: the EViT rule for the depth)
    "finetune": None,            # checkpoint to start from (classifier and pos_embed adapted)
    "finetune_train_mode": True, # DeiT III keeps drop-path on when fine-tuning; EViT/DeiT used eval mode
    "finetune_partial": False,   # accept a --finetune checkpoint that fills less than half of the model
    "freeze": None,              # parameter-name patterns kept fixed, e.g. ["backbone.vit.blocks.0.*"]
    "task": None,                # a registered task (leanvit.tasks; default: the task of the data's kind)
    # data (each dataset kind adds its own options, e.g. digits:)
    "data": "digits",
    "repeated_aug": False,       # timm RepeatAugSampler, 3 repeats
    "skip_corrupt": False,
    "workers": 0,
    # optimization
    "epochs": 100,
    "batch_size": 64,            # per process
    "opt": "lamb",
    "lr": 4e-3,                  # for the global batch (no scaling)
    "weight_decay": 0.05,
    "opt_eps": 1e-8,
    "min_lr": 1e-5,
    "warmup_lr": 1e-6,
    "warmup_epochs": 5,
    "clip_grad": None,
    "schedule": "cosine",        # cosine | poly (power 0.9, the Semantic FPN / UperNet schedule)
    "iterations": None,          # a budget in optimizer steps instead of epochs (whole epochs cover it)
    "model_ema": False,
    "model_ema_decay": 0.99996,
    "amp": False,                # autocast (float16 on CUDA with a grad scaler, bfloat16 on CPU)
    # run
    "seed": 0,
    "eval_every": 1,
    "output": None,
    "log_every": 20,
    "max_train_batches": None,   # cap the iterations per epoch (quick runs and tests)
    "time_limit": None,          # seconds; stop before an epoch that would end past it (demo budget)
    "save_every_steps": None,    # also write a recovery checkpoint (last.pth, mid-epoch) every N optimizer steps
    "keep_last": None,           # keep the K newest checkpoints as checkpoint-<step>.pth besides last.pth
    "log_to": None,              # experiment tracking: tensorboard, wandb or both (list or "tensorboard,wandb")
}


def defaults() -> Dict[str, Any]:
    """Every setting a recipe can hold and its default: the engine's (:data:`ENGINE_DEFAULTS`), then those
    each registered task (:attr:`leanvit.tasks.Task.settings`) and dataset kind
    (:attr:`leanvit.data.DatasetKind.settings`, its ``options_key`` mapping) declares. A fresh copy."""
    out = copy.deepcopy(ENGINE_DEFAULTS)
    owners = {k: "the engine" for k in out}
    for owner, settings in [*task_settings(), *dataset_settings()]:
        for key, value in settings.items():
            if key in out and out[key] != value:
                raise LeanvitError(f"setting '{key}' has default {out[key]!r} for {owners[key]} but {value!r} "
                                   f"for {owner}: a setting two owners declare needs one default")
            if key not in out:
                out[key], owners[key] = copy.deepcopy(value), owner
    return out


class _Defaults(Mapping):
    """:func:`defaults` as a read-only mapping, computed when read (tasks and kinds registered later count)."""

    def __getitem__(self, key: str) -> Any:
        return defaults()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(defaults())

    def __len__(self) -> int:
        return len(defaults())

    def __repr__(self) -> str:
        return f"DEFAULTS({defaults()!r})"


DEFAULTS: Mapping = _Defaults()  # every known setting and its default (see :func:`defaults`)


def list_recipes() -> List[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> Dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise LeanvitError(f"recipe {path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise LeanvitError(f"cannot read recipe {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise LeanvitError(f"recipe {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LeanvitError(f"recipe {path} must be a mapping of settings, got {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise LeanvitError(f"recipe {path}: setting names are words, got {bad[0]!r} ({type(bad[0]).__name__})")
    if "base" in data and data["base"] is not None and not isinstance(data["base"], str):
        raise LeanvitError(f"recipe {path}: base must name one recipe (a name or a .yaml path), got {data['base']!r}")
    return data


def load_recipe(name_or_path: str, _seen: Optional[set] = None) -> Dict[str, Any]:
    """The settings of a shipped recipe (by name) or of a YAML file, ``base`` recipes resolved."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        if path.suffix in (".yaml", ".yml"):
            raise LeanvitError(f"recipe file not found: {path}")
        path = RECIPE_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            close = difflib.get_close_matches(str(name_or_path), list_recipes(), n=4, cutoff=0.4)
            hint = f"; did you mean: {', '.join(close)}" if close else f"; shipped: {', '.join(list_recipes())}"
            raise LeanvitError(f"unknown recipe '{name_or_path}'{hint}")
    seen = _seen or set()
    if path.resolve() in seen:
        raise LeanvitError(f"recipe {path} includes itself through 'base'")
    seen.add(path.resolve())
    data = _read_yaml(path)
    base = data.pop("base", None)
    cfg = load_recipe(base, seen) if base else {}
    cfg.update(data)
    cfg["recipe"] = path.stem  # this file's name, not its base's
    return cfg


def check_keys(cfg: Dict[str, Any], where: str, known: Optional[Mapping] = None) -> None:
    known = defaults() if known is None else known
    for k in cfg:
        if k not in known and k != "recipe":
            close = difflib.get_close_matches(k, list(known), n=3)
            hint = f"; did you mean: {', '.join(close)}" if close else ""
            raise LeanvitError(f"unknown setting '{k}' in {where}{hint}")


def parse_value(text: str) -> Any:
    """A command-line value as YAML (numbers, booleans, null, lists, mappings), else the string."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads "2e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    return value


class _Null:
    """An override that sets a value to null, unlike ``None``, which means "not given"."""

    def __repr__(self) -> str:
        return "null"


NULL = _Null()  # what ``--set key=null`` gives: the recipe's (or its base's) value is removed


def _nulls_to_none(value: Any) -> Any:
    if value is NULL:
        return None
    if isinstance(value, dict):
        return {k: _nulls_to_none(v) for k, v in value.items()}
    return value


def resolve_config(recipe: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """DEFAULTS, then the recipe, then the overrides (``None`` values in overrides are ignored, :data:`NULL`
    sets a value to null, e.g. removes an inherited ``reduction``; a mapping such as ``digits`` or
    ``model_kwargs`` is merged key by key into the recipe's)."""
    cfg = defaults()
    if recipe:
        r = load_recipe(recipe)
        check_keys(r, f"recipe '{recipe}'", cfg)
        cfg.update(r)
    over = {k: v for k, v in (overrides or {}).items() if v is not None}
    check_keys(over, "the overrides", cfg)
    for k, v in over.items():  # mappings (digits, model_kwargs) are merged into the recipe's
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
        cfg[k] = _nulls_to_none(cfg[k])
    _validate(cfg)
    return cfg


def _validate(cfg: Dict[str, Any]) -> None:
    def positive(key, integer=False):
        v = cfg[key]
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
        if not ok or (integer and int(v) != v):
            raise LeanvitError(f"{key} must be a positive {'integer' if integer else 'number'}, got {v!r}")

    positive("epochs", integer=True)
    positive("batch_size", integer=True)
    positive("lr")
    if cfg["opt"] not in ("lamb", "adamw", "sgd"):
        raise LeanvitError(f"opt must be lamb, adamw or sgd, got {cfg['opt']!r}")
    reduction_settings(cfg)  # a clear error for a bad method or strength
    _validate_more(cfg)
    if cfg.get("schedule", "cosine") not in ("cosine", "poly"):
        raise LeanvitError(f"schedule must be cosine or poly, got {cfg['schedule']!r}")
    if cfg.get("iterations") is not None:
        positive("iterations", integer=True)
    for key in ("warmup_epochs", "keep_rate_start_epoch", "keep_rate_epochs", "drop_path", "weight_decay",
                "workers"):
        if not isinstance(cfg[key], (int, float)) or cfg[key] < 0:
            raise LeanvitError(f"{key} must be a number >= 0, got {cfg[key]!r}")
    check_task_settings(cfg)  # each task's settings (e.g. loss, min_size), whatever the run's task


def _number(v, integer: bool = False) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return not integer or int(v) == v


def _validate_more(cfg: Dict[str, Any]) -> None:
    """Types and ranges of the settings a typo in ``--set`` would otherwise turn into a traceback."""
    img = cfg["img_size"]
    sizes = list(img) if isinstance(img, (list, tuple)) else [img]
    if img is None:  # a backbone that takes any input size (e.g. pvt_v2 in a detector); tasks that need one say so
        sizes = []
    elif not 1 <= len(sizes) <= 2 or not all(_number(v, True) and v > 0 for v in sizes):
        raise LeanvitError(f"img_size must be a positive integer or [H, W], got {img!r}")
    for key in ("opt_eps", "min_lr", "warmup_lr", "lr"):
        if not _number(cfg[key]) or cfg[key] < 0:
            raise LeanvitError(f"{key} must be a number >= 0, got {cfg[key]!r}")
    if not _number(cfg["seed"], integer=True) or cfg["seed"] < 0:
        raise LeanvitError(f"seed must be an integer >= 0, got {cfg['seed']!r}")
    for key in ("time_limit", "clip_grad"):
        if cfg[key] is not None and (not _number(cfg[key]) or cfg[key] <= 0):
            raise LeanvitError(f"{key} must be a positive number (or null), got {cfg[key]!r}")
    for key in ("save_every_steps", "keep_last", "max_train_batches", "num_classes"):
        if cfg[key] is not None and (not _number(cfg[key], integer=True) or cfg[key] < 1):
            raise LeanvitError(f"{key} must be an integer >= 1 (or null), got {cfg[key]!r}")
    for key in ("eval_every", "log_every", "workers"):
        if not _number(cfg[key], integer=True) or cfg[key] < (0 if key == "workers" else 1):
            raise LeanvitError(f"{key} must be an integer >= {0 if key == 'workers' else 1}, got {cfg[key]!r}")
    if cfg["model_kwargs"] is not None and not isinstance(cfg["model_kwargs"], dict):
        raise LeanvitError(f"model_kwargs must be a mapping, got {cfg['model_kwargs']!r}")
    check_dataset_options(cfg)  # e.g. digits.<key>: a typo is an error whatever the data


_SCHEDULE_KEYS = ("start_epoch", "epochs")


def reduction_settings(cfg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The run's token reduction as one mapping ``{method, <knob>, ..., start_epoch, epochs}``, from the
    ``reduction`` key and/or its EViT aliases (``keep_rate``, ``evit_locations``, ``keep_rate_start_epoch``,
    ``keep_rate_epochs``); None without one."""
    spec = ReductionSpec.parse(cfg.get("reduction"), keep_rate=cfg.get("keep_rate"),
                               locations=cfg.get("evit_locations"))
    if spec is None:
        return None
    red = spec.to_dict()
    red.setdefault("start_epoch", cfg.get("keep_rate_start_epoch") or 0)
    red.setdefault("epochs", cfg.get("keep_rate_epochs") or 0)
    for key in _SCHEDULE_KEYS:
        if not isinstance(red[key], (int, float)) or red[key] < 0:
            raise LeanvitError(f"reduction.{key} must be a number >= 0, got {red[key]!r}")
    return red
