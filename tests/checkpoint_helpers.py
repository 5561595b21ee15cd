"""Checkpoints as `leanvit train` writes them, built without training (random weights): fast fixtures."""
import torch

from leanvit.checkpoints import save_checkpoint
from leanvit.models.factory import create_model
from leanvit.tasks import get_task

VIT = {"patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2, "init_values": 0.1}
SCENES = {"canvas_size": 32, "min_digit": 10, "max_digit": 16, "max_objects": 2, "val_fraction": 0.01}
SEG_CLASSES = ["background"] + [str(i) for i in range(10)]


def classifier_checkpoint(path, reduction=None, num_classes=10, **extra):
    """A `test_vit` classifier at 32 px recording its model (and ``reduction``, as a reduced fine-tune does)."""
    torch.manual_seed(0)
    spec = {"name": "test_vit", "kwargs": {"img_size": 32, "num_classes": num_classes}}
    if reduction is not None:
        spec["reduction"] = reduction
    m = create_model("test_vit", img_size=32, num_classes=num_classes, reduction=reduction)
    save_checkpoint({"model": m.state_dict(), "model_spec": spec, **extra}, path)
    return path


def segmenter_checkpoint(path, reduction=None):
    """A semantic-FPN segmenter on a tiny DeiT III for `digits-seg` at 32 px (with ``reduction`` in its backbone)."""
    torch.manual_seed(0)
    t = get_task("segmentation")
    cfg = {"task": "segmentation", "model": "deit3_small_patch16_224", "model_kwargs": VIT, "img_size": 32,
           "min_size": 32, "max_size": 32, "data": "digits-seg", "digits_dense": SCENES, "segmenter": "semantic_fpn",
           "head_kwargs": {"fpn_channels": 8, "channels": 8}}
    model, spec, _ = t.build_model(cfg, len(SEG_CLASSES), reduction=reduction)
    save_checkpoint({"model": model.state_dict(), "model_spec": spec, "task": t.name, "config": cfg,
                     "classes": SEG_CLASSES}, path)
    return path
