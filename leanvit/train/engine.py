"""The training engine: ``train(recipe, **overrides)`` in one process or many through ``torchrun``.

What it adds around timm's parts (Mixup/CutMix, LAMB/AdamW, BCE, cosine schedule, EMA, RepeatAugSampler):
the token-reduction schedule stepped per iteration, exact resumption, atomic ``last``/``best``
checkpoints written by rank 0 only, a metrics log, a stop with a clear error on a non-finite loss, and
evaluation sharded over the processes. The pieces live in :mod:`.setup` (data, model, optimizer),
:mod:`.state` (:class:`TrainState`) and :mod:`.loop` (``train_one_epoch``); what differs per task (model, data,
loss, validation) comes from the run's :class:`leanvit.tasks.Task`.

Reproducibility: every step reseeds Python, NumPy and torch from (seed, step, rank), each training
sample's random transforms are seeded from (seed, epoch, rank, position), and the data order and the
embedded data's renders depend only on (seed, epoch); so a run resumed from any checkpoint, at an epoch
boundary or mid-epoch (a recovery checkpoint: ``save_every_steps``, SIGTERM/SIGUSR1), computes the same
weights as one that never stopped (on CPU).

Run folders are owned (:mod:`.run_folder`): a fresh run over an existing one is an error unless asked to
resume or overwrite, a lock keeps a second run out, and crash leftovers are removed at start.
Preemption (:mod:`.preemption`): a stop signal ends the run after the current step with a recovery
checkpoint and :class:`TrainingInterrupted` (exit status 75 on the command line).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
import yaml

from leanvit.checkpoints import read_checkpoint, save_checkpoint
from leanvit.data.shards import no_validation
from leanvit.errors import LeanvitError
from leanvit.models.build import describe_model
from leanvit.reduction import get_reduction
from leanvit.tasks import check_data, task_for_config
from leanvit.train.distributed import DistEnv, seed_everything
from leanvit.train.loop import StepContext, train_one_epoch
from leanvit.train.metrics import MetricsLog
from leanvit.train.preemption import StopRequest, TrainingInterrupted, keep_last_copies
from leanvit.train.recipes import defaults, reduction_settings, resolve_config
from leanvit.train.run_folder import (
    RunLock,
    check_output_path,
    clear_run_files,
    config_differences,
    remove_orphans,
    resume_decision,
)
from leanvit.train.setup import build_state, build_train_data, freeze_parameters
from leanvit.train.state import TrainState
from leanvit.train.tracking import Trackers, create_trackers, evaluation_pictures, parse_log_to

__all__ = ["train", "Run"]

log = logging.getLogger(__name__)


def _read_resume(path: Path) -> Dict[str, Any]:
    obj = read_checkpoint(path)
    if not isinstance(obj, dict) or "optimizer" not in obj or "epoch" not in obj:
        raise LeanvitError(f"{path} is not a leanvit training checkpoint (no optimizer/epoch state) "
                           "and cannot be resumed; use `finetune` to start from its weights")
    return obj


class Run:
    """One training run: its config, process group, run folder, data, state and step context."""

    def __init__(self, cfg: Dict[str, Any], env: DistEnv, progress: bool = True, resume: Union[bool, str] = False,
                 overwrite: bool = False, stop: Optional[StopRequest] = None):
        self.cfg, self.env, self.progress = cfg, env, progress
        parse_log_to(cfg.get("log_to"))  # an unknown backend or a missing package: an error before any work
        self.tracker = Trackers()  # rank 0's TensorBoard / W&B (leanvit.train.tracking), opened by fit
        if not cfg["data"]:
            raise LeanvitError(f"recipe '{cfg.get('recipe')}' needs data: give `data` DIR (an ImageFolder tree "
                               "with train/ and val/) or `data` digits")
        self.out = check_output_path(Path(cfg["output"] or Path("runs") / str(cfg.get("recipe") or cfg["model"])))
        self.last_path, self.best_path = self.out / "last.pth", self.out / "best.pth"
        self.stop = stop or StopRequest()
        self.lock = RunLock(self.out)
        self._resume_at = None  # (steps done in the epoch, their running loss sums) for a mid-epoch resume
        self._stopping = False
        self.resume = resume_decision(self.out, resume, overwrite)  # every rank, before anyone writes
        try:
            self._own_folder()
            seed_everything(cfg["seed"], 0, env.rank)
            self._build()
            if overwrite and not self.resume and env.is_main:
                # only now that the new run could be built: a data or model error leaves the old run intact
                clear_run_files(self.out)
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- run folder (see .run_folder)
    def _own_folder(self) -> None:
        """Rank 0 takes the lock and removes crash leftovers; every rank stops if it could not."""
        env, err = self.env, None
        env.barrier()
        if env.is_main:
            try:
                self.lock.acquire()
                remove_orphans(self.out)
            except LeanvitError as e:
                err = e
        failed = env.all_sum([1.0 if err is not None else 0.0])[0] if env.distributed else 0.0
        if err is not None:
            raise err
        if failed:
            raise LeanvitError(f"rank 0 could not take the run folder {self.out} (see its message)")

    def close(self) -> None:
        self.tracker.close()
        self.lock.release()

    def _build(self) -> None:
        """Everything task-specific comes from the run's task (:mod:`leanvit.tasks`): classes, model, data,
        training step and validation; the rest (optimizer, schedule, EMA, resumption, DDP) is the engine's."""
        cfg, env = self.cfg, self.env
        self.task = task_for_config(cfg)
        self.task.check_config(cfg)
        check_data(self.task, cfg["data"])
        classes = self.task.classes(cfg)
        self.num_classes = int(cfg["num_classes"] or len(classes))
        if self.num_classes < len(classes):
            raise LeanvitError(f"num_classes={self.num_classes} but the data has {len(classes)} classes")
        red = reduction_settings(cfg)
        target = None if red is None else {k: (list(v) if isinstance(v, tuple) else v) for k, v in red.items()
                                           if k not in ("start_epoch", "epochs")}
        finetune = cfg["finetune"] if cfg["finetune"] and not self.resume else None
        model, self.spec, note = self.task.build_model(cfg, self.num_classes, target, finetune)
        if note and env.is_main:
            log.info(note)
        if cfg.get("freeze"):
            tensors, params = freeze_parameters(model, cfg["freeze"])
            if env.is_main:
                log.info("froze %d parameter tensors (%s parameters) matching %s", tensors, f"{params:,}",
                         cfg["freeze"])
        self.data = self.task.build_data(cfg, env, model) or build_train_data(self.task, cfg, env, model)
        model = model.to(env.device)
        self.state = build_state(cfg, model, self.data.iters, env)
        if self.resume:
            self._load_resume()
        forward_model = env.wrap(model)
        self.ctx = StepContext(cfg, env, forward_model, self.task.training_step(cfg, self.num_classes), red,
                               get_reduction(red["method"]) if red else None, self.data.iters)

    def _load_resume(self) -> None:
        obj = _read_resume(self.last_path)
        recorded = (obj.get("model_spec") or {}).get("name")
        if recorded != self.spec["name"]:
            raise LeanvitError(f"{self.last_path} was written for model {recorded}, not {self.spec['name']}")
        self._check_resumed_config(obj.get("config"))
        self.state.load(obj)
        if "step" not in obj:  # checkpoints from before step counting: steps = epochs x iterations
            self.state.step = self.state.epoch * self.data.iters
        k = int(obj.get("epoch_step") or 0)
        if k:
            self._check_mid_epoch(obj, k)
            running = obj.get("running") or [0.0, 0]
            carry = (float(running[0]), int(running[1])) if self.env.is_main else (0.0, 0)
            self._resume_at = (k, carry)
        if self.env.is_main:
            where = f"at step {k}/{self.data.iters} of epoch {self.state.epoch + 1}" if k else \
                f"after epoch {self.state.epoch}"
            log.info(f"resuming {self.last_path} {where} (step {self.state.step})")

    def _check_resumed_config(self, recorded: Optional[Dict[str, Any]]) -> None:
        """--resume continues the same run: any setting that changes what it computes must be equal."""
        if not isinstance(recorded, dict):
            if self.env.is_main:
                log.warning(f"note: {self.last_path} records no config; its settings cannot be compared")
            return
        # settings newer than the checkpoint count as their defaults
        full = {**{k: v for k, v in defaults().items() if k in self.cfg}, **recorded}
        diffs = config_differences(full, self.cfg)
        if diffs:
            raise LeanvitError(f"`resume` with other settings than {self.last_path} was trained with: "
                               f"{'; '.join(diffs)} (only epochs, time_limit, workers, log_every, eval_every, "
                               "save_every_steps, keep_last and device may change; start a new `output` instead)")

    def _check_mid_epoch(self, obj: Dict[str, Any], k: int) -> None:
        ws, iters = obj.get("world_size"), obj.get("iters")
        if ws is not None and int(ws) != self.env.world_size:
            raise LeanvitError(f"{self.last_path} is a mid-epoch recovery checkpoint of {ws} process(es); resume "
                               f"it with {ws} (this run has {self.env.world_size}), the data order depends on it")
        if iters is not None and int(iters) != self.data.iters:
            raise LeanvitError(f"{self.last_path} was saved at step {k} of {iters}-step epochs but this run has "
                               f"{self.data.iters} steps per epoch")

    # ---------------------------------------------------------------- recovery checkpoints
    def _after_step(self, st: TrainState) -> None:
        """After every optimizer step (every rank): a recovery checkpoint when due or asked by a signal."""
        k = st.step - self._epoch_first_step
        stop = self.stop.requested(self.env)
        every = self.cfg.get("save_every_steps")
        due = bool(every) and st.step % int(every) == 0
        if self.tracker and st.step % max(1, int(self.cfg["log_every"])) == 0:
            loss_sum, seen = self.ctx.running
            self.tracker.log_scalars({"step/train_loss": loss_sum / max(seen, 1),
                                      "step/lr": st.optimizer.param_groups[0]["lr"]}, st.step)
        if k >= self.data.iters:  # the epoch's last step: the epoch-end checkpoint follows
            self._stopping = self._stopping or stop
            return
        if due or stop:
            self.save_recovery(k)
        if stop:
            raise TrainingInterrupted(self._stop_message())

    def _stop_message(self) -> str:
        return (f"stopped by {self.stop.name} at step {self.state.step} (epoch {self.state.epoch + 1}); a recovery "
                f"checkpoint is in {self.last_path}: run the same command with `resume` (or `auto_resume`)")

    def save_recovery(self, k: int) -> None:
        """``last.pth`` in the middle of an epoch: everything to continue after its step ``k``."""
        st, env = self.state, self.env
        loss_sum, seen = env.all_sum(list(self.ctx.running)) if env.distributed else self.ctx.running
        if env.is_main:
            extra = {"model_spec": self.spec, "classes": self.data.classes, "config": dict(self.cfg),
                     "task": self.task.name, "main_metric": self.task.main_metric, "epoch_step": int(k),
                     "iters": self.data.iters, "world_size": env.world_size, "running": [float(loss_sum), int(seen)]}
            save_checkpoint(st.checkpoint(**extra), self.last_path)
            keep_last_copies(self.last_path, st.step, self.cfg.get("keep_last"))
            log.debug(f"recovery checkpoint at step {st.step}")
        env.barrier()

    def _announce(self) -> None:
        cfg, env, d = self.cfg, self.env, self.data
        what = describe_model(self.spec["name"], self.state.model, self.spec.get("kwargs"))
        val = (f"{len(d.val_set)} val images" if not no_validation(cfg.get("val_data"))
               else "no validation images (val_data none)")
        log.info(f"training {what}, {self.num_classes} classes, on "
                 f"{cfg['data']}: {len(d.train_set)} train / {val}, {cfg['epochs']} epochs "
                 f"x {d.iters} iterations, batch {cfg['batch_size']} x {env.world_size} process(es), "
                 f"{env.device}, {torch.get_num_threads()} threads -> {self.out}")

    def save(self, row: Dict[str, Any], is_best: bool, metrics: MetricsLog) -> None:
        """``last.pth`` (resumable), ``best.pth`` when it improved, and the metrics row; rank 0 only."""
        extra = {"model_spec": self.spec, "classes": self.data.classes, "config": dict(self.cfg),
                 "task": self.task.name, "main_metric": self.task.main_metric, "iters": self.data.iters,
                 "world_size": self.env.world_size}
        save_checkpoint(self.state.checkpoint(**extra), self.last_path)
        keep_last_copies(self.last_path, self.state.step, self.cfg.get("keep_last"))
        if is_best:
            save_checkpoint({"model": self.state.model.state_dict(), "epoch": self.state.epoch,
                             self.task.main_metric: self.state.best, **extra}, self.best_path)
        metrics.write(self.state.history)  # the checkpoint's history: a row is never lost or duplicated

    def _evaluate_now(self, epoch: int, elapsed: float, start_epoch: int) -> tuple:
        cfg = self.cfg
        last_epoch = epoch == int(cfg["epochs"]) - 1
        # stop when another epoch like this one would end past the time limit
        over_time = cfg["time_limit"] is not None and elapsed + elapsed / (epoch + 1 - start_epoch) > cfg["time_limit"]
        if no_validation(cfg.get("val_data")):  # `val_data: none`: trained without validation, as recorded
            return False, over_time, last_epoch
        return last_epoch or over_time or (epoch + 1) % max(1, int(cfg["eval_every"])) == 0, over_time, last_epoch

    def _epoch_message(self, row: Dict[str, Any]) -> str:
        msg = (f"epoch {row['epoch'] + 1}/{self.cfg['epochs']}: train loss {row['train_loss']:.4f}, "
               f"{row['train_img_per_s']:.0f} img/s")
        msg += self.task.message(row)
        if row.get("strength") is not None:
            msg += f", {self.ctx.method.knob.replace('_', ' ')} {self.ctx.method.format_strength(row['strength'])}"
        return msg

    def fit(self) -> Dict[str, Any]:
        cfg, env, st = self.cfg, self.env, self.state
        metrics = None
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            metrics = MetricsLog(self.out)
            metrics.start(st.history)  # rebuilt from the checkpoint (a fresh run: empty)
            (self.out / "config.yaml").write_text(yaml.safe_dump(dict(cfg), sort_keys=False))
            self.tracker = create_trackers(cfg, self.out, st.step, bool(self.resume), st.history, self.data.iters)
            self._announce()
        t_run, start_epoch, row = time.perf_counter(), st.epoch, {}
        self.stopped_early = None
        finetune_eval_mode = cfg["finetune"] and not cfg["finetune_train_mode"]
        for epoch in range(start_epoch, int(cfg["epochs"])):
            seed_everything(cfg["seed"], epoch, env.rank)
            for obj in (self.data.train_set, self.data.sampler):
                if hasattr(obj, "set_epoch"):
                    obj.set_epoch(epoch)
            self.ctx.forward_model.train(not finetune_eval_mode)
            st.epoch = epoch
            start, carry = self._resume_at if self._resume_at and epoch == start_epoch else (0, None)
            if start:
                self.data.sampler.skip_next(start * int(cfg["batch_size"]))
            self._epoch_first_step = st.step - start
            row = train_one_epoch(st, self.data.train_loader, self.ctx, self.progress, self.last_path,
                                  on_step=self._after_step, start=start, carry=carry)
            evaluate_now, over_time, last_epoch = self._evaluate_now(epoch, time.perf_counter() - t_run, start_epoch)
            if evaluate_now:
                val = self.task.validate
                row.update(val(st.model, self.data.val_loader, env, self.ctx.use_amp))
                if st.ema is not None:
                    ema_m = val(st.ema.module, self.data.val_loader, env, self.ctx.use_amp)
                    row.update({f"ema_{k}": v for k, v in ema_m.items()})
            st.epoch = epoch + 1
            st.history.append(row)
            is_best = self._improves(row.get(self.task.main_metric))
            if is_best:
                st.best = row[self.task.main_metric]
            if env.is_main:
                self.save(row, is_best, metrics)
                self._track(row, evaluate_now)
                log.info(self._epoch_message(row))
            env.barrier()
            if self._stopping and not last_epoch:
                raise TrainingInterrupted(self._stop_message().replace("a recovery checkpoint", "the checkpoint"))
            if over_time and not last_epoch:
                self.stopped_early = (f"stopped by the time limit ({cfg['time_limit']} s) after {epoch + 1} of "
                                      f"{cfg['epochs']} epochs")
                if env.is_main:
                    log.warning(f"warning: {self.stopped_early}: another epoch would pass the limit; the result "
                                "is not that of the full recipe")
                break
        return self._summary(row, time.perf_counter() - t_run)

    def _track(self, row: Dict[str, Any], evaluated: bool) -> None:
        """The epoch's row (and, after an evaluation, pictures of a few validation images) to the trackers."""
        if not self.tracker:
            return
        self.tracker.log_row(row, self.state.step)
        if evaluated:
            try:
                pics = evaluation_pictures(self.task, self.state.model, self.cfg, self.data.val_set, self.data.classes)
            except Exception as e:  # noqa: BLE001 - a picture must never stop a run
                log.warning(f"warning: no evaluation pictures for the trackers: {e}")
                pics = {}
            self.tracker.log_images(pics, self.state.step)

    def _improves(self, value) -> bool:
        """Whether this epoch's main metric beats the best so far (``state.best``: -1 before any evaluation; a
        lower-is-better metric's first evaluation always counts)."""
        if value is None:
            return False
        if self.task.higher_is_better:
            return value > self.state.best
        earlier = [r for r in self.state.history[:-1] if self.task.main_metric in r]
        return not earlier or value < self.state.best

    def _summary(self, row: Dict[str, Any], seconds: float) -> Dict[str, Any]:
        if not row:  # nothing left to train (a finished run resumed): its last evaluated epoch's figures
            row = next((r for r in reversed(self.state.history) if self.task.main_metric in r), {})
        skipped = getattr(self.data.train_set, "num_skipped", 0)
        if skipped and self.env.is_main:
            log.warning(f"warning: {skipped} unreadable training image(s) were skipped")
        notes = self.task.data_notes(self.data) if self.env.is_main else []
        st = self.state
        evaluated = self.best_path.exists()  # best.pth: written at the first evaluation that counted
        return {"task": self.task.name, "main_metric": self.task.main_metric,
                "best_metric": st.best if evaluated else None,
                "last_metric": row.get(self.task.main_metric), "data_notes": notes,
                "output": str(self.out), "last": str(self.last_path),
                "best": str(self.best_path) if evaluated else None,
                **self.task.summary(st.best if evaluated else None, row), "history": st.history, "seconds": seconds,
                "model_spec": self.spec, "skipped_images": skipped,
                "epochs_done": st.epoch, "epochs": int(self.cfg["epochs"]), "stopped_early": self.stopped_early,
                "is_main": self.env.is_main}


def train(recipe: Union[str, Dict[str, Any], None] = None, device: Optional[str] = None,
          progress: bool = True, resume: Union[bool, str] = False, overwrite: bool = False,
          **overrides) -> Dict[str, Any]:
    """Train a model as a recipe says; returns a summary (best/last val top-1, paths, history).

    Args:
        recipe: a shipped recipe name, a YAML path, or a dict of settings (see :func:`leanvit.train.recipes.defaults`).
        device: ``cpu``, ``cuda`` (default: cuda when available).
        resume: continue from ``OUTPUT/last.pth`` (the optimizer, schedule, EMA and data position are
            restored; the settings must be those it was trained with, except epochs and a few more);
            ``"auto"``: resume if ``last.pth`` exists, else start fresh (elastic restarts, requeued jobs).
            Without it, an OUTPUT that holds a run is an error, unless ``overwrite``.
        overwrite: start fresh in an OUTPUT that holds a run (its checkpoints and metrics are removed).
        overrides: any recipe setting, e.g. ``epochs=3, data="path/to/tree"``.

    Raises :class:`~leanvit.train.preemption.TrainingInterrupted` after saving a recovery checkpoint when
    SIGTERM or SIGUSR1 arrives (in the main thread).
    """
    cfg = (resolve_config(None, {**recipe, **overrides}) if isinstance(recipe, dict)
           else resolve_config(recipe, overrides))
    env = DistEnv(device)
    stop = StopRequest().install()
    run = None
    try:
        run = Run(cfg, env, progress, resume, overwrite, stop)
        return run.fit()
    finally:
        stop.uninstall()
        if run is not None:
            run.close()
        env.close()
