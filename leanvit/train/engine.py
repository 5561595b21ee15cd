"""The training loop: one process or many through ``torchrun`` (DistributedDataParallel).

What it adds around timm's parts (Mixup/CutMix, LAMB/AdamW, BCE, cosine schedule, EMA, RepeatAugSampler):
the EViT keep-rate schedule stepped per iteration, exact resumption, atomic ``last``/``best``
checkpoints written by rank 0 only, a metrics log, a stop with a clear error on a non-finite loss, and
evaluation sharded over the processes.

Reproducibility: every epoch reseeds Python, NumPy and torch from (seed, epoch, rank), and the data
order and the embedded data's renders depend only on (seed, epoch); so a run resumed from the
checkpoint of epoch e computes the same weights as one that never stopped (on CPU).
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from leanvit.errors import LeanvitError
from leanvit.train.recipes import resolve_config

__all__ = ["train", "build_training_model", "model_spec_from_config", "DistEnv"]


class DistEnv:
    """Rank, world size and device of this process (torchrun's environment variables, else one process)."""

    def __init__(self, device: Optional[str] = None):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.distributed = self.world_size > 1
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":
            device = f"cuda:{self.local_rank}"
        self.device = torch.device(device)
        self._owns_group = False
        if self.distributed and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend=backend)
            self._owns_group = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values) -> list:
        t = torch.tensor(values, dtype=torch.float64)
        if self.distributed:
            if dist.get_backend() == "nccl":
                t = t.to(self.device)
            dist.all_reduce(t)
        return t.cpu().tolist()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()


def seed_everything(seed: int, epoch: int, rank: int) -> None:
    s = (int(seed) * 1_000_003 + int(epoch) * 7919 + int(rank) * 104_729) % (2 ** 31)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def model_spec_from_config(cfg: Dict[str, Any], num_classes: int) -> Dict[str, Any]:
    """What ``leanvit.create_model(name, **kwargs)`` needs to rebuild the trained model (stored in checkpoints)."""
    kwargs = dict(cfg.get("model_kwargs") or {})
    img = cfg["img_size"]
    kwargs["img_size"] = list(img) if isinstance(img, (list, tuple)) else img
    kwargs["num_classes"] = num_classes
    if cfg.get("keep_rate") is not None:
        kwargs["keep_rate"] = cfg["keep_rate"]
        if cfg.get("evit_locations") is not None:
            kwargs["locations"] = list(cfg["evit_locations"])
    return {"name": cfg["model"], "kwargs": kwargs}


def build_training_model(cfg: Dict[str, Any], num_classes: int) -> nn.Module:
    from leanvit.factory import create_model

    spec = model_spec_from_config(cfg, num_classes)
    kwargs = dict(spec["kwargs"])
    if cfg.get("drop_path"):
        kwargs["drop_path_rate"] = cfg["drop_path"]
    img = kwargs.pop("img_size")
    return create_model(spec["name"], img_size=tuple(img) if isinstance(img, list) else img, **kwargs)


def _finetune_from(model: nn.Module, path, is_main: bool) -> None:
    from leanvit.checkpoints import load_checkpoint

    res = load_checkpoint(model, path, strict=False, ignore_classifier=True)
    if is_main:
        notes = []
        if res.skipped_keys:
            notes.append(f"re-initialized {', '.join(res.skipped_keys)}")
        if res.missing_keys:
            notes.append(f"not in the checkpoint: {', '.join(res.missing_keys[:6])}")
        if res.unexpected_keys:
            notes.append(f"unused: {', '.join(res.unexpected_keys[:6])}")
        print(f"fine-tuning from {path}" + (f" ({'; '.join(notes)})" if notes else ""))


class _EpochShuffleSampler(torch.utils.data.Sampler):
    """A random order that depends only on (seed, epoch): reproducible across resumption."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 7_777 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def _train_sampler(dataset, cfg, env: DistEnv):
    if cfg["repeated_aug"]:
        from timm.data.distributed_sampler import RepeatAugSampler

        return RepeatAugSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, num_repeats=3)
    if env.distributed:
        return torch.utils.data.DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank,
                                                   shuffle=True, seed=cfg["seed"], drop_last=True)
    return _EpochShuffleSampler(len(dataset), cfg["seed"])


def _build_loss(cfg, mixing: bool) -> nn.Module:
    from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy

    if cfg["loss"] == "bce":
        # DeiT III: after mixup/cutmix every class with a non-zero weight is a positive (targets.gt(0))
        return BinaryCrossEntropy(smoothing=0.0, target_threshold=0.0 if mixing else None)
    if mixing:
        return SoftTargetCrossEntropy()  # smoothing is applied inside Mixup
    return nn.CrossEntropyLoss(label_smoothing=float(cfg["smoothing"]))


class _MetricsLog:
    """One row per epoch, appended to ``metrics.jsonl`` and ``metrics.csv``."""

    def __init__(self, out: Path):
        self.jsonl, self.csv = out / "metrics.jsonl", out / "metrics.csv"

    def truncate_after(self, epoch: int) -> None:
        """Drop rows of epochs >= ``epoch`` (written before a crash that is now being resumed)."""
        rows = self.rows()
        kept = [r for r in rows if r["epoch"] < epoch]
        if len(kept) != len(rows):
            self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in kept))
            self._write_csv(kept)

    def rows(self) -> list:
        if not self.jsonl.exists():
            return []
        return [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]

    def append(self, row: dict) -> None:
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self._write_csv(self.rows())

    def _write_csv(self, rows: list) -> None:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with self.csv.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)


def _evaluate(model, loader, env: DistEnv, amp: bool) -> Dict[str, float]:
    """Top-1/top-5/loss over the whole validation set, each process taking its own shard."""
    from leanvit.evaluate import accumulate

    was_training = model.training
    model.eval()
    s = accumulate(model, loader, env.device, amp=amp)
    model.train(was_training)
    n, c1, c5, loss = env.all_sum([s["images"], s["correct1"], s["correct5"], s["loss_sum"]])
    if n == 0:
        raise LeanvitError("the validation set is empty")
    return {"val_top1": 100.0 * c1 / n, "val_top5": 100.0 * c5 / n, "val_loss": loss / n}


def _read_resume(path: Path) -> Dict[str, Any]:
    from leanvit.checkpoints import read_checkpoint

    obj = read_checkpoint(path)
    if not isinstance(obj, dict) or "optimizer" not in obj or "epoch" not in obj:
        raise LeanvitError(f"{path} is not a leanvit training checkpoint (no optimizer/epoch state) "
                           "and cannot be resumed; use --finetune to start from its weights")
    return obj


def train(recipe: Union[str, Dict[str, Any], None] = None, device: Optional[str] = None,
          progress: bool = True, resume: bool = False, **overrides) -> Dict[str, Any]:
    """Train a model as a recipe says; returns a summary (best/last val top-1, paths, history).

    Args:
        recipe: a shipped recipe name, a YAML path, or a dict of settings (see ``recipes.DEFAULTS``).
        device: ``cpu``, ``cuda`` (default: cuda when available).
        resume: continue from ``OUTPUT/last.pth`` (the optimizer, schedule, EMA and RNG are restored).
        overrides: any recipe setting, e.g. ``epochs=3, data="path/to/tree"``.
    """
    from tqdm import tqdm

    if isinstance(recipe, dict):
        cfg = resolve_config(None, {**recipe, **overrides})
    else:
        cfg = resolve_config(recipe, overrides)
    env = DistEnv(device)
    try:
        return _train(cfg, env, progress, resume, tqdm)
    finally:
        env.close()


def _train(cfg, env: DistEnv, progress: bool, resume: bool, tqdm) -> Dict[str, Any]:
    from timm.data import Mixup
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV3

    from leanvit.checkpoints import save_checkpoint
    from leanvit.data import build_eval_dataset, build_train_dataset
    from leanvit.data.folder import check_same_classes
    from leanvit.evit import is_evit, keep_rate_schedule

    if not cfg["data"]:
        raise LeanvitError(f"recipe '{cfg.get('recipe')}' needs data: give --data DIR (an ImageFolder tree with "
                           "train/ and val/) or --data digits")
    out = Path(cfg["output"] or Path("runs") / str(cfg.get("recipe") or cfg["model"]))
    last_path, best_path = out / "last.pth", out / "best.pth"
    if resume and not last_path.exists():
        raise LeanvitError(f"nothing to resume: {last_path} does not exist")
    seed_everything(cfg["seed"], 0, env.rank)

    # data (errors about folders surface here, before any training)
    img = cfg["img_size"]
    img_size = tuple(img) if isinstance(img, (list, tuple)) else (int(img), int(img))
    tf = {k: cfg[k] for k in ("crop", "hflip", "three_augment", "color_jitter", "auto_augment", "reprob")}
    tf.update(scale=tuple(cfg["scale"]), src_padding=cfg["src_padding"])
    train_set = build_train_dataset(cfg["data"], img_size, transform=tf, digits=cfg["digits"],
                                    skip_corrupt=cfg["skip_corrupt"])
    classes = list(getattr(train_set, "classes"))
    val_set = build_eval_dataset(cfg["data"], img_size, split="val", crop_ratio=cfg["eval_crop_ratio"],
                                 digits=cfg["digits"], classes=classes)
    check_same_classes(classes, val_set.classes, f" ({cfg['data']})")
    num_classes = int(cfg["num_classes"] or len(classes))
    if num_classes < len(classes):
        raise LeanvitError(f"num_classes={num_classes} but the data has {len(classes)} classes")
    bs = int(cfg["batch_size"])
    mixing = cfg["mixup"] > 0 or cfg["cutmix"] > 0
    if mixing and bs % 2:
        raise LeanvitError(f"mixup/cutmix need an even batch size, got {bs}")
    sampler = _train_sampler(train_set, cfg, env)
    loader_kw = dict(num_workers=int(cfg["workers"]), pin_memory=env.device.type == "cuda",
                     persistent_workers=False)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=bs, sampler=sampler, drop_last=True,
                                               **loader_kw)
    if len(train_loader) == 0:
        raise LeanvitError(f"the training set ({len(train_set)} images per process) is smaller than one "
                           f"batch of {bs}")
    val_shard = torch.utils.data.Subset(val_set, list(range(env.rank, len(val_set), env.world_size)))
    val_loader = torch.utils.data.DataLoader(val_shard, batch_size=bs, shuffle=False, **loader_kw)
    iters = len(train_loader)
    if cfg["max_train_batches"]:
        iters = min(iters, int(cfg["max_train_batches"]))

    # model, optimizer, schedule
    model = build_training_model(cfg, num_classes).to(env.device)
    spec = model_spec_from_config(cfg, num_classes)
    if cfg["finetune"] and not resume:
        _finetune_from(model, cfg["finetune"], env.is_main)
    evit = is_evit(model)
    target_keep = model.keep_rate if evit else None
    if evit and not isinstance(target_keep, float):
        target_keep = None  # per-layer rates: used as they are, without a schedule
    opt_kwargs = {"eps": cfg["opt_eps"]} if cfg["opt"] in ("lamb", "adamw") else {}
    optimizer = create_optimizer_v2(model, opt=cfg["opt"], lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                                    **opt_kwargs)
    epochs = int(cfg["epochs"])
    scheduler = CosineLRScheduler(optimizer, t_initial=epochs * iters, lr_min=cfg["min_lr"],
                                  warmup_t=int(round(cfg["warmup_epochs"] * iters)),
                                  warmup_lr_init=cfg["warmup_lr"], t_in_epochs=False)
    mixup = None
    if mixing:
        mixup = Mixup(mixup_alpha=cfg["mixup"], cutmix_alpha=cfg["cutmix"], prob=cfg["mixup_prob"],
                      switch_prob=cfg["mixup_switch_prob"], mode="batch", label_smoothing=cfg["smoothing"],
                      num_classes=num_classes)
    criterion = _build_loss(cfg, mixing)
    ema = ModelEmaV3(model, decay=cfg["model_ema_decay"]) if cfg["model_ema"] else None
    use_amp = bool(cfg["amp"])
    amp_dtype = torch.float16 if env.device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if use_amp and env.device.type == "cuda" else None

    def amp_ctx():
        return torch.autocast(env.device.type, dtype=amp_dtype) if use_amp else nullcontext()

    start_epoch, best, history = 0, -1.0, []
    if resume:
        state = _read_resume(last_path)
        if state.get("model_spec", {}).get("name") != spec["name"]:
            raise LeanvitError(f"{last_path} was written for model {state.get('model_spec', {}).get('name')}, "
                               f"not {spec['name']}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, best, history = int(state["epoch"]), float(state.get("best_top1", -1.0)), list(state.get("history", []))
        if env.is_main:
            print(f"resuming {last_path} after epoch {start_epoch}")
    ddp_model = model
    if env.distributed:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None)

    log = None
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        log = _MetricsLog(out)
        log.truncate_after(start_epoch)
        (out / "config.yaml").write_text(__import__("yaml").safe_dump(dict(cfg), sort_keys=False))
        n_params = sum(p.numel() for p in model.parameters())
        print(f"training {spec['name']} ({n_params / 1e6:.2f}M params, {num_classes} classes) on {cfg['data']}: "
              f"{len(train_set)} train / {len(val_set)} val images, {epochs} epochs x {iters} iterations, "
              f"batch {bs} x {env.world_size} process(es), {env.device}, {torch.get_num_threads()} threads "
              f"-> {out}")
    keep_start = int(round(cfg["keep_rate_start_epoch"] * iters))
    keep_span = int(round(cfg["keep_rate_epochs"] * iters))
    t_run = time.perf_counter()
    finetune_eval_mode = cfg["finetune"] and not cfg["finetune_train_mode"]
    last_metrics: Dict[str, Any] = {}
    for epoch in range(start_epoch, epochs):
        seed_everything(cfg["seed"], epoch, env.rank)
        for obj in (train_set, sampler):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)
        ddp_model.train(not finetune_eval_mode)
        loss_sum, seen, t0 = 0.0, 0, time.perf_counter()
        keep = None
        bar = tqdm(total=iters, desc=f"epoch {epoch + 1}/{epochs}", unit="it", leave=False,
                   disable=not (progress and env.is_main))
        for i, (x, y) in enumerate(train_loader):
            if i >= iters:
                break
            step = epoch * iters + i
            scheduler.step_update(step)
            if target_keep is not None:
                keep = keep_rate_schedule(step, target_keep, keep_start, keep_span)
                model.keep_rate = keep
            x, y = x.to(env.device, non_blocking=True), torch.as_tensor(y).to(env.device, non_blocking=True)
            if mixup is not None:
                x, y = mixup(x, y)
            with amp_ctx():
                out_logits = ddp_model(x)
                loss = criterion(out_logits.float(), y)
            finite = bool(torch.isfinite(loss))
            if env.distributed:
                finite = env.all_sum([float(finite)])[0] == env.world_size
            if not finite:
                bar.close()
                kept = f"; the last good checkpoint, {last_path}, is intact" if last_path.exists() else ""
                raise LeanvitError(f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, iteration {i + 1}: "
                                   f"training stopped (lower the learning rate or enable clip_grad){kept}")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                if cfg["clip_grad"]:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg["clip_grad"])
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                if cfg["clip_grad"]:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg["clip_grad"])
                optimizer.step()
            if ema is not None:
                ema.update(model, step=step)
            loss_sum += loss.item() * x.shape[0]
            seen += x.shape[0]
            if env.is_main and (i % max(1, cfg["log_every"]) == 0 or i == iters - 1):
                post = dict(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                            img_s=f"{seen * env.world_size / (time.perf_counter() - t0):.0f}")
                if keep is not None:
                    post["keep"] = f"{keep:.3f}"
                bar.set_postfix(post, refresh=False)
            bar.update(1)
        bar.close()
        train_time = time.perf_counter() - t0
        loss_tot, seen_tot = env.all_sum([loss_sum, seen])
        row = {"epoch": epoch, "train_loss": loss_tot / max(seen_tot, 1), "lr": optimizer.param_groups[0]["lr"],
               "keep_rate": keep, "train_img_per_s": seen_tot / train_time, "epoch_seconds": train_time}
        last_epoch = epoch == epochs - 1
        # stop when another epoch like this one would end past the time limit
        elapsed = time.perf_counter() - t_run
        over_time = cfg["time_limit"] is not None and elapsed + elapsed / (epoch + 1 - start_epoch) > cfg["time_limit"]
        if last_epoch or over_time or (epoch + 1) % max(1, int(cfg["eval_every"])) == 0:
            row.update(_evaluate(model, val_loader, env, use_amp))
            if ema is not None:
                ema_m = _evaluate(ema.module, val_loader, env, use_amp)
                row.update({f"ema_{k}": v for k, v in ema_m.items()})
        history.append(row)
        is_best = row.get("val_top1", -1.0) > best
        if is_best:
            best = row["val_top1"]
        if env.is_main:
            state = {"model": model.state_dict(), "model_spec": spec, "classes": classes,
                     "optimizer": optimizer.state_dict(), "ema": ema.module.state_dict() if ema else None,
                     "scaler": scaler.state_dict() if scaler else None, "epoch": epoch + 1, "best_top1": best,
                     "history": history, "config": dict(cfg)}
            save_checkpoint(state, last_path)
            if is_best:
                save_checkpoint({"model": model.state_dict(), "model_spec": spec, "classes": classes,
                                 "epoch": epoch + 1, "val_top1": best, "config": dict(cfg)}, best_path)
            log.append(row)
            msg = (f"epoch {epoch + 1}/{epochs}: train loss {row['train_loss']:.4f}, "
                   f"{row['train_img_per_s']:.0f} img/s")
            if "val_top1" in row:
                msg += f", val top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}%"
            if keep is not None:
                msg += f", keep rate {keep:.3f}"
            print(msg, flush=True)
        last_metrics = row
        env.barrier()
        if over_time and not last_epoch:
            if env.is_main:
                print(f"stopping after epoch {epoch + 1}: another epoch would pass the time limit of "
                      f"{cfg['time_limit']} s")
            break
    skipped = getattr(train_set, "num_skipped", 0)
    if skipped and env.is_main:
        print(f"warning: {skipped} unreadable training image(s) were skipped")
    return {"output": str(out), "last": str(last_path), "best": str(best_path) if best >= 0 else None,
            "best_top1": best, "last_top1": last_metrics.get("val_top1"), "history": history,
            "seconds": time.perf_counter() - t_run, "model_spec": spec, "skipped_images": skipped}
