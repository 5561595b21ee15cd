"""The dataset registry: ``create_dataset(name_or_path, split, ...)`` resolves a name (``digits``) or a
folder (an ImageFolder tree, ...) to a dataset kind and builds it.

A kind is a :class:`DatasetKind` registered with :func:`register_dataset`: it says which ``--data``
values it recognizes (a fixed name, or a folder layout), builds a split, and names its recipe options
key (``digits:`` for the embedded data). Kinds are tried newest first, so a specific layout (e.g. COCO)
registered after the generic ImageFolder wins over it.
"""
from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from leanvit.errors import LeanvitError

__all__ = ["DatasetKind", "GeneratedKind", "register_dataset", "resolve_dataset_kind", "create_dataset",
           "dataset_classes",
           "list_dataset_kinds", "dataset_options", "check_dataset_options", "with_data_overrides",
           "dataset_settings"]


class DatasetKind:
    """One kind of data. Subclasses set ``name`` and implement :meth:`matches`, :meth:`create`, :meth:`classes`.

    ``options_key``: the recipe mapping that holds this kind's options (e.g. ``digits``), or None.
    ``settings``: other top-level recipe settings the kind reads, with their defaults (e.g. ``val_data``).
    ``task``: ``classification`` (batches of (image, label)), or a dense task name."""

    name: str = ""
    embedded: bool = False  # built in (a name, not a folder)
    options_key: Optional[str] = None
    settings: Dict[str, Any] = {}
    task: str = "classification"

    def recipe_settings(self) -> Dict[str, Any]:
        """The recipe settings this kind declares: its ``options_key`` mapping (empty) and :attr:`settings`."""
        return {**({self.options_key: {}} if self.options_key else {}), **self.settings}

    def matches(self, data: str) -> bool:
        raise NotImplementedError

    def create(self, data: str, split: str, transform: Optional[Callable] = None,
               options: Optional[Dict[str, Any]] = None, classes: Optional[Sequence[str]] = None,
               skip_corrupt: bool = False):
        raise NotImplementedError

    def classes(self, data: str, split: str = "val", options: Optional[Dict[str, Any]] = None) -> List[str]:
        raise NotImplementedError

    def check_options(self, options: Dict[str, Any]) -> None:
        """A clear error for an unknown or malformed option (recipes and ``--set KEY.option=...``)."""

    def options_from_config(self, config: Dict[str, Any]) -> Dict[str, Any]:
        """This kind's options in a recorded training config or recipe (default: its ``options_key`` mapping;
        a kind may add top-level settings, e.g. ``val_data``)."""
        return dict(config.get(self.options_key) or {}) if self.options_key else {}


_KINDS: List[DatasetKind] = []


def check_keyword_options(where: str, options: Any, target: Callable,
                          skip: Iterable[str] = ("self", "split", "task", "transform")) -> None:
    """Check a kind's options against the keyword arguments of ``target`` (its dataset's ``__init__``): a
    one-line error for an unknown name (with the close ones) or a value of the wrong kind; each value must
    match its default's type (true/false, an integer >= 0, a finite number >= 0)."""
    if not isinstance(options, Mapping):
        raise LeanvitError(f"{where} must be a mapping of options, got {options!r}")
    params = {n: p for n, p in inspect.signature(target).parameters.items()
              if n not in set(skip) and p.kind is p.POSITIONAL_OR_KEYWORD}
    for k, v in options.items():
        if k not in params:
            close = difflib.get_close_matches(str(k), list(params), n=3)
            hint = f"; did you mean: {', '.join(close)}" if close else f"; known: {', '.join(params)}"
            raise LeanvitError(f"unknown setting '{where}.{k}'{hint}")
        default = params[k].default
        if isinstance(default, bool):
            if not isinstance(v, bool):
                raise LeanvitError(f"{where}.{k} must be true or false, got {v!r}")
        elif isinstance(default, int):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise LeanvitError(f"{where}.{k} must be an integer >= 0, got {v!r}")
        elif isinstance(default, float):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise LeanvitError(f"{where}.{k} must be a number >= 0, got {v!r}")


class GeneratedKind(DatasetKind):
    """An embedded kind whose samples a generator class renders (``--data digits-seg``, ``scenes-det``, ...): one
    ``dataset_class(split=, target_format=, transform=, **options)``, its options checked against that class's
    keywords. Subclasses set ``name``, ``task``, ``options_key``, ``target_format``, ``dataset_class`` and
    :meth:`classes`."""

    embedded = True
    target_format = "mask"
    dataset_class: Any = None

    def matches(self, data: str) -> bool:
        return data == self.name

    def create(self, data, split, transform=None, options=None, classes=None, skip_corrupt=False):
        ds = self.dataset_class(split=split, target_format=self.target_format, transform=transform, **(options or {}))
        if classes is not None and list(classes) != ds.classes:
            raise LeanvitError(f"the {self.name} classes {ds.classes} differ from the expected {list(classes)}")
        return ds

    def check_options(self, options):
        check_keyword_options(self.options_key, options, self.dataset_class.__init__,
                              skip=("self", "split", "target_format", "transform"))


def register_dataset(kind: DatasetKind) -> DatasetKind:
    """Add (or replace) a kind; it is tried before the kinds registered earlier."""
    _KINDS[:] = [k for k in _KINDS if k.name != kind.name]
    _KINDS.insert(0, kind)
    return kind


def list_dataset_kinds() -> List[str]:
    return [k.name for k in _KINDS]


def resolve_dataset_kind(data) -> DatasetKind:
    if data is None or str(data) == "":
        raise LeanvitError("no data given: name an ImageFolder tree (train/, val/) or 'digits'")
    for kind in _KINDS:
        if kind.matches(str(data)):
            return kind
    if not Path(str(data)).exists():
        names = [k.name for k in _KINDS if k.embedded]
        raise LeanvitError(f"`data`: no such folder: {data} (or use one of the embedded datasets: "
                           f"{', '.join(names)})")
    raise LeanvitError(f"cannot tell what kind of data {data} is (expected an ImageFolder tree "
                       f"DIR/train/<class>/*, DIR/val/<class>/*)")


def dataset_options(data, config: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The options a recorded training config (or recipe) holds for ``data``'s kind (e.g. ``digits:``)."""
    kind = resolve_dataset_kind(data)
    if not isinstance(config, dict):
        return {}
    return kind.options_from_config(config)


def with_data_overrides(config: Optional[Dict[str, Any]], overrides: Optional[Mapping]) -> Optional[Dict[str, Any]]:
    """A recorded training config with data options replaced: ``overrides`` maps ``KIND.option`` (e.g.
    ``hf.label_column``, ``shards.class_map``, ``digits.canvas_size``) or a top-level data setting
    (``val_data``) to its value, as ``--set`` gives them to the commands that read a checkpoint. A key that
    names no data option is a one-line error; ``config`` itself is left as it is."""
    if not overrides:
        return config
    out = dict(config or {})
    keys = {k.options_key: k for k in _KINDS if k.options_key}
    for key, value in overrides.items():
        head, dot, rest = str(key).partition(".")
        if not dot and head == "val_data":
            out[head] = value
            continue
        if not dot or head not in keys or not rest:
            known = ", ".join(sorted(f"{k}.OPTION" for k in keys))
            raise LeanvitError(f"`{key}` is no data option (give KIND.OPTION: {known}; or val_data)")
        mapping = {**dict(out.get(head) or {}), rest: value}
        keys[head].check_options(mapping)
        out[head] = mapping
    return out
def dataset_settings() -> List[Tuple[str, Dict[str, Any]]]:
    """(owner, settings) of every registered kind, oldest first (see :meth:`DatasetKind.recipe_settings`)."""
    return [(f"dataset kind {k.name}", k.recipe_settings()) for k in reversed(_KINDS)]


def check_dataset_options(cfg: Dict[str, Any]) -> None:
    """Check every kind's options mapping in a config (``digits:``, ...), whatever ``data`` is: a typo in an
    option of another kind would otherwise be ignored silently."""
    for kind in _KINDS:
        key = kind.options_key
        if not key or cfg.get(key) is None:
            continue
        if not isinstance(cfg[key], dict):
            raise LeanvitError(f"{key} must be a mapping, got {cfg[key]!r}")
        kind.check_options(cfg[key])


def create_dataset(data, split: str = "train", transform: Optional[Callable] = None,
                   options: Optional[Dict[str, Any]] = None, classes: Optional[Sequence[str]] = None,
                   skip_corrupt: bool = False):
    """The ``split`` of ``data`` (a registered name such as ``digits``, or a folder).

    Args:
        transform: applied to each image.
        options: the kind's options (e.g. ``canvas_size`` for ``digits``).
        classes: expected class names (e.g. training's); a mismatch is an error naming the folder.
        skip_corrupt: replace unreadable images by readable ones (counted) instead of failing.
    """
    kind = resolve_dataset_kind(data)
    if options:
        kind.check_options(options)
    return kind.create(str(data), split, transform=transform, options=options, classes=classes,
                       skip_corrupt=skip_corrupt)


def dataset_classes(data, split: str = "val", options: Optional[Dict[str, Any]] = None) -> List[str]:
    return list(resolve_dataset_kind(data).classes(str(data), split, options))
