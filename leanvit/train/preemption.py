"""Preemption: SIGTERM/SIGUSR1 end a run cleanly at a step boundary, and recovery checkpoints.

SLURM, Kubernetes and spot instances send SIGTERM (SLURM's ``--signal=USR1@90`` sends SIGUSR1) some
seconds before they kill a job. :class:`StopRequest` notes the signal; the engine checks it after every
optimizer step (all ranks agree through one all-reduce, so every rank stops after the same step), writes a
recovery checkpoint (model, optimizer, EMA, step, position in the epoch) and raises
:class:`TrainingInterrupted`, which the command line turns into exit status :data:`EXIT_PREEMPTED`.
Restart the same command with ``--resume`` or ``--auto-resume``.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import List, Optional

from leanvit.errors import LeanvitError

__all__ = ["StopRequest", "TrainingInterrupted", "EXIT_PREEMPTED", "keep_last_copies"]

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "temporary failure, try again" (requeue / restart and resume)
STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s)


class TrainingInterrupted(LeanvitError):
    """A run stopped by a signal after saving a recovery checkpoint (exit status ``exit_code``)."""

    exit_code = EXIT_PREEMPTED


class StopRequest:
    """Installs handlers for SIGTERM and SIGUSR1 that only note the signal (restored by :meth:`uninstall`)."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for sig in STOP_SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except (ValueError, OSError):
                pass
        return self

    def _handler(self, signum, frame) -> None:
        first = self.signum is None
        self.signum = signum
        if first:
            log.warning(f"received {signal.Signals(signum).name}: finishing the current step, then saving a "
                        "recovery checkpoint and stopping")

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            try:
                signal.signal(sig, old)
            except (ValueError, OSError, TypeError):
                pass
        self._old = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a stop request"

    def requested(self, env) -> bool:
        """Whether any rank received a stop signal (a collective: every rank must call it at each step)."""
        flag = 1.0 if self.signum is not None else 0.0
        if env.distributed:
            flag = env.all_sum([flag])[0]
        return flag > 0


def keep_last_copies(last: Path, step: int, keep: Optional[int]) -> List[Path]:
    """With ``keep`` = K >= 1: also keep ``checkpoint-<step>.pth`` (a hard link to the just-written
    ``last.pth``, a copy where links are impossible) and delete all but the K newest; returns those kept."""
    if not keep:
        return []
    last = Path(last)
    copy = last.parent / f"checkpoint-{int(step):09d}.pth"
    if not copy.exists():
        try:
            os.link(last, copy)
        except OSError:
            shutil.copy2(last, copy)
    copies = sorted(last.parent.glob("checkpoint-*.pth"))
    for old in copies[:-int(keep)]:
        try:
            old.unlink()
        except OSError:
            pass
    return copies[-int(keep):]
