"""The task registry: ``register_task(task)``, ``get_task(name)``, and the task of a recipe or a checkpoint.

The task of a recipe is its ``task`` key, else the task of its data's kind (``digits-det`` is detection);
the task of a checkpoint is the one it records (checkpoints without one are classification). Whether some
data suits a task is decided here, in :func:`check_data`, for every command alike.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from leanvit.checkpoints import read_checkpoint
from leanvit.data import resolve_dataset_kind
from leanvit.errors import LeanvitError
from leanvit.tasks.base import Task

__all__ = ["register_task", "get_task", "list_tasks", "task_for_config", "task_of_checkpoint", "check_data",
           "task_settings", "check_task_settings", "DEFAULT_TASK"]

_TASKS: Dict[str, Task] = {}
DEFAULT_TASK = "classification"  # what checkpoints that record no task hold


def register_task(task: Task) -> Task:
    """Make ``task`` (an instance of a :class:`~leanvit.tasks.Task` subclass) known by ``task.name``."""
    if not isinstance(task, Task) or not task.name or not task.main_metric:
        raise LeanvitError(f"register_task takes a Task instance with a name and a main_metric, got {task!r}")
    _TASKS[task.name] = task
    return task


def unregister_task(name: str) -> None:
    _TASKS.pop(name, None)


def list_tasks() -> List[str]:
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    try:
        return _TASKS[str(name)]
    except KeyError:
        raise LeanvitError(f"unknown task {name!r} (known: {', '.join(list_tasks())})") from None


def task_settings() -> List[Tuple[str, Dict[str, Any]]]:
    """(owner, settings) of every registered task (:attr:`Task.settings`), in registration order."""
    return [(f"task {t.name}", dict(t.settings)) for t in _TASKS.values()]


def check_task_settings(cfg: Dict[str, Any]) -> None:
    """Every registered task's :meth:`Task.check_settings` on ``cfg``."""
    for t in _TASKS.values():
        t.check_settings(cfg)


def _data_task(data) -> Optional[str]:
    try:
        return resolve_dataset_kind(data).task
    except LeanvitError:
        return None


def task_for_config(cfg: Dict[str, Any]) -> Task:
    """The recipe's ``task``, else the task of its data's kind, else classification."""
    if cfg.get("task"):
        return get_task(cfg["task"])
    kind_task = _data_task(cfg.get("data")) if cfg.get("data") else None
    return get_task(kind_task if kind_task in _TASKS else DEFAULT_TASK)


def task_of_checkpoint(checkpoint) -> Task:
    """The task a checkpoint records (``task``, or its ``model_spec``'s), else classification."""
    if checkpoint is None:
        return get_task(DEFAULT_TASK)
    obj = read_checkpoint(checkpoint)
    name = None
    if isinstance(obj, dict):
        spec = obj.get("model_spec")
        name = obj.get("task") or (spec.get("task") if isinstance(spec, dict) else None)
    return get_task(name or DEFAULT_TASK)


def check_data(task: Task, data, what: str = "the task") -> None:
    """A one-line error when ``data``'s kind holds another task's data than ``task`` reads (e.g. a
    classifier's checkpoint on the detection scenes ``digits-det``)."""
    kind = resolve_dataset_kind(data)
    accepted = tuple(task.data_tasks) or (task.name,)
    if kind.task not in accepted:
        raise LeanvitError(f"`data` {data} is {kind.task} data ({kind.name}), but {what} is {task.name}: give "
                           f"{' or '.join(accepted)} data")
