"""What a task is: the one place where classification, detection, segmentation (or a task of yours) differ.

The training engine (:mod:`leanvit.train`) and the commands (``leanvit train / eval / viz / sweep``) call
only these methods; they never ask which task they hold. A new task is one subclass plus
:func:`leanvit.tasks.register_task` (see ``docs/tasks.md``).

Training (called by :class:`leanvit.train.engine.Run`, in this order):
  :meth:`Task.check_config` -> :meth:`Task.classes` -> :meth:`Task.build_model` -> :meth:`Task.datasets`
  (the engine builds the loaders, with :attr:`Task.collate_fn`)
  -> :meth:`Task.training_step` (called once per batch) -> :meth:`Task.validate` (after evaluated epochs).
A trained model (``eval``, ``viz``, ``sweep``):
  :meth:`Task.load_model` -> :meth:`Task.eval_data` -> :meth:`Task.evaluate` -> :meth:`Task.describe`;
  :meth:`Task.draw` for pictures; :meth:`Task.sweep_variants`, :meth:`Task.example_input` and
  :attr:`Task.sweep_columns` for ``leanvit sweep``; :meth:`Task.sweep_variants` and :meth:`Task.backbone_part`
  for ``leanvit bench`` of a checkpoint.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from leanvit.data import create_dataset, dataset_options
from leanvit.data.loaders import eval_loader
from leanvit.errors import LeanvitError
from leanvit.reduction import applied_reduction, get_reduction
from leanvit.utils import format_metric

__all__ = ["Task", "TrainData", "SweepVariant", "ForwardWith", "Metric"]


class Metric(NamedTuple):
    """One row of a task's metric table (:attr:`Task.metrics`): what its texts show of a result."""
    key: str            # in :meth:`Task.evaluate`'s result; validation logs it as :meth:`Task.validation_key`
    label: str          # how the texts name it
    fmt: str            # its format (e.g. ``.4f``)
    unit: str = ""      # printed after the value (e.g. ``%``)
    brief: bool = True  # in the per-epoch log line (else only in ``leanvit eval``'s line)


class TrainData(NamedTuple):
    """A run's data as the engine builds it from :meth:`Task.datasets` (or a task's :meth:`Task.build_data`)."""
    train_set: Any
    val_set: Any
    train_loader: Any        # batches of (x, y) as :meth:`Task.training_step` takes them
    val_loader: Any          # this process's shard of the validation set
    sampler: Any             # a :class:`leanvit.data.sampling.ResumableSampler` (exact mid-epoch resumption)
    classes: list
    iters: int               # optimizer steps per epoch


@dataclass
class SweepVariant:
    """One configuration of a sweep: a model to evaluate and time as it is (its strength fixed)."""
    reduction: str           # the method's name, "none", or any name the task gives
    strength: str            # as printed
    value: Any               # the strength as the method takes it (None for "none")
    model: nn.Module
    method: Optional[str] = None    # the method's registered name, when ``reduction`` names more (dense)
    restore: Optional[str] = None   # a dense backbone's restoration strategy


class ForwardWith(nn.Module):
    """``model`` called with fixed extra forward keywords (e.g. a reduction strength), other attributes
    reachable as on the model itself."""

    def __init__(self, model: nn.Module, kwargs: Dict[str, Any]):
        super().__init__()
        self.model, self.kwargs = model, dict(kwargs)

    def forward(self, x):
        return self.model(x, **self.kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)


class Task:
    """Base class of the tasks. Subclasses set the class attributes and implement the methods that raise
    ``NotImplementedError``; the others have defaults that suit most tasks."""

    #: registry name, recorded in checkpoints (``task``) and recipes (``task:``)
    name: str = ""
    #: the validation metric that picks ``best.pth`` (a key of :meth:`validate`'s dict)
    main_metric: str = ""
    higher_is_better: bool = True
    #: the dataset kinds (:attr:`leanvit.data.DatasetKind.task`) this task reads; default: its own name
    data_tasks: Tuple[str, ...] = ()
    #: sweep columns (key in :meth:`evaluate`'s result, header, format); the first one ranks the points
    sweep_columns: Tuple[Tuple[str, str, str], ...] = ()
    #: the metric table: what :meth:`validate` logs and the texts (:meth:`message`, :meth:`describe`) show, in
    #: order (default: the :attr:`sweep_columns`)
    metrics: Tuple[Metric, ...] = ()
    #: the recipe settings this task reads beyond the engine's, with their defaults (e.g. ``detector: None``);
    #: every registered task's settings are known to every recipe (see :mod:`leanvit.train.recipes`)
    settings: Dict[str, Any] = {}
    #: how samples make a batch (``collate_fn`` of the loaders; None: torch's default); a plain function is
    #: given as ``collate_fn = staticmethod(my_collate)``
    collate_fn: Optional[Callable] = None

    # ------------------------------------------------------------------ settings
    def check_settings(self, cfg: Dict[str, Any]) -> None:
        """Types and ranges of :attr:`settings` in any resolved config, whatever its task (a typo in ``--set``
        is a one-line :class:`LeanvitError`, not a traceback later)."""

    # ------------------------------------------------------------------ training
    def check_config(self, cfg: Dict[str, Any]) -> None:
        """Refuse settings the task cannot train with (one-line :class:`LeanvitError`)."""

    def classes(self, cfg: Dict[str, Any]) -> List[str]:
        """The class names of the training data."""
        raise NotImplementedError

    def build_model(self, cfg: Dict[str, Any], num_classes: int, reduction: Optional[dict] = None,
                    finetune=None) -> Tuple[nn.Module, Dict[str, Any], Optional[str]]:
        """(model, spec, note): the model to train, the spec :meth:`load_model` rebuilds it from (stored in
        checkpoints as ``model_spec``), and a line to log (e.g. what ``finetune`` loaded) or None.
        ``reduction``: the token reduction at its target strength (the engine steps its schedule)."""
        raise NotImplementedError

    def datasets(self, cfg: Dict[str, Any], model: nn.Module) -> Tuple[Any, Any, List[str]]:
        """(training set, validation set, class names) of a run; the engine builds the loaders over them
        (:func:`leanvit.data.loaders.training_loaders`: the resumable seeded order, the shards per process)
        with :attr:`collate_fn`."""
        raise NotImplementedError

    def build_data(self, cfg: Dict[str, Any], env, model: nn.Module) -> Optional[TrainData]:
        """A :class:`TrainData` with loaders of the task's own making; None (the default): the engine builds
        them from :meth:`datasets`. Override :meth:`datasets` instead unless the loaders must differ."""
        return None

    def training_step(self, cfg: Dict[str, Any], num_classes: int) -> Callable:
        """``step(ctx, x, y) -> (loss, images)``: the forward pass and loss of one batch. ``ctx`` has
        ``forward_model`` (DDP-wrapped), ``env.device`` and ``autocast()``; the engine does the rest."""
        raise NotImplementedError

    def metric_table(self) -> Tuple[Metric, ...]:
        """:attr:`metrics`, else one row per :attr:`sweep_columns` entry."""
        return tuple(self.metrics) or tuple(Metric(k, head, fmt) for k, head, fmt in self.sweep_columns)

    @staticmethod
    def validation_key(key: str) -> str:
        """The name validation logs a result key under (``top1`` -> ``val_top1``; ``val_map`` stays)."""
        return key if key.startswith("val_") else f"val_{key}"

    def validate(self, model: nn.Module, loader, env, amp: bool) -> Dict[str, float]:
        """The metric table's values over the whole validation set, named by :meth:`validation_key`: the
        task's one evaluator (:meth:`evaluate`, which ``leanvit eval`` runs too) on this process's shard of
        ``loader``, combined across processes by the evaluator; every process returns the same dict (it
        contains :attr:`main_metric`). The model's training mode is restored."""
        was_training = model.training
        try:
            res = self.evaluate(model, loader, env.device, amp=amp)
        finally:
            model.train(was_training)
        if not res.get("images"):
            raise LeanvitError("the validation set is empty")
        return {self.validation_key(m.key): res[m.key] for m in self.metric_table() if m.key in res}

    def message(self, row: Dict[str, Any]) -> str:
        """The validation part of the per-epoch log line (``row``: the epoch's metrics), from the metric
        table's ``brief`` rows; the main metric alone when the table does not name it."""
        parts = [f"{m.label} {format_metric(row[k], m.fmt)}{m.unit}" for m in self.metric_table()
                 if m.brief and (k := self.validation_key(m.key)) in row]
        if parts:
            return ", val " + " ".join(parts)
        v = row.get(self.main_metric)
        return "" if self.main_metric not in row else f", {self.main_metric} {format_metric(v)}"

    def summary(self, best: Optional[float], row: Dict[str, Any]) -> Dict[str, Any]:
        """Extra keys of the summary ``train()`` returns."""
        return {}

    def data_notes(self, data: TrainData) -> List[str]:
        """The counted skips of the run's datasets (unreadable images, boxes clipped, ...)."""
        lines = []
        for ds in (data.train_set, data.val_set):
            counter = getattr(ds, "skips", None)
            if counter is not None:
                lines += counter.lines()
        return lines

    def done_message(self, res: Dict[str, Any]) -> str:
        """The line ``leanvit train`` prints at the end (``res``: what ``train()`` returned)."""
        def shown(v):  # undefined (None; -1 in older checkpoints: COCOeval's "nothing to score against")
            return "n/a" if v is None or v < 0 else format_metric(v)

        return (f"done in {res['seconds']:.0f} s: best {res['main_metric']} {shown(res['best_metric'])}, "
                f"last {shown(res['last_metric'])}; checkpoints in {res['output']}")

    # ------------------------------------------------------------------ a trained model
    def load_model(self, checkpoint=None, name: Optional[str] = None, reduction: Optional[dict] = None,
                   img_size=None, num_classes: Optional[int] = None, data=None, split: str = "val",
                   data_overrides: Optional[Dict[str, Any]] = None):
        """A :class:`leanvit.models.build.BuiltModel` in eval mode (the checkpoint's weights loaded strictly).
        Its ``config`` is the recorded training config with ``data_overrides`` applied
        (:func:`leanvit.data.with_data_overrides`): the data options every later step uses."""
        raise NotImplementedError

    def eval_data(self, built, data, split: str = "val", batch_size: int = 64, workers: int = 0,
                  device="cpu", **options) -> Tuple[Any, Any]:
        """(dataset, loader) of ``data``'s ``split`` as :meth:`evaluate` takes it, prepared as the model was
        validated in training. ``options``: task-specific ones (e.g. ``crop_pct``); unknown ones ignored."""
        raise NotImplementedError

    def loader(self, dataset, batch_size: int = 64, workers: int = 0, device="cpu"):
        """An evaluation loader over ``dataset`` (in order) as :meth:`evaluate` takes it."""
        return eval_loader(dataset, batch_size, workers, device, self.collate_fn)

    def evaluate(self, model: nn.Module, loader, device="cpu", amp: bool = False, progress: bool = False,
                 max_batches: Optional[int] = None, dataset=None) -> Dict[str, Any]:
        """The metrics of ``model`` on ``loader`` (with ``images`` and ``img_per_s`` of forward passes): the
        task's one evaluator, which :meth:`validate` runs too. Under several processes (``torch.distributed``
        initialized: training's validation, each process holding its shard of ``loader``) it combines the
        shards, so that every process returns the figures over the whole set."""
        raise NotImplementedError

    def title(self, built) -> str:
        """How ``leanvit eval`` names the model it evaluated (as built: see
        :func:`leanvit.models.build.describe_model`)."""
        return built.description

    def record(self, built) -> Dict[str, Any]:
        """What the evaluation's JSON records about the model besides its name."""
        return {}

    def data_record(self, built, data) -> Dict[str, Any]:
        """The data options an evaluation of ``built`` on ``data`` uses (what the checkpoint records for
        ``data``'s kind): results name them beside the data."""
        return dataset_options(data, built.config)

    def describe(self, res: Dict[str, Any]) -> str:
        """The metrics part of ``leanvit eval``'s line: every row of the metric table in ``res``."""
        return "  ".join(f"{m.label} {format_metric(res[m.key], m.fmt)}{m.unit}" for m in self.metric_table()
                         if m.key in res)

    def eval_images(self, data, config: Optional[Dict[str, Any]], split: str = "val"):
        """``data``'s ``split`` untransformed: ``image(i)`` gives its PIL images (pictures of ``leanvit viz``)."""
        return create_dataset(data, split, options=dataset_options(data, config))

    def draw(self, built, images: Sequence, out_dir, names: Sequence[str], class_names=None, device="cpu",
             **options) -> List:
        """Pictures of the model's predictions (or internals) on ``images``; the paths, the grid last."""
        raise LeanvitError(f"the {self.name} task draws no pictures")

    # ------------------------------------------------------------------ sweep
    def example_input(self, batch: int, hw: Tuple[int, int]):
        """A random input of ``batch`` images of size ``hw`` as the model takes it (timing, GMACs)."""
        return torch.randn(batch, 3, *hw)

    def backbone_part(self, model: nn.Module) -> Optional[nn.Module]:
        """The part of ``model`` (as :meth:`load_model` or :meth:`sweep_variants` gives it) before its head,
        on the same input: timed beside the whole model, it gives the head's share of the time
        (``leanvit bench``). None: the task's models have no head worth reporting apart (classification)."""
        return None

    def can_reduce(self, model: nn.Module) -> bool:
        """Whether a token reduction applies to ``model`` at all (a class-token ViT); one that cannot is
        measured unreduced, with a note, by ``leanvit bench``."""
        return applied_reduction(model) is not None or (
            all(hasattr(model, a) for a in ("blocks", "patch_embed")) and getattr(model, "cls_token", None) is not None)

    def sweep_variants(self, model: nn.Module, plain: nn.Module, grid: Sequence[Tuple[Optional[str], Any]],
                       **options) -> Iterator[SweepVariant]:
        """The configurations to sweep for ``grid`` (pairs of method name and strength, (None, None) = the
        model without reduction): one model copy per method (with its strength fixed per call, so that
        every point runs the same weights). ``model``: as built (maybe with a reduction); ``plain``: without.
        Override to add configurations of your own (e.g. other options of a method); ``options``: such
        settings (``restore`` for the dense tasks), refused here."""
        if any(v is not None for v in options.values()):
            raise LeanvitError(f"{', '.join(f'`{k}`' for k in options)} does not apply to a {self.name} model "
                               "(restore: detection and segmentation models only)")
        per_method: Dict[str, nn.Module] = {}
        yield SweepVariant("none", "-", None, plain)
        for method, value in grid:
            if method is None:
                continue
            m = get_reduction(method)
            value = m.check_strength(value)
            if method not in per_method:
                if applied_reduction(model) is m:
                    per_method[method] = copy.deepcopy(model)
                else:
                    per_method[method] = m.apply(copy.deepcopy(plain), **{m.knob: value})
            yield SweepVariant(method, m.format_strength(value), value,
                               ForwardWith(per_method[method], m.forward_kwargs(value)))
