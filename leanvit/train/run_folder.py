"""A run folder belongs to one run: ownership, a lock, crash leftovers and the resumed config.

* :func:`resume_decision`: a fresh run where ``last.pth`` already exists is an error (nothing is touched)
  unless the caller asked to resume (``resume=True``), to resume when possible (``resume="auto"``: the one
  command line for elastic restarts and requeued jobs) or to overwrite (``overwrite=True``).
* :class:`RunLock`: ``.lock`` with the owner's pid and host, created with ``O_EXCL``; a second run on the
  same folder stops with an error naming the owner; a stale lock (its pid is dead on this host, or it names
  no owner for more than a few seconds, as a run on a full disk leaves it) is taken
  over with a note.
* :func:`remove_orphans`: temporary files a killed checkpoint/metrics write left behind.
* :func:`config_differences`: the settings in which a resumed run differs from its checkpoint's.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from leanvit.checkpoints import check_writable
from leanvit.errors import LeanvitError

__all__ = ["RunLock", "resume_decision", "remove_orphans", "config_differences", "SAFE_RESUME_KEYS",
           "check_output_path", "RUN_FILES"]

log = logging.getLogger(__name__)

# settings that may change between a run and its resumption without changing what it computes
# (``epochs`` lengthens the cosine schedule: allowed, as a deliberate extension of a run)
SAFE_RESUME_KEYS = frozenset({"epochs", "time_limit", "workers", "log_every", "output", "device", "recipe",
                              "eval_every", "save_every_steps", "keep_last", "skip_corrupt", "log_to"})
RUN_FILES = ("last.pth", "best.pth", "metrics.jsonl", "metrics.csv", "config.yaml")
LOCK_NAME = ".lock"


def check_output_path(out: Path, what: str = "`output`") -> Path:
    """``out`` can be a run folder: not an existing file, and not under one."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LeanvitError(f"{what} {out} exists and is not a folder (a run folder is a directory)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise LeanvitError(f"{what} {out}: {parent} is a file, not a folder")
            break
    return out


def resume_decision(out: Path, resume: Union[bool, str] = False, overwrite: bool = False) -> bool:
    """Whether the run in ``out`` resumes; an error for a fresh run over an existing one. Reads only."""
    last = Path(out) / "last.pth"
    if resume == "auto":
        if overwrite:
            raise LeanvitError("`auto_resume` and `overwrite` contradict each other: give one")
        return last.exists()
    if resume:
        if overwrite:
            raise LeanvitError("`resume` and `overwrite` contradict each other: give one")
        if not last.exists():
            raise LeanvitError(f"nothing to resume: {last} does not exist (`auto_resume` starts fresh then)")
        return True
    if not overwrite:
        existing = [n for n in ("last.pth", "best.pth") if (Path(out) / n).exists()]
        if existing:
            raise LeanvitError(f"{out} already holds a run ({', '.join(existing)}); nothing was changed. Give "
                               "`resume` to continue it, `auto_resume` to continue it if possible, "
                               "`overwrite` to replace it, or another `output`")
    return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


class RunLock:
    """``OUT/.lock`` holding ``{"pid", "host", "since"}`` while a run owns the folder."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_NAME
        self.held = False

    def _owner(self) -> Optional[Dict[str, Any]]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable / half-written: treated as held by an unknown owner

    def _abandoned(self, grace_s: float = 5.0) -> bool:
        """An ownerless lock (empty or unreadable) older than ``grace_s``: its writer would have finished
        writing it in that time (a lock is written and synced right after it is created)."""
        try:
            return time.time() - self.path.stat().st_mtime > grace_s
        except FileNotFoundError:
            return False

    def acquire(self) -> "RunLock":
        check_writable(self.path.parent, "`output`")  # a full or read-only disk: now, not after an epoch
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(str(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None:
                    continue  # removed in between: try again
                if not owner and self._abandoned():  # empty or unreadable for a while: no run owns it
                    log.warning(f"note: taking over the lock of {self.path.parent}: it names no owner (left by "
                                "a run that could not write it, e.g. on a full disk)")
                    try:
                        self.path.unlink()
                    except FileNotFoundError:
                        pass
                    continue
                pid, host = owner.get("pid"), owner.get("host")
                if host == me["host"] and isinstance(pid, int) and not _pid_alive(pid):
                    log.warning(f"note: taking over the stale lock of {self.path.parent} (pid {pid} on {host} "
                                f"is gone; since {owner.get('since')})")
                    try:
                        self.path.unlink()
                    except FileNotFoundError:
                        pass
                    continue
                who = f"pid {pid} on host {host} since {owner.get('since')}" if owner else "an unknown owner"
                raise LeanvitError(f"{self.path.parent} is in use by another run ({who}); wait for it, use "
                                   f"another `output`, or remove {self.path} if that run is gone") from None
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(me) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:  # e.g. a full disk: leave no empty lock behind
                try:
                    self.path.unlink()
                except OSError:
                    pass
                raise LeanvitError(f"cannot write the lock {self.path}: {e.strerror or e}") from None
            self.held = True
            return self
        raise LeanvitError(f"could not take the lock {self.path} (it keeps changing owners)")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        owner = self._owner()
        if owner and owner.get("pid") == os.getpid():
            try:
                self.path.unlink()
            except OSError as e:
                if e.errno != errno.ENOENT:
                    log.warning(f"could not remove {self.path}: {e}")

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def remove_orphans(out: Path) -> List[str]:
    """Remove the temporary files killed writes leave (``.<name>.<random>.tmp``); returns their names."""
    removed = []
    for p in Path(out).glob(".*.tmp"):
        if p.is_file():
            try:
                size = p.stat().st_size
                p.unlink()
                removed.append(f"{p.name} ({size / 1e6:.1f} MB)")
            except OSError:
                pass
    if removed:
        log.info(f"removed {len(removed)} temporary file(s) left by an interrupted write: {', '.join(removed)}")
    return removed


def clear_run_files(out: Path) -> List[str]:
    """``--overwrite``: remove the previous run's checkpoints, metrics and config."""
    gone = []
    for p in [Path(out) / n for n in RUN_FILES] + sorted(Path(out).glob("checkpoint-*.pth")):
        if p.exists():
            p.unlink()
            gone.append(p.name)
    if gone:
        log.info(f"overwriting: removed the previous run's {', '.join(gone)}")
    return gone


def _norm(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_norm(x) for x in v]
    if isinstance(v, list):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def config_differences(recorded: Dict[str, Any], current: Dict[str, Any],
                       safe=SAFE_RESUME_KEYS) -> List[str]:
    """``key: recorded -> current`` for every setting (outside ``safe``) that differs."""
    diffs = []
    for k in sorted(set(recorded) | set(current)):
        if k in safe:
            continue
        a, b = _norm(recorded.get(k)), _norm(current.get(k))
        if a != b:
            diffs.append(f"{k}: {recorded.get(k)!r} -> {current.get(k)!r}")
    return diffs
