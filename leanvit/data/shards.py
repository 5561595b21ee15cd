"""WebDataset tar shards (``KEY.jpg`` + ``KEY.cls``, as ``timm/imagenet-1k-wds`` stores ImageNet) as a
map-style dataset: the shards are indexed once (tar headers and the small ``.cls`` members), and each
sample is then read at its offset.

Why an index rather than a stream: a stream (webdataset's ``WebDataset`` pipeline, timm's ``wds/``
reader) splits *shards* between processes and workers, so processes get unequal sample counts (timm
evens them out by repeating or dropping samples), and its shuffle buffer cannot be restored after a
stop. An indexed shard set plugs into the same samplers as an ImageFolder: each sample is seen exactly
once per epoch across all processes, and a run stopped mid-epoch resumes at the exact next sample.
Reads stay mostly sequential: :class:`ShardOrderSampler` shuffles the shard order every epoch and the
samples only within groups of a few shards, and gives each process a contiguous run of them.

``--data`` is a folder of ``*.tar`` files (``*train*.tar`` / ``*validation*.tar`` or ``*val*.tar``), a
brace pattern (``shards/train-{000000..001023}.tar``) or a glob; ``val_data`` names the validation shards.
Class names: ``classes.txt`` beside the shards (line i = the name of class i) or ``shards.class_map``;
without one, the classes are the labels ``0..max``.
"""
from __future__ import annotations

import glob
import io
import logging
import os
import re
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from leanvit.data.folder import SharedSkips, SkippingImageDataset, to_rgb8
from leanvit.data.folder import no_buffer_repr as _no_buffer
from leanvit.data.registry import DatasetKind, register_dataset
from leanvit.errors import LeanvitError

__all__ = ["ShardDataset", "ShardOrderSampler", "ShardsKind", "expand_shards", "index_shard", "split_key",
           "no_validation"]

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
OPTIONS = ("class_map", "group", "val_data", "train_data")


def expand_shards(pattern: str) -> List[str]:
    """The tar files a brace pattern (``a-{000..012}.tar``, ``{a,b}.tar``) or glob names, sorted; an error
    naming the pattern when no file matches."""
    try:
        from braceexpand import braceexpand
    except ImportError:
        raise LeanvitError("shard patterns need the braceexpand package: pip install leanvit[wds]") from None

    if os.path.isfile(str(pattern)):  # an existing file is that file, whatever its name holds ([, *, ?, {)
        return [str(pattern)]
    files: List[str] = []
    for p in braceexpand(str(pattern)):
        if os.path.isfile(p):
            files.append(p)
        elif any(c in p for c in "*?["):
            files += sorted(glob.glob(p))
    missing = [p for p in braceexpand(str(pattern)) if not any(c in p for c in "*?[") and not os.path.isfile(p)]
    if missing:
        raise LeanvitError(f"shard pattern {pattern}: no such file {missing[0]}"
                           f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
    if not files:
        raise LeanvitError(f"shard pattern {pattern} matches no file")
    return sorted(dict.fromkeys(files))


def split_key(name: str) -> Tuple[str, str]:
    """WebDataset's sample key and field of a member name: ``dir/n01440764_10026.JPEG`` -> (dir/n01440764_10026,
    jpeg); the extension starts at the first dot of the file name."""
    d, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def index_shard(path: str) -> List[Tuple[str, int, int, int]]:
    """``[(key, offset, size, label)]`` of one shard, in file order: the image member's data offset and
    size, and the ``.cls`` label. A sample without an image or a label is an error naming the shard and key.

    Nothing is dropped silently: a key that comes again after its sample is complete (a second image or
    label) is a sample of its own, kept as ``KEY#2`` (``#3``, ...), and a shard that ends without tar's
    end-of-archive blocks (cut at a member boundary: it reads without error) is read as far as it goes; both
    are counted in a warning naming the shard."""
    samples: Dict[str, list] = {}
    seen: Dict[str, int] = {}  # how many samples each key has named
    duplicates: List[str] = []
    end = 0
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                end = max(end, m.offset_data + -(-m.size // 512) * 512)
                if not m.isfile():
                    continue
                key, ext = split_key(m.name)
                if key.startswith("_") or "/_" in key:  # _info.json and the like
                    continue
                slot = 0 if ext in IMAGE_EXTS else 1 if ext == "cls" else None
                n = seen.setdefault(key, 1)
                name = key if n == 1 else f"{key}#{n}"
                if slot is not None and samples.get(name, [None, None])[slot] is not None:
                    seen[key] = n = n + 1  # this member starts another sample with the same key
                    name = f"{key}#{n}"
                    duplicates.append(key)
                key = name
                entry = samples.setdefault(key, [None, None])
                if ext in IMAGE_EXTS:
                    entry[0] = (m.offset_data, m.size)
                elif ext == "cls":
                    text = tar.extractfile(m).read().decode("utf-8", "replace").strip()
                    try:
                        entry[1] = int(text)
                    except ValueError:
                        raise LeanvitError(f"{path}: sample {key} has label {text!r}, not an integer class "
                                           "index") from None
    except tarfile.TarError as e:
        raise LeanvitError(f"cannot read shard {path}: {e}") from None
    except OSError as e:
        raise LeanvitError(f"cannot read shard {path}: {e}") from None
    out = []
    for key, (img, label) in samples.items():
        if label is None:
            raise LeanvitError(f"{path}: sample {key} has no label (.cls)")
        if img is None:
            raise LeanvitError(f"{path}: sample {key} has no image ({', '.join('.' + e for e in IMAGE_EXTS)})")
        out.append((key, img[0], img[1], label))
    if not out:
        raise LeanvitError(f"shard {path} holds no samples (KEY.jpg + KEY.cls)")
    if duplicates:
        log.warning(f"warning: {path}: {len(duplicates)} sample(s) reuse the key of an earlier one (e.g. "
                    f"{duplicates[0]}): kept as samples of their own ({duplicates[0]}#2, ...)")
    if os.path.getsize(path) < end + 1024:  # tar ends with two zero blocks; a copy cut short has none
        log.warning(f"warning: {path} ends without tar's end-of-archive blocks: it may be truncated; read "
                    f"{len(out)} sample(s) up to where it stops")
    return out


class _ShardIndex(NamedTuple):
    """One shard's samples, compact: keys, and int64 arrays of image offsets, image sizes and labels."""
    keys: List[str]
    offsets: np.ndarray
    sizes: np.ndarray
    labels: np.ndarray


_INDEX_CACHE: Dict[tuple, _ShardIndex] = {}


def _index_all(files: Sequence[str]) -> List[_ShardIndex]:
    """Every shard's index (threads: the work is reading headers), cached per process by path, size, mtime."""
    def one(f):
        st = os.stat(f)
        k = (os.path.abspath(f), st.st_size, st.st_mtime_ns)
        if k not in _INDEX_CACHE:
            rows = index_shard(f)
            _INDEX_CACHE[k] = _ShardIndex([r[0] for r in rows], *(np.array([r[j] for r in rows], dtype=np.int64)
                                                                   for j in (1, 2, 3)))
        return _INDEX_CACHE[k]
    if not files:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(files))) as pool:
        return list(pool.map(one, files))


def _read_class_map(path) -> List[str]:
    p = Path(path)
    if not p.is_file():
        raise LeanvitError(f"class map not found: {p}")
    names = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    if not names:
        raise LeanvitError(f"class map {p} is empty (one class name per line)")
    return names


class ShardDataset(SkippingImageDataset, torch.utils.data.Dataset):
    """The samples of tar shards as (transformed image, label); ``keys[i]`` is sample i's ``shard:key``.

    Args:
        files: the shard files.
        transform: applied to the RGB PIL image.
        classes: the class names (label i -> classes[i]); a label outside them is an error naming the
            shard and key. None: ``0..max label``.
        skip_corrupt: replace an unreadable image by the next readable sample (counted in ``num_skipped``)
            instead of raising.
    """

    def __init__(self, files: Sequence[str], transform: Optional[Callable] = None,
                 classes: Optional[Sequence[str]] = None, skip_corrupt: bool = False, group: int = 4):
        self.files = list(files)
        index = _index_all(self.files)
        # numpy arrays, not lists of Python ints: forked loader workers share them without copying
        none = [np.zeros(0, dtype=np.int64)]  # no shards: an empty set (`val_data: none`)
        self.shard_of = np.concatenate([np.full(len(ix.keys), s, dtype=np.int64) for s, ix in enumerate(index)]
                                       + none)
        self.offsets = np.concatenate([ix.offsets for ix in index] + none)
        self.sizes = np.concatenate([ix.sizes for ix in index] + none)
        self.targets = np.concatenate([ix.labels for ix in index] + none)
        self.keys = [f"{Path(f).name}:{k}" for f, ix in zip(self.files, index) for k in ix.keys]
        if classes is None:
            classes = [str(i) for i in range(int(self.targets.max()) + 1 if len(self.targets) else 0)]
        self.classes = list(classes)
        bad = np.flatnonzero((self.targets < 0) | (self.targets >= len(self.classes)))
        if len(bad):
            i = int(bad[0])
            raise LeanvitError(f"{self.files[self.shard_of[i]]}: sample {self.keys[i].split(':', 1)[1]} has "
                               f"label {int(self.targets[i])}, outside the {len(self.classes)} classes of the "
                               "class map")
        self.transform, self.skip_corrupt, self.group = transform, bool(skip_corrupt), int(group)
        self.skipped = SharedSkips(len(self.targets))
        self._files: Dict[int, object] = {}
        self._pid = None
        self._lock = threading.Lock()

    @property
    def source(self) -> str:
        return f"{self.files[0]} ..."

    def __getstate__(self):  # open files stay in the process that opened them
        state = dict(self.__dict__)
        state["_files"], state["_pid"], state["_lock"] = {}, None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def read_bytes(self, index: int) -> bytes:
        """Sample ``index``'s encoded image (one seek and read in its shard; files kept open per process)."""
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        s = int(self.shard_of[index])
        with self._lock:
            f = self._files.get(s)
            if f is None:
                if len(self._files) >= 8:
                    self._files.pop(next(iter(self._files))).close()
                f = self._files[s] = open(self.files[s], "rb")
            f.seek(int(self.offsets[index]))
            return f.read(int(self.sizes[index]))

    def load(self, index: int) -> "Image.Image":
        """The untransformed RGB image ``index`` (an error naming the shard and key when unreadable)."""
        data = self.read_bytes(index)
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                return to_rgb8(img)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise LeanvitError(f"cannot read image {self.keys[index]}: {_no_buffer(e)}") from None

    image = load


    def train_sampler(self, world_size: int, rank: int, seed: int) -> "ShardOrderSampler":
        """The training order the engine uses for this dataset (see :class:`ShardOrderSampler`)."""
        return ShardOrderSampler(self.shard_of, world_size, rank, seed, self.group)

    def __repr__(self) -> str:
        return f"ShardDataset({len(self.files)} shards, classes={len(self.classes)}, samples={len(self)})"


class ShardOrderSampler(torch.utils.data.Sampler):
    """An epoch's order over a shard set that keeps reads near-sequential: the shards in a random order
    (seed, epoch), the samples shuffled within consecutive groups of ``group`` shards, and process ``rank``
    given the ``rank``-th contiguous slice of ``n // world_size`` positions (the last ``n % world_size``
    samples of the order, different each epoch, wait for another epoch as with torch's DistributedSampler
    with ``drop_last``). Every sample is in exactly one process's slice."""

    def __init__(self, shard_of: Sequence[int], world_size: int = 1, rank: int = 0, seed: int = 0, group: int = 4):
        self.shard_of = np.asarray(shard_of, dtype=np.int64)
        self.world_size, self.rank, self.seed, self.group = int(world_size), int(rank), int(seed), max(1, int(group))
        self.epoch = 0
        self.per_rank = len(self.shard_of) // self.world_size
        # each shard's sample indices, once (an epoch's order then costs O(samples))
        n_shards = int(self.shard_of.max()) + 1 if len(self.shard_of) else 0
        by = np.argsort(self.shard_of, kind="stable")
        self.by_shard = np.split(by, np.cumsum(np.bincount(self.shard_of, minlength=n_shards))[:-1])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self) -> np.ndarray:
        """The whole epoch's order (every process computes the same)."""
        rng = np.random.default_rng([self.seed, self.epoch, 7_777])
        by_shard = self.by_shard
        n_shards = len(by_shard)
        shards = rng.permutation(n_shards)
        parts = []
        for g in range(0, n_shards, self.group):
            idx = np.concatenate([by_shard[s] for s in shards[g:g + self.group]])
            parts.append(idx[rng.permutation(len(idx))])
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def __iter__(self):
        lo = self.rank * self.per_rank
        return iter(self.order()[lo:lo + self.per_rank].tolist())

    def __len__(self) -> int:
        return self.per_rank


def _folder_tars(root: Path) -> List[str]:
    """The ``.tar`` files in ``root`` and its direct subfolders (e.g. ``train/``, ``validation/``)."""
    return sorted(str(p) for p in [*root.glob("*.tar"), *root.glob("*/*.tar")])


#: the whole words in a shard's name (or its subfolder's) that make it a training or a validation shard
SPLIT_WORDS = {"train": ("train", "training"), "val": ("val", "validation")}


def _split_words(tar: str, root: Path) -> set:
    """The words of a shard's path below ``root`` (``validation/shard-000.tar`` -> {validation, shard, tar};
    ``retrieval-train-000.tar`` -> {retrieval, train, tar}: "val" inside "retrieval" is no word)."""
    return {w for part in Path(tar).relative_to(root).parts for w in re.findall(r"[a-z]+", part.lower())}


def _folder_shards(root: Path, split: str) -> List[str]:
    tars = _folder_tars(root)
    words = SPLIT_WORDS["train" if split == "train" else "val"]
    found = [t for t in tars if _split_words(t, root) & set(words)]
    if not found:
        want = " or ".join(f"'{w}'" for w in words)
        hint = "; or name the validation shards with `val_data`" if split != "train" else ""
        raise LeanvitError(f"{root} holds no {split} shards (a shard or subfolder named with the word {want}, e.g. "
                           f"{words[0]}-000.tar){hint}")
    return found


def no_validation(val_data) -> bool:
    """Whether ``val_data`` says: no validation (``none``, ``off``, ``-``)."""
    return isinstance(val_data, str) and val_data.strip().lower() in ("none", "off", "-")


def _is_pattern(data: str) -> bool:
    if os.path.isdir(data):  # an existing folder is a folder, whatever its name holds ([, *, ?)
        return False
    return data.endswith(".tar") or ("{" in data and ".tar" in data) or any(c in data for c in "*?[")


class ShardsKind(DatasetKind):
    """``--data``: a folder of tar shards, a brace pattern or a glob of ``.tar`` files (options ``shards:``:
    ``class_map``, ``group``; recipe key ``val_data`` for the validation shards)."""

    name = "shards"
    options_key = "shards"   # class_map, group
    settings = {"val_data": None}  # validation shards when `data` names training shards (a brace pattern or glob)

    def matches(self, data: str) -> bool:
        if _is_pattern(data):
            return True
        p = Path(data)  # a folder with shards (an ImageFolder tree has no .tar files)
        return p.is_dir() and bool(_folder_tars(p))

    def check_options(self, options) -> None:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise LeanvitError(f"unknown shards option(s) {', '.join(unknown)} (known: {', '.join(OPTIONS)})")

    def options_from_config(self, config) -> dict:
        opts = dict(config.get(self.options_key) or {})
        if config.get("val_data"):
            opts.setdefault("val_data", config["val_data"])
        if config.get("data"):
            opts["train_data"] = config["data"]  # val_data belongs to this data only
        return opts

    def files(self, data: str, split: str, options=None) -> List[str]:
        options = options or {}
        training_data = options.get("train_data", data) == data
        if split != "train" and options.get("val_data") and training_data:
            if no_validation(options["val_data"]):  # the run validates on nothing, as it recorded
                return []
            return expand_shards(options["val_data"])
        if _is_pattern(data):
            if split != "train" and options.get("train_data") == data:  # a run's validation of its training pattern
                raise LeanvitError(f"`data` {data} names training shards but no validation shards: name them with "
                                   "`val_data` (e.g. 'shards/val-{000..003}.tar'), or set `val_data` none to train "
                                   "without validation; the training shards are never used for validation")
            return expand_shards(data)
        return _folder_shards(Path(data), split)

    def _class_map(self, data: str, files: Sequence[str], options) -> Optional[List[str]]:
        if (options or {}).get("class_map"):
            return _read_class_map(options["class_map"])
        for d in dict.fromkeys([Path(files[0]).parent, Path(data) if Path(data).is_dir() else None]):
            if d is not None and (d / "classes.txt").is_file():
                return _read_class_map(d / "classes.txt")
        return None

    def create(self, data, split, transform=None, options=None, classes=None, skip_corrupt=False):
        files = self.files(data, split, options)
        names = self._class_map(data, files, options) if files else None
        if classes is not None and names is not None and list(classes) != names:
            raise LeanvitError(f"the class map of {files[0]} differs from training's")
        ds = ShardDataset(files, transform, classes if classes is not None else names, skip_corrupt,
                          int((options or {}).get("group", 4)))
        return ds

    def classes(self, data, split="val", options=None):
        files = self.files(data, split, options)
        names = self._class_map(data, files, options)
        if names is not None:
            return names
        top = max(int(ix.labels.max()) for ix in _index_all(files))
        return [str(i) for i in range(top + 1)]


register_dataset(ShardsKind())
