"""ToMe through the training engine: the recipe key ``reduction: {method: tome, r: ...}``, its schedule,
and the checkpoint rebuilding the merged model."""
import pytest
import torch

from leanvit.reduction.tome import is_tome
from leanvit.train import load_recipe, resolve_config, train

TINY = dict(model="deit3_small_patch16_224",
            model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
            img_size=32, data="digits", digits={"val_fraction": 0.05}, crop="none", hflip=0.0, batch_size=16,
            max_train_batches=3, epochs=3, warmup_epochs=0, lr=1e-3, opt="adamw", loss="ce", mixup=0.0,
            cutmix=0.0, workers=0, eval_every=3)


def test_shipped_tome_recipes():
    ft = load_recipe("tome_deit_s_finetune")
    assert ft["reduction"] == {"method": "tome", "r": 13} and ft["model"] == "deit_small_patch16_224"
    demo = resolve_config("tome_demo", {"finetune": None})
    assert demo["reduction"]["method"] == "tome" and demo["reduction"]["r"] == 4
    assert demo["model"] == "deit3_small_patch16_224"  # the deit3_demo model, fine-tuned with merging


@pytest.mark.slow
def test_tiny_training_run_with_tome(tmp_path):
    res = train({**TINY, "output": str(tmp_path / "tome"),
                 "reduction": {"method": "tome", "r": 4, "start_epoch": 1, "epochs": 1}},
                progress=False, device="cpu")
    strengths = [row["strength"] for row in res["history"]]  # the knob's value at the end of each epoch
    assert strengths[0] == 0 and strengths[-1] == 4 and all(isinstance(s, int) for s in strengths)
    assert res["model_spec"]["reduction"] == {"method": "tome", "r": 4}
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in res["history"])
    from leanvit.models.build import build_model
    model = build_model(checkpoint=res["last"]).model
    assert is_tome(model) and model.r == 4
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
