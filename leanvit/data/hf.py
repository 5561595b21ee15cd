"""Hugging Face datasets as a dataset kind: ``--data hfds/<name>`` (a hub dataset, downloaded once into
the ``datasets`` cache) or a folder written by ``datasets.Dataset.save_to_disk`` /
``DatasetDict.save_to_disk``.

They are Arrow tables with random access, so they use the same samplers as an ImageFolder: each image
once per epoch across processes and exact mid-epoch resumption. Images are decoded here (the column is
read undecoded), so an unreadable image is a counted skip (``skip_corrupt``) or an error naming the row.

Options (recipe mapping ``hf:``): ``image_column`` / ``label_column`` (default: ``image`` or ``img``,
``label`` or ``labels``), ``train_split`` (``train``), ``val_split`` (``validation``, else ``val`` or
``test``). Class names come from the label column's ``ClassLabel`` feature; a text label column holds the
class names themselves (sorted, as ImageFolder sorts its folders); else the classes are ``0..max label``.
A label that is neither an integer nor text (None, a float) is an error naming the column, row and value.
"""
from __future__ import annotations

import io
import numbers
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image

from leanvit.data.folder import SharedSkips, SkippingImageDataset, to_rgb8
from leanvit.data.folder import no_buffer_repr as _no_buffer
from leanvit.data.registry import DatasetKind, register_dataset
from leanvit.errors import LeanvitError

__all__ = ["HFDataset", "HFKind", "load_split", "read_labels"]

OPTIONS = ("image_column", "label_column", "train_split", "val_split")
PREFIX = "hfds/"


def _datasets():
    try:
        import datasets
    except ImportError:
        raise LeanvitError("Hugging Face datasets need the 'datasets' package: pip install leanvit[hf]") from None
    return datasets


def _is_saved(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def load_split(data: str, split: str):
    """The ``split`` of a hub dataset (``hfds/<name>``) or of a saved folder, as a ``datasets.Dataset``."""
    ds_lib = _datasets()
    if data.startswith(PREFIX):
        name = data[len(PREFIX):]
        try:
            return ds_lib.load_dataset(name, split=split)
        except ValueError as e:  # unknown split
            raise LeanvitError(f"{data}: no split '{split}' ({str(e).splitlines()[0]})") from None
        except Exception as e:  # noqa: BLE001 - hub/network/format errors become one line
            first = str(e).splitlines()[0] if str(e) else repr(e)
            raise LeanvitError(f"cannot load {data} split {split}: {first}") from None
    obj = ds_lib.load_from_disk(data)
    if isinstance(obj, ds_lib.DatasetDict):
        if split not in obj:
            raise LeanvitError(f"{data} has no split '{split}' (it has: {', '.join(obj)})")
        return obj[split]
    if split == "train":
        raise LeanvitError(f"{data} is a single dataset without splits; save a DatasetDict with train and "
                           "validation splits to train on it")
    return obj


def _pick(columns: Sequence[str], given: Optional[str], defaults: Sequence[str], what: str, data: str) -> str:
    if given:
        if given not in columns:
            raise LeanvitError(f"{data} has no {what} column '{given}' (columns: {', '.join(columns)})")
        return given
    for c in defaults:
        if c in columns:
            return c
    raise LeanvitError(f"{data} has no {what} column ({' or '.join(defaults)}; columns: {', '.join(columns)}); "
                       f"name it with hf.{what}_column")


def read_labels(values: Sequence[Any], column: str, data: str,
                classes: Optional[Sequence[str]] = None) -> Tuple[List[int], Optional[List[str]]]:
    """``(targets, class names)`` of a label column: integers are class indices (names: None, from the
    column's ``ClassLabel`` or ``0..max``); text is class names, sorted as ImageFolder sorts its folders (or
    ``classes``' order, e.g. training's, when given). Anything else (None, a float, a mix of both kinds) is
    a one-line error naming the column, the row and the value: never truncated to an index."""
    values = list(values)
    kinds = set()
    for i, v in enumerate(values):
        if isinstance(v, str):
            kinds.add("text")
        elif isinstance(v, numbers.Integral) and not isinstance(v, bool):
            kinds.add("int")
        else:
            raise LeanvitError(f"{data}: label column '{column}' row {i} holds {v!r} ({type(v).__name__}): a label "
                               "is a class index (an integer) or a class name (text)")
        if len(kinds) > 1:
            raise LeanvitError(f"{data}: label column '{column}' mixes class indices and class names (row {i}: "
                               f"{v!r})")
    if "text" not in kinds:
        return [int(v) for v in values], None
    names = list(classes) if classes is not None else sorted(set(values))
    index = {n: j for j, n in enumerate(names)}
    for i, v in enumerate(values):
        if v not in index:
            raise LeanvitError(f"{data}: label column '{column}' row {i} holds the class name {v!r}, not one of "
                               f"the {len(names)} classes it is read with")
    return [index[v] for v in values], names


class HFDataset(SkippingImageDataset, torch.utils.data.Dataset):
    """One split of a Hugging Face dataset as (transformed image, label)."""

    def __init__(self, table, data: str, transform: Optional[Callable] = None, classes: Optional[Sequence[str]] = None,
                 skip_corrupt: bool = False, image_column: Optional[str] = None, label_column: Optional[str] = None):
        ds_lib = _datasets()
        cols = list(table.column_names)
        self.image_column = _pick(cols, image_column, ("image", "img"), "image", data)
        self.label_column = _pick(cols, label_column, ("label", "labels"), "label", data)
        feat = table.features[self.image_column]
        if isinstance(feat, ds_lib.Image):
            table = table.cast_column(self.image_column, ds_lib.Image(decode=False))
        self.table = table.select_columns([self.image_column, self.label_column])
        label_feat = table.features[self.label_column]
        names = list(label_feat.names) if isinstance(label_feat, ds_lib.ClassLabel) else None
        self.targets, text_names = read_labels(self.table[self.label_column], self.label_column, data, classes)
        if not self.targets:
            raise LeanvitError(f"{data}: the split is empty")
        names = names or text_names
        if classes is None:
            classes = names or [str(i) for i in range(max(self.targets) + 1)]
        elif names is not None and list(classes) != names and text_names is None:
            raise LeanvitError(f"the classes of {data} differ from training's")
        self.classes = list(classes)
        for i, t in enumerate(self.targets):
            if not 0 <= t < len(self.classes):
                raise LeanvitError(f"{data}: row {i} has label {t}, outside the {len(self.classes)} classes")
        self.data, self.transform, self.skip_corrupt = data, transform, bool(skip_corrupt)
        self.skipped = SharedSkips(len(self.targets))

    @property
    def source(self) -> str:
        return str(self.data)

    def load(self, index: int) -> "Image.Image":
        value = self.table[int(index)][self.image_column]
        try:
            if isinstance(value, Image.Image):
                img = value
            else:
                raw = value.get("bytes") if isinstance(value, dict) else value
                if raw is None and isinstance(value, dict) and value.get("path"):
                    raw = Path(value["path"]).read_bytes()
                if not isinstance(raw, (bytes, bytearray)):
                    raise ValueError(f"no image bytes ({type(value).__name__})")
                img = Image.open(io.BytesIO(raw))
            img.load()
            return to_rgb8(img)
        except (OSError, ValueError, SyntaxError) as e:
            raise LeanvitError(f"cannot read image in row {index} of {self.data}: {_no_buffer(e)}") from None

    image = load


    def __repr__(self) -> str:
        return f"HFDataset({self.data!r}, classes={len(self.classes)}, images={len(self)})"


class HFKind(DatasetKind):
    """``--data hfds/<name>`` or a ``save_to_disk`` folder (options ``hf:``: columns and split names)."""

    name = "hf"
    options_key = "hf"

    def matches(self, data: str) -> bool:
        return data.startswith(PREFIX) or _is_saved(Path(data))

    def check_options(self, options: Dict[str, Any]) -> None:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise LeanvitError(f"unknown hf option(s) {', '.join(unknown)} (known: {', '.join(OPTIONS)})")

    def split_name(self, data: str, split: str, options: Dict[str, Any]) -> str:
        if split == "train":
            return options.get("train_split") or "train"
        if options.get("val_split"):
            return options["val_split"]
        if not data.startswith(PREFIX):
            try:
                names = list(_datasets().load_from_disk(data).keys())
            except AttributeError:  # a single Dataset
                return split
            for s in ("validation", "val", "test"):
                if s in names:
                    return s
        return "validation"

    def create(self, data, split, transform=None, options=None, classes=None, skip_corrupt=False):
        options = dict(options or {})
        table = load_split(data, self.split_name(data, split, options))
        return HFDataset(table, data, transform, classes, skip_corrupt, options.get("image_column"),
                         options.get("label_column"))

    def classes(self, data, split="val", options=None):
        return list(self.create(data, split, options=options).classes)


register_dataset(HFKind())
