"""`leanvit eval` end to end on tiny settings (timm's 6-block `test_vit` at 48-64 px), and its user errors."""
import json

import pytest
import torch
from cli_helpers import cli, leanvit, one_line_error
from PIL import Image

from leanvit.checkpoints import save_checkpoint
from leanvit.models.factory import create_model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A leanvit-style checkpoint recording its model (64 px, 10 classes), and a plain 48 px, 3-class
    state dict in .safetensors, as a released checkpoint would be."""
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    spec = {"name": "test_vit", "kwargs": {"img_size": 64, "num_classes": 10}}
    m = create_model("test_vit", **spec["kwargs"])
    save_checkpoint({"model": m.state_dict(), "model_spec": spec, "epoch": 3}, d / "recorded.pth")
    plain = create_model("test_vit", img_size=48, num_classes=3)
    save_checkpoint(plain.state_dict(), d / "plain.safetensors")
    (d / "garbage.pth").write_text("not a checkpoint")
    return d


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An ImageFolder tree with 3 classes of 2 images each, in several formats and sizes."""
    root = tmp_path_factory.mktemp("imgs")
    g = torch.Generator().manual_seed(0)
    for c, (suffix, size, mode) in enumerate([(".png", (40, 30), "RGB"), (".jpg", (64, 80), "RGB"),
                                              (".bmp", (50, 50), "L")]):
        cls = root / "val" / f"class{c}"
        cls.mkdir(parents=True)
        for i in range(2):
            arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).convert(mode).save(cls / f"img{i}{suffix}")
    return root


def test_eval_recorded_checkpoint_json(ckpts, tmp_path, capsys):
    """No --model: the checkpoint names it; the figures are those of the stored weights."""
    out = tmp_path / "res" / "eval.json"
    rc, stdout, err = cli(capsys, "eval", "--checkpoint", ckpts / "recorded.pth", "--data", "digits",
                          "--batch-size", "16", "--max-batches", "2", "--no-progress", "--output", out)
    assert rc == 0, err
    assert "top-1" in stdout and "top-5" in stdout and "loss" in stdout and "img/s" in stdout
    res = json.loads(out.read_text())
    assert res["model"] == "test_vit" and res["img_size"] == "64x64" and res["images"] == 32
    assert res["keep_rate"] is None and res["batch_size"] == 16 and res["device"] == "cpu"
    assert 0 <= res["top1"] <= res["top5"] <= 100 and res["img_per_s"] > 0

    # the same numbers in Python, from the stored weights
    from torch.utils.data import DataLoader, Subset

    from leanvit.data import build_eval_dataset
    from leanvit.models.build import build_model
    from leanvit.tasks.classification_eval import evaluate

    model = build_model(None, ckpts / "recorded.pth").model
    ds = Subset(build_eval_dataset("digits", model, (64, 64)), range(32))
    ref = evaluate(model, DataLoader(ds, batch_size=16), progress=False)
    assert res["top1"] == pytest.approx(ref["top1"]) and res["top5"] == pytest.approx(ref["top5"])
    assert res["loss"] == pytest.approx(ref["loss"], rel=1e-4)


def test_eval_released_state_dict_image_folder(ckpts, folder, tmp_path, capsys):
    """A plain .safetensors state dict: classes and input size (48 px) come from the checkpoint itself;
    --keep-rate applies EViT to the plain ViT; any image format PIL reads."""
    out = tmp_path / "eval.json"
    rc, stdout, err = cli(capsys, "eval", "--model", "test_vit", "--checkpoint", ckpts / "plain.safetensors",
                          "--data", folder, "--keep-rate", "0.5", "--batch-size", "4", "--no-progress", "--output", out)
    assert rc == 0, err
    res = json.loads(out.read_text())
    assert res["img_size"] == "48x48" and res["keep_rate"] == 0.5 and res["images"] == 6
    assert res["top5"] == 100.0  # top-k is capped at the 3 classes
    assert "keep_rate=0.5" in stdout


def test_eval_user_errors_subprocess(ckpts):
    """A checkpoint that does not fit the model: one line, exit 2, no traceback, as a real process."""
    r = leanvit("eval", "--model", "deit_tiny_patch16_224", "--checkpoint", str(ckpts / "recorded.pth"),
                "--data", "digits", "--img-size", "64")
    one_line_error(r.returncode, r.stderr, "does not fit")


def test_eval_user_errors(ckpts, folder, tmp_path, capsys):
    rec = ckpts / "recorded.pth"
    one_line_error(*cli(capsys, "eval", "--model", "test_vt", "--data", "digits")[::2],
                   "unknown model 'test_vt'", "test_vit")
    for rate in ("0", "1.5", "-0.2"):
        one_line_error(*cli(capsys, "eval", "--checkpoint", rec, "--data", "digits", "--keep-rate", rate)[::2],
                       "--keep-rate", "(0, 1]")
    one_line_error(*cli(capsys, "eval", "--checkpoint", rec, "--data", "digits", "--img-size", "0")[::2],
                   "--img-size")
    one_line_error(*cli(capsys, "eval", "--model", "test_vit", "--data", "digits", "--img-size", "8")[::2],
                   "smaller than the model's 16x16 px patches")
    one_line_error(*cli(capsys, "eval", "--checkpoint", rec, "--data", "digits", "--batch-size", "0")[::2],
                   "--batch-size")
    one_line_error(*cli(capsys, "eval", "--checkpoint", tmp_path / "nope.pth", "--data", "digits")[::2],
                   "nope.pth")
    one_line_error(*cli(capsys, "eval", "--model", "test_vit", "--checkpoint", ckpts / "garbage.pth",
                        "--data", "digits")[::2], "cannot read checkpoint")
    # a released state dict without a recorded model needs --model
    one_line_error(*cli(capsys, "eval", "--checkpoint", ckpts / "plain.safetensors", "--data", "digits")[::2],
                   "--model")
    # 3-class weights on 10-class data
    one_line_error(*cli(capsys, "eval", "--model", "test_vit", "--checkpoint", ckpts / "plain.safetensors",
                        "--data", "digits")[::2], "3 classes", "10")
    # a checkpoint that does not fit: the wrong number of classes forced with --num-classes
    one_line_error(*cli(capsys, "eval", "--checkpoint", rec, "--data", folder, "--num-classes", "3")[::2],
                   "does not fit", "head")
    one_line_error(*cli(capsys, "eval", "--checkpoint", rec, "--data", tmp_path / "no_such_dir")[::2])
    one_line_error(*cli(capsys, "eval", "--model", "resnet18", "--keep-rate", "0.7", "--data", "digits")[::2])
