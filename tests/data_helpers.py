"""Test data in the layouts users train from: an ImageFolder tree of easy generated images, the same images as
WebDataset tar shards (written with webdataset's own TarWriter) and as a saved Hugging Face DatasetDict."""
import io
from pathlib import Path

import numpy as np
from PIL import Image

COLORS = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 210, 40)]


def color_tree(root, per_class=(48, 16), size=32, seed=0):
    """ImageFolder ``train/`` and ``val/`` of noisy images whose class is their dominant colour (a ViT learns
    it in a few dozen steps), with a random bright square for the crop to move around."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        for c, col in enumerate(COLORS):
            d = Path(root) / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = np.clip(np.array(col) + rng.normal(0, 40, (size, size, 3)), 0, 255)
                y, x = rng.integers(0, size - 8, 2)
                a[y:y + 8, x:x + 8] = 255
                Image.fromarray(a.astype(np.uint8)).save(d / f"{i:03d}.png")
    return Path(root)


def _samples(tree, split):
    root = Path(tree) / split
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    for c, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            yield f"{name}_{f.stem}", f.read_bytes(), c


def write_shards(tree, out, shards=(4, 2), names=("train", "validation"), ext="png"):
    """``out/{prefix}-{split}-{i:02d}.tar`` from an ImageFolder ``tree`` (samples spread over the shards in turn)
    and ``out/classes.txt``; returns ``out``."""
    import webdataset as wds

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for split, name, n in zip(("train", "val"), names, shards):
        writers = [wds.TarWriter(str(out / f"data-{name}-{i:02d}.tar")) for i in range(n)]
        for j, (key, data, label) in enumerate(_samples(tree, split)):
            writers[j % n].write({"__key__": key, ext: data, "cls": label})
        for w in writers:
            w.close()
    classes = sorted(p.name for p in (Path(tree) / "train").iterdir() if p.is_dir())
    (out / "classes.txt").write_text("\n".join(classes) + "\n")
    return out


def write_hf(tree, out, image_column="image", label_column="label"):
    """The tree as a ``datasets.DatasetDict`` (train, validation) saved to ``out``."""
    import datasets

    feats = None
    parts = {}
    for split, name in (("train", "train"), ("val", "validation")):
        rows = list(_samples(tree, split))
        classes = sorted(p.name for p in (Path(tree) / "train").iterdir() if p.is_dir())
        feats = datasets.Features({image_column: datasets.Image(), label_column: datasets.ClassLabel(names=classes)})
        parts[name] = datasets.Dataset.from_dict(
            {image_column: [{"bytes": b, "path": None} for _, b, _ in rows], label_column: [c for *_, c in rows]},
            features=feats)
    datasets.DatasetDict(parts).save_to_disk(str(out))
    return Path(out)


def png_bytes(size=8):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()
