"""Tasks as peers: classification, detection and segmentation behind one small protocol and a registry.

    from leanvit.tasks import get_task, register_task, Task
    task = get_task("detection")        # what differs per task: model, data, loss, metrics, pictures, sweep

A new task is one :class:`Task` subclass plus ``register_task(MyTask())`` (see ``docs/tasks.md``); the
training engine and the commands take it from a recipe's ``task:`` key or a checkpoint's record.
"""
from leanvit.tasks import classification, detection, segmentation  # noqa: F401  (registrations)
from leanvit.tasks.base import ForwardWith, SweepVariant, Task, TrainData
from leanvit.tasks.registry import (
                                    check_data,
                                    check_task_settings,
                                    get_task,
                                    list_tasks,
                                    register_task,
                                    task_for_config,
                                    task_of_checkpoint,
                                    task_settings,
                                    unregister_task,
)

__all__ = ["Task", "TrainData", "SweepVariant", "ForwardWith", "register_task", "unregister_task", "get_task",
           "list_tasks", "task_for_config", "task_of_checkpoint", "check_data", "task_settings",
           "check_task_settings"]
