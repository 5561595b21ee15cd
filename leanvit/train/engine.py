"""The training engine: ``train(recipe, **overrides)`` in one process or many through ``torchrun``.

What it adds around timm's parts (Mixup/CutMix, LAMB/AdamW, BCE, cosine schedule, EMA, RepeatAugSampler):
the token-reduction schedule stepped per iteration, exact resumption, atomic ``last``/``best``
checkpoints written by rank 0 only, a metrics log, a stop with a clear error on a non-finite loss, and
evaluation sharded over the processes. The pieces live in :mod:`.setup` (data, model, optimizer),
:mod:`.state` (:class:`TrainState`) and :mod:`.loop` (``train_one_epoch``, ``validate``).

Reproducibility: every epoch reseeds Python, NumPy and torch from (seed, epoch, rank), and the data
order and the embedded data's renders depend only on (seed, epoch); so a run resumed from the
checkpoint of epoch e computes the same weights as one that never stopped (on CPU).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn
import yaml

from leanvit.checkpoints import read_checkpoint, save_checkpoint
from leanvit.data import dataset_classes, dataset_options
from leanvit.errors import LeanvitError
from leanvit.reduction import get_reduction
from leanvit.train.distributed import DistEnv, seed_everything
from leanvit.train.loop import StepContext, train_one_epoch, validate
from leanvit.train.metrics import MetricsLog
from leanvit.train.recipes import reduction_settings, resolve_config
from leanvit.train.setup import (build_data, build_loss, build_mixup, build_state, build_training_model,
                                 finetune_from, model_spec_from_config)
from leanvit.train.state import TrainState
from leanvit.train.tasks import get_task  # issue 10: detection / segmentation runs

__all__ = ["train", "Run"]

log = logging.getLogger(__name__)


def _read_resume(path: Path) -> Dict[str, Any]:
    obj = read_checkpoint(path)
    if not isinstance(obj, dict) or "optimizer" not in obj or "epoch" not in obj:
        raise LeanvitError(f"{path} is not a leanvit training checkpoint (no optimizer/epoch state) "
                           "and cannot be resumed; use --finetune to start from its weights")
    return obj


class Run:
    """One training run: its config, process group, run folder, data, state and step context."""

    def __init__(self, cfg: Dict[str, Any], env: DistEnv, progress: bool = True, resume: bool = False):
        self.cfg, self.env, self.progress, self.resume = cfg, env, progress, resume
        if not cfg["data"]:
            raise LeanvitError(f"recipe '{cfg.get('recipe')}' needs data: give --data DIR (an ImageFolder tree "
                               "with train/ and val/) or --data digits")
        self.out = Path(cfg["output"] or Path("runs") / str(cfg.get("recipe") or cfg["model"]))
        self.last_path, self.best_path = self.out / "last.pth", self.out / "best.pth"
        if resume and not self.last_path.exists():
            raise LeanvitError(f"nothing to resume: {self.last_path} does not exist")
        seed_everything(cfg["seed"], 0, env.rank)
        self._build()

    def _build(self) -> None:
        cfg, env = self.cfg, self.env
        self.task = get_task(cfg)  # dense tasks build their own model/data/step (leanvit.train.tasks)
        if self.task.dense:
            self.task.build_run(self)
            return
        classes = dataset_classes(cfg["data"], "train", dataset_options(cfg["data"], cfg))
        self.num_classes = int(cfg["num_classes"] or len(classes))
        if self.num_classes < len(classes):
            raise LeanvitError(f"num_classes={self.num_classes} but the data has {len(classes)} classes")
        model = build_training_model(cfg, self.num_classes)
        self.data = build_data(cfg, env, model)
        model = model.to(env.device)
        self.spec = model_spec_from_config(cfg, self.num_classes)
        if cfg["finetune"] and not self.resume and env.is_main:
            log.info(finetune_from(model, cfg["finetune"]))
        elif cfg["finetune"] and not self.resume:
            finetune_from(model, cfg["finetune"])
        self.state = build_state(cfg, model, self.data.iters, env)
        if self.resume:
            self._load_resume()
        forward_model = model
        if env.distributed:
            forward_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        mixup = build_mixup(cfg, self.num_classes)
        red = reduction_settings(cfg)
        self.ctx = StepContext(cfg, env, forward_model, build_loss(cfg, mixup is not None), mixup, red,
                               get_reduction(red["method"]) if red else None, self.data.iters)

    def _load_resume(self) -> None:
        obj = _read_resume(self.last_path)
        recorded = (obj.get("model_spec") or {}).get("name")
        if recorded != self.spec["name"]:
            raise LeanvitError(f"{self.last_path} was written for model {recorded}, not {self.spec['name']}")
        self.state.load(obj)
        if "step" not in obj:  # checkpoints from before step counting: steps = epochs x iterations
            self.state.step = self.state.epoch * self.data.iters
        if self.env.is_main:
            log.info(f"resuming {self.last_path} after epoch {self.state.epoch}")

    def _announce(self) -> None:
        cfg, env, d = self.cfg, self.env, self.data
        n_params = sum(p.numel() for p in self.state.model.parameters())
        log.info(f"training {self.spec['name']} ({n_params / 1e6:.2f}M params, {self.num_classes} classes) on "
                 f"{cfg['data']}: {len(d.train_set)} train / {len(d.val_set)} val images, {cfg['epochs']} epochs "
                 f"x {d.iters} iterations, batch {cfg['batch_size']} x {env.world_size} process(es), "
                 f"{env.device}, {torch.get_num_threads()} threads -> {self.out}")

    def save(self, row: Dict[str, Any], is_best: bool, metrics: MetricsLog) -> None:
        """``last.pth`` (resumable), ``best.pth`` when it improved, and the metrics row; rank 0 only."""
        extra = {"model_spec": self.spec, "classes": self.data.classes, "config": dict(self.cfg)}
        save_checkpoint(self.state.checkpoint(**extra), self.last_path)
        if is_best:
            save_checkpoint({"model": self.state.model.state_dict(), "epoch": self.state.epoch,
                             self.task.main_metric: self.state.best, **extra}, self.best_path)
        metrics.append(row)

    def _evaluate_now(self, epoch: int, elapsed: float, start_epoch: int) -> tuple:
        cfg = self.cfg
        last_epoch = epoch == int(cfg["epochs"]) - 1
        # stop when another epoch like this one would end past the time limit
        over_time = cfg["time_limit"] is not None and elapsed + elapsed / (epoch + 1 - start_epoch) > cfg["time_limit"]
        return last_epoch or over_time or (epoch + 1) % max(1, int(cfg["eval_every"])) == 0, over_time, last_epoch

    def _epoch_message(self, row: Dict[str, Any]) -> str:
        msg = (f"epoch {row['epoch'] + 1}/{self.cfg['epochs']}: train loss {row['train_loss']:.4f}, "
               f"{row['train_img_per_s']:.0f} img/s")
        if "val_top1" in row:
            msg += f", val top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}%"
        msg += self.task.message(row)
        if row.get("keep_rate") is not None:
            msg += f", {self.ctx.method.knob.replace('_', ' ')} {self.ctx.method.format_strength(row['keep_rate'])}"
        return msg

    def fit(self) -> Dict[str, Any]:
        cfg, env, st = self.cfg, self.env, self.state
        metrics = None
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            metrics = MetricsLog(self.out)
            metrics.truncate_after(st.epoch)
            (self.out / "config.yaml").write_text(yaml.safe_dump(dict(cfg), sort_keys=False))
            self._announce()
        t_run, start_epoch, row = time.perf_counter(), st.epoch, {}
        finetune_eval_mode = cfg["finetune"] and not cfg["finetune_train_mode"]
        for epoch in range(start_epoch, int(cfg["epochs"])):
            seed_everything(cfg["seed"], epoch, env.rank)
            for obj in (self.data.train_set, self.data.sampler):
                if hasattr(obj, "set_epoch"):
                    obj.set_epoch(epoch)
            self.ctx.forward_model.train(not finetune_eval_mode)
            st.epoch = epoch
            row = train_one_epoch(st, self.data.train_loader, self.ctx, self.progress, self.last_path)
            evaluate_now, over_time, last_epoch = self._evaluate_now(epoch, time.perf_counter() - t_run, start_epoch)
            if evaluate_now:
                val = self.task.validate if self.task.dense else validate
                row.update(val(st.model, self.data.val_loader, env, self.ctx.use_amp))
                if st.ema is not None:
                    ema_m = val(st.ema.module, self.data.val_loader, env, self.ctx.use_amp)
                    row.update({f"ema_{k}": v for k, v in ema_m.items()})
            st.epoch = epoch + 1
            st.history.append(row)
            main = self.task.main_metric  # val_top1; val_map (detection), val_miou (segmentation)
            is_best = row.get(main, -1.0) > st.best
            if is_best:
                st.best = row[main]
            if env.is_main:
                self.save(row, is_best, metrics)
                log.info(self._epoch_message(row))
            env.barrier()
            if over_time and not last_epoch:
                if env.is_main:
                    log.info(f"stopping after epoch {epoch + 1}: another epoch would pass the time limit of "
                             f"{cfg['time_limit']} s")
                break
        return self._summary(row, time.perf_counter() - t_run)

    def _summary(self, row: Dict[str, Any], seconds: float) -> Dict[str, Any]:
        skipped = getattr(self.data.train_set, "num_skipped", 0)
        if skipped and self.env.is_main:
            log.warning(f"warning: {skipped} unreadable training image(s) were skipped")
        notes = self.task.skipped_notes(self) if self.task.dense and self.env.is_main else []
        st = self.state
        return {"task": self.task.name, "main_metric": self.task.main_metric, "best_metric": st.best,
                "last_metric": row.get(self.task.main_metric), "data_notes": notes,
                "output": str(self.out), "last": str(self.last_path),
                "best": str(self.best_path) if st.best >= 0 else None,
                "best_top1": None if self.task.dense else st.best,
                "last_top1": row.get("val_top1"), "history": st.history, "seconds": seconds,
                "model_spec": self.spec, "skipped_images": skipped}


def train(recipe: Union[str, Dict[str, Any], None] = None, device: Optional[str] = None,
          progress: bool = True, resume: bool = False, **overrides) -> Dict[str, Any]:
    """Train a model as a recipe says; returns a summary (best/last val top-1, paths, history).

    Args:
        recipe: a shipped recipe name, a YAML path, or a dict of settings (see ``recipes.DEFAULTS``).
        device: ``cpu``, ``cuda`` (default: cuda when available).
        resume: continue from ``OUTPUT/last.pth`` (the optimizer, schedule, EMA and RNG are restored).
        overrides: any recipe setting, e.g. ``epochs=3, data="path/to/tree"``.
    """
    cfg = resolve_config(None, {**recipe, **overrides}) if isinstance(recipe, dict) else resolve_config(recipe, overrides)
    env = DistEnv(device)
    try:
        return Run(cfg, env, progress, resume).fit()
    finally:
        env.close()
