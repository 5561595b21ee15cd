"""Experiment tracking: the run's curves and pictures in TensorBoard and/or Weights & Biases (recipe key
``log_to``, ``--log-to tensorboard,wandb``), written by rank 0 only.

What is logged, against one step axis (the optimizer step, which a resumed run continues):

* every numeric value of every ``metrics.jsonl`` row, under the same name, at the step that ends its epoch
  (``train_loss``, ``lr``, ``train_img_per_s``, ``strength``, ``val_top1``/``val_top5``, ``val_map...``,
  ``val_miou...``, ``ema_...``);
* ``step/train_loss`` (the epoch's running mean) and ``step/lr`` every ``log_every`` optimizer steps;
* the run's config (TensorBoard: a text summary; W&B: the run config);
* at each evaluation, pictures of a few validation images: the kept tokens (EViT), the merged patches
  (ToMe) or the predicted boxes / masks (dense tasks).

Resuming continues the same curves: TensorBoard events are written to ``OUTPUT/tensorboard`` with
``purge_step`` just after the resumed step (values logged after the checkpoint by the stopped run are discarded
when read), W&B resumes the run whose id ``OUTPUT/wandb_run_id`` records. Both work offline
(``WANDB_MODE=offline`` for W&B).
"""
from __future__ import annotations

import logging
import numbers
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from leanvit.errors import LeanvitError

__all__ = ["BACKENDS", "Tracker", "TensorBoardTracker", "WandbTracker", "Trackers", "parse_log_to",
           "create_trackers", "evaluation_pictures"]

log = logging.getLogger(__name__)

BACKENDS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}  # name: (module, extra)


def parse_log_to(value) -> List[str]:
    """The backends of ``log_to`` (``"tensorboard,wandb"``, a list, or None; ``none`` / ``off`` / ``-``: no
    tracking, e.g. to stop it on resume); a clear error for an unknown backend or one whose package is not
    installed."""
    if value is None or value == "" or value is False:
        return []
    if isinstance(value, str) and value.strip().lower() in ("none", "off", "-"):
        return []
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise LeanvitError(f"log_to must be tensorboard, wandb or both (comma-separated), got {value!r}")
    names = []
    for item in items:
        name = str(item).strip().lower()
        if not name:
            continue
        if name not in BACKENDS:
            raise LeanvitError(f"unknown log_to backend '{item}' (known: {', '.join(BACKENDS)})")
        module, extra = BACKENDS[name]
        try:
            __import__(module)
        except ImportError:
            raise LeanvitError(f"log_to {name} needs the {module} package: pip install leanvit[{extra}]") from None
        if name not in names:
            names.append(name)
    return names


def _scalars(row: Dict[str, Any]) -> Dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool) and k != "epoch"}


class Tracker:
    """One backend: scalars and pictures at a step, the config once, then ``close``."""

    def log_config(self, cfg: Dict[str, Any]) -> None:
        pass

    def log_scalars(self, values: Dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_images(self, images: Dict[str, Any], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    def __init__(self, out: Path, start_step: int, resume: bool = False):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events after the resumed step (a fresh run: all) from an earlier, stopped or overwritten,
        # attempt are dropped when read; the resumed step's own values are those of the checkpoint
        self.writer = SummaryWriter(log_dir=str(Path(out) / "tensorboard"),
                                    purge_step=int(start_step) + 1 if resume else 0)
        self.resumed = resume

    def log_config(self, cfg):
        if self.resumed:
            return
        text = yaml.safe_dump({k: v for k, v in cfg.items()}, sort_keys=False)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "), 0)

    def log_scalars(self, values, step):
        for k, v in values.items():
            self.writer.add_scalar(k, v, int(step))
        self.writer.flush()

    def log_images(self, images, step):
        import numpy as np

        for k, im in images.items():
            self.writer.add_image(k, np.asarray(im.convert("RGB")), int(step), dataformats="HWC")
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandbTracker(Tracker):
    def __init__(self, out: Path, cfg: Dict[str, Any], resume: bool):
        import os
        import uuid

        import wandb

        self.wandb = wandb
        id_file = Path(out) / "wandb_run_id"
        run_id = id_file.read_text().strip() if resume and id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        project = os.environ.get("WANDB_PROJECT") or "leanvit"
        self.run = wandb.init(project=project, name=Path(out).name, id=run_id, resume="allow", dir=str(out),
                              config=_plain(cfg))

    def log_scalars(self, values, step):
        self.run.log(dict(values), step=int(step))

    def log_images(self, images, step):
        self.run.log({k: self.wandb.Image(im) for k, im in images.items()}, step=int(step))

    def close(self):
        self.run.finish()


def _plain(cfg: Dict[str, Any]) -> Dict[str, Any]:
    return yaml.safe_load(yaml.safe_dump(dict(cfg)))  # tuples and the like as plain YAML values


class Trackers:
    """The run's backends together (none: every call does nothing)."""

    def __init__(self, trackers: Sequence[Tracker] = ()):
        self.trackers = list(trackers)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log_row(self, row: Dict[str, Any], step: int) -> None:
        """A metrics row (one epoch), every numeric value under its own name."""
        values = _scalars(row)
        for t in self.trackers:
            t.log_scalars(values, step)

    def log_scalars(self, values: Dict[str, float], step: int) -> None:
        for t in self.trackers:
            t.log_scalars(values, step)

    def log_images(self, images: Dict[str, Any], step: int) -> None:
        if images:
            for t in self.trackers:
                t.log_images(images, step)

    def close(self) -> None:
        for t in self.trackers:
            try:
                t.close()
            except Exception as e:  # noqa: BLE001 - closing a tracker must not hide the run's own outcome
                log.warning(f"warning: closing {type(t).__name__} failed: {e}")
        self.trackers = []


def create_trackers(cfg: Dict[str, Any], out: Path, start_step: int, resume: bool,
                    history: Sequence[Dict[str, Any]] = (), iters: Optional[int] = None) -> Trackers:
    """The backends ``cfg['log_to']`` names, writing under the run folder ``out`` (call on rank 0 only).

    ``history`` (the checkpoint's per-epoch rows) and ``iters`` (optimizer steps per epoch): on resume, W&B in
    offline mode logs them again, each at its epoch's last step: a run killed with ``kill -9`` may leave its
    offline run file without the rows W&B's background process had not written yet, and ``wandb sync`` of
    both attempts then has every row (a step logged twice keeps its first value)."""
    trackers: List[Tracker] = []
    for name in parse_log_to(cfg.get("log_to")):
        trackers.append(TensorBoardTracker(out, start_step, resume) if name == "tensorboard"
                        else WandbTracker(out, cfg, resume))
    result = Trackers(trackers)
    for t in result.trackers:
        t.log_config(dict(cfg))
    offline = os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun")
    if resume and iters and offline:
        for t in result.trackers:
            if isinstance(t, WandbTracker):
                for i, row in enumerate(history):
                    t.log_scalars(_scalars(row), (int(row.get("epoch", i)) + 1) * int(iters))
    return result


def evaluation_pictures(task, model, cfg: Dict[str, Any], val_set, classes: Sequence[str],
                        num_images: int = 4) -> Dict[str, Any]:
    """The task's pictures (:meth:`leanvit.tasks.Task.draw`) of the first ``num_images`` validation images:
    ``pictures/kept_tokens`` (EViT), ``pictures/merged_tokens`` (ToMe), ``pictures/predictions`` (detection,
    segmentation); {} when the task draws nothing for this model (e.g. a ViT without token reduction)."""
    from PIL import Image

    from leanvit.models.build import BuiltModel
    from leanvit.utils import to_2tuple

    if not hasattr(val_set, "image") or len(val_set) == 0:
        return {}
    n = min(int(num_images), len(val_set))
    images = [val_set.image(i) for i in range(n)]
    names = [f"val {i}" for i in range(n)]
    img = cfg.get("img_size")
    built = BuiltModel(model, str(cfg.get("model")), to_2tuple(img) if img else None, dict(cfg),
                       {"classes": list(classes), "config": dict(cfg)})
    device = next(model.parameters()).device
    was = model.training
    with tempfile.TemporaryDirectory() as tmp:
        try:
            paths = task.draw(built, images, tmp, names, class_names=list(classes), device=device)
        except LeanvitError as e:  # nothing to draw for this model
            log.debug(f"no evaluation pictures: {e}")
            return {}
        finally:
            model.train(was)
        grid = Path(paths[-1])
        with Image.open(grid) as im:
            return {f"pictures/{grid.stem}": im.convert("RGB")}
