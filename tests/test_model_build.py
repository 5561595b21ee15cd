"""Building a ready model from a name and/or a checkpoint, and how logs and reports name it."""
import torch

import leanvit
from leanvit.checkpoints import save_checkpoint
from leanvit.models.build import build_model, describe_model

DEMO = dict(patch_size=8, embed_dim=96, depth=4, num_heads=3, init_values=0.1)


def test_a_model_is_named_as_built(tmp_path):
    torch.manual_seed(0)
    kwargs = dict(DEMO, img_size=48, num_classes=10)
    model = leanvit.create_model("deit3_small_patch16_224", **kwargs)
    # the demo's small model must not read as DeiT III-S (22M parameters)
    assert describe_model("deit3_small_patch16_224", model, kwargs) == \
        "deit3 (embed 96, depth 4, heads 3, patch 8; 0.47M params)"
    # options that keep the architecture (classes, input size) keep the registered name
    small = leanvit.create_model("test_vit", num_classes=3)
    assert describe_model("test_vit", small, {"num_classes": 3, "img_size": 32}).startswith("test_vit (0.")
    assert describe_model("test_vit") == "test_vit"
    path = tmp_path / "demo.pth"
    save_checkpoint({"model": model.state_dict(),
                     "model_spec": {"name": "deit3_small_patch16_224", "kwargs": kwargs, "reduction": None}}, path)
    built = build_model(checkpoint=path)
    assert built.name == "deit3_small_patch16_224" and built.img_size == (48, 48)
    assert built.description == "deit3 (embed 96, depth 4, heads 3, patch 8; 0.47M params)"
