"""One epoch of training: the step the engine repeats (each batch's forward pass and loss are the task's)."""
from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn
from tqdm import tqdm

from leanvit.errors import LeanvitError
from leanvit.reduction import ReductionMethod
from leanvit.train.distributed import DistEnv, seed_step
from leanvit.train.state import TrainState

__all__ = ["StepContext", "train_one_epoch", "reduction_at"]


class StepContext:
    """What every training step needs besides the state: the (DDP-wrapped) model to call, the task's
    ``step(ctx, x, y) -> (loss, images)``, autocast, gradient clipping and the token-reduction schedule."""

    def __init__(self, cfg: Dict[str, Any], env: DistEnv, forward_model: nn.Module, step: Callable,
                 reduction: Optional[Dict[str, Any]] = None, method: Optional[ReductionMethod] = None,
                 iters: int = 1):
        self.cfg, self.env, self.forward_model, self.step = cfg, env, forward_model, step
        self.iters = iters
        self.method = method
        self.reduction = reduction
        self.use_amp = bool(cfg["amp"])
        self.amp_dtype = torch.float16 if env.device.type == "cuda" else torch.bfloat16
        self.clip_grad = cfg["clip_grad"]
        # the epoch's running sums (loss x images, images) after the last step: what a recovery
        # checkpoint records so that a resumed epoch reports the same training loss
        self.running = (0.0, 0)

    def autocast(self):
        return torch.autocast(self.env.device.type, dtype=self.amp_dtype) if self.use_amp else nullcontext()


def reduction_at(ctx: StepContext, step: int):
    """The reduction strength at ``step`` (None without a scheduled reduction)."""
    if ctx.method is None or ctx.reduction is None or ctx.method.knob not in ctx.reduction:
        return None
    start = int(round(ctx.reduction["start_epoch"] * ctx.iters))
    span = int(round(ctx.reduction["epochs"] * ctx.iters))
    return ctx.method.schedule(step, ctx.reduction[ctx.method.knob], start, span)


def _with_method_loss(ctx: StepContext, state: TrainState, loss: torch.Tensor) -> torch.Tensor:
    """The task's loss plus the reduction method's own (``training_loss`` x ``loss_weight``), if it has one."""
    if ctx.method is None or not ctx.method.loss_weight:
        return loss
    extra = ctx.method.training_loss(state.model)
    return loss if extra is None else loss + ctx.method.loss_weight * extra.float()


def _backward_and_step(state: TrainState, loss: torch.Tensor, clip_grad) -> None:
    state.optimizer.zero_grad(set_to_none=True)
    params = state.model.parameters()
    if state.scaler is not None:
        state.scaler.scale(loss).backward()
        if clip_grad:
            state.scaler.unscale_(state.optimizer)
            nn.utils.clip_grad_norm_(params, clip_grad)
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        loss.backward()
        if clip_grad:
            nn.utils.clip_grad_norm_(params, clip_grad)
        state.optimizer.step()


def _check_finite(loss: torch.Tensor, ctx: StepContext, epoch: int, i: int, last_path) -> None:
    finite = bool(torch.isfinite(loss))
    if ctx.env.distributed:
        finite = ctx.env.all_sum([float(finite)])[0] == ctx.env.world_size
    if not finite:
        kept = f"; the last good checkpoint, {last_path}, is intact" if last_path and last_path.exists() else ""
        raise LeanvitError(f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, iteration {i + 1}: "
                           f"training stopped (lower the learning rate or enable clip_grad){kept}")


def train_one_epoch(state: TrainState, loader, ctx: StepContext, progress: bool = False, last_path=None,
                    on_step: Optional[Callable[[TrainState], None]] = None, start: int = 0,
                    carry: Optional[tuple] = None) -> Dict[str, Any]:
    """Train ``state.model`` for one epoch (``ctx.iters`` steps); returns the epoch's training metrics.

    Resuming mid-epoch: ``start`` steps of this epoch are done already (``loader`` then yields the batches
    from step ``start`` on) and ``carry`` holds their (loss x images, images) sums. Python, NumPy and
    torch are reseeded before every step from (seed, step, rank), so a step computes the same whether
    or not the run was interrupted before it."""
    env, epoch = ctx.env, state.epoch
    loss_sum, seen = carry if carry is not None else (0.0, 0)
    t0, keep, seen_here = time.perf_counter(), None, 0
    ctx.running = (loss_sum, seen)
    bar = tqdm(total=ctx.iters, initial=start, desc=f"epoch {epoch + 1}/{ctx.cfg['epochs']}", unit="it",
               leave=False, disable=not (progress and env.is_main))
    try:
        for i, (x, y) in enumerate(loader, start):
            if i >= ctx.iters:
                break
            seed_step(ctx.cfg["seed"], state.step, env.rank)
            state.scheduler.step_update(state.step)
            keep = reduction_at(ctx, state.step)
            if keep is not None:
                ctx.method.set_strength(state.model, keep)
            loss, n = ctx.step(ctx, x, y)
            loss = _with_method_loss(ctx, state, loss)
            _check_finite(loss, ctx, epoch, i, last_path)
            _backward_and_step(state, loss, ctx.clip_grad)
            if state.ema is not None:
                state.ema.update(state.model, step=state.step)
            state.step += 1
            loss_sum += loss.item() * n
            seen += n
            seen_here += n
            ctx.running = (loss_sum, seen)
            if env.is_main and (i % max(1, ctx.cfg["log_every"]) == 0 or i == ctx.iters - 1):
                post = dict(loss=f"{loss.item():.4f}", lr=f"{state.optimizer.param_groups[0]['lr']:.2e}",
                            img_s=f"{seen_here * env.world_size / (time.perf_counter() - t0):.0f}")
                if keep is not None:
                    post["keep"] = ctx.method.format_strength(keep)
                bar.set_postfix(post, refresh=False)
            bar.update(1)
            if on_step is not None:
                on_step(state)
    finally:
        bar.close()
    train_time = time.perf_counter() - t0
    loss_tot, seen_tot, here_tot = env.all_sum([loss_sum, seen, seen_here])
    if keep is None and start:  # resumed at the epoch's last step(s): the strength of its last step
        keep = reduction_at(ctx, state.step - 1)
    return {"epoch": epoch, "train_loss": loss_tot / max(seen_tot, 1), "lr": state.optimizer.param_groups[0]["lr"],
            "strength": keep, "train_img_per_s": here_tot / max(train_time, 1e-9), "epoch_seconds": train_time}
