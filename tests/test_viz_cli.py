"""`leanvit viz` end to end on tiny settings, its Python API (masks, titles, one PNG grid), and its user errors."""

import pytest
import torch
from cli_helpers import cli, cli_error, leanvit, one_line_error
from PIL import Image

from leanvit.checkpoints import save_checkpoint
from leanvit.models.factory import create_model
from leanvit.reduction.evit import apply_evit
from leanvit.viz import kept_masks, mask_patches, render_kept_tokens, visualize


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("viz_inputs")
    g = torch.Generator().manual_seed(0)
    for name, size, mode in (("a.png", (64, 64), "RGB"), ("b.jpg", (90, 60), "RGB"), ("c.bmp", (40, 50), "L")):
        arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).convert(mode).save(d / name)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    # a training checkpoint recording an EViT model built from a plain ViT name with a keep rate
    spec = {"name": "test_vit", "kwargs": {"img_size": 64, "num_classes": 10, "keep_rate": 0.5}}
    save_checkpoint({"model": create_model("test_vit", **spec["kwargs"]).state_dict(), "model_spec": spec},
                    d / "evit.pth")
    return d


def png_size(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_viz_cli_image_files(files, tmp_path):
    """A 12-block ViT with EViT applied: per-image PNGs and the grid, columns after layers 4 / 7 / 10."""
    out = tmp_path / "viz"
    r = leanvit("viz", "--model", "vit_tiny_patch16_224", "--keep-rate", "0.7", "--img-size", "64", "--images",
                str(files / "a.png"), str(files / "b.jpg"), str(files / "c.bmp"), "--output", str(out))
    assert r.returncode == 0, r.stderr
    written = sorted(p.name for p in out.iterdir())
    assert written == ["000_a.png", "001_b.png", "002_c.png", "kept_tokens.png"]
    w1, h1 = png_size(out / "000_a.png")
    w3, h3 = png_size(out / "kept_tokens.png")
    assert w1 == w3 and h3 > 2 * h1  # one row per image, 4 panels wide
    assert "3 image rows" in r.stdout


def test_viz_cli_digits_and_recorded_checkpoint(files, tmp_path, capsys):
    out = tmp_path / "viz"
    rc, _, err = cli(capsys, "viz", "--checkpoint", files / "evit.pth", "--data", "digits", "--num-images", "2",
                     "--output", out, "--device", "cpu")
    assert rc == 0, err
    assert len(list(out.glob("*.png"))) == 3 and png_size(out / "kept_tokens.png")[0] > 400


def test_masks_titles_and_api(files, tmp_path):
    from leanvit.viz.tokens import kept_token_rows as _rows
    from leanvit.viz.tokens import viz_transform

    torch.manual_seed(0)
    model = apply_evit(create_model("vit_tiny_patch16_224", img_size=64, num_classes=10), keep_rate=0.5)
    x = torch.randn(3, 3, 64, 64)
    logits, masks = kept_masks(model, x)
    assert logits.shape == (3, 10) and [tuple(m.shape) for m in masks] == [(3, 4, 4)] * 3
    assert masks[0].flatten(1).sum(1).tolist() == [8, 8, 8]  # ceil(0.5 * 16)
    # then ceil(0.5 * 9) of the 8 + the fused token: 5 or 4 patches, as the fused token is kept or not
    assert all(4 <= c <= 5 for c in masks[1].flatten(1).sum(1).tolist())
    assert all(2 <= c <= 3 for c in masks[2].flatten(1).sum(1).tolist())  # ceil(0.5 * 6) = 3 tokens
    assert all((b <= a).all() for a, b in zip(masks, masks[1:]))  # a removed patch never comes back
    shown = torch.rand(3, 3, 64, 64) + 0.1
    black = mask_patches(shown, masks[0], (16, 16))
    assert torch.equal(black == 0, ~masks[0].repeat_interleave(16, 1).repeat_interleave(16, 2)[:, None].expand_as(
        shown))
    # a size that is not a multiple of the patch: the uncovered border is black too
    part = mask_patches(torch.ones(1, 3, 20, 20), torch.ones(1, 1, 1, dtype=torch.bool), (16, 16))
    assert part[0, :, :16, :16].eq(1).all() and part[0, :, 16:, :].eq(0).all() and part[0, :, :, 16:].eq(0).all()

    imgs = [Image.open(files / "a.png"), files / "b.jpg"]
    rows, titles = _rows(model, [Image.open(files / "a.png").convert("RGB")] * 2, ["x", "y"],
                         viz_transform((64, 64), model), None, [str(i) for i in range(10)], 16, None)
    assert titles == ["input", "after layer 4\nkeeps 8 of 16 tokens", "after layer 7\nkeeps 5 of 9 tokens",
                      "after layer 10\nkeeps 3 of 6 tokens"]
    assert len(rows) == 2 and len(rows[0]["images"]) == 4 and "pred" in rows[0]["label"]
    model.train()
    path = render_kept_tokens(model, imgs, tmp_path / "one" / "grid.png", keep_rate=0.7)
    assert path.exists() and png_size(path)[1] > 200
    assert model.training  # the caller's mode is restored
    paths = visualize(model, imgs, tmp_path / "many", names=["cat", "dog"], per_image=True)
    assert [p.name for p in paths] == ["000_cat.png", "001_dog.png", "kept_tokens.png"]


def test_viz_user_errors_subprocess(files, tmp_path):
    r = leanvit("viz", "--model", "evit_deit_tiny_patch16_224", "--images", str(tmp_path / "missing.jpg"),
                "--output", str(tmp_path / "o"))
    one_line_error(r.returncode, r.stderr, "image not found", "missing.jpg")


def test_viz_user_errors(files, tmp_path, capsys):
    out = tmp_path / "o"
    ok = ("--images", files / "a.png", "--output", out)
    one_line_error(*cli_error(capsys, "viz", "--model", "evit_deit_tiny_patch16_224", "--images", files / "broken.png",
                        "--output", out), "cannot read image", "broken.png")
    one_line_error(*cli_error(capsys, "viz", "--model", "evit_deit_tiny_patch16_224", "--images", files,
                        "--output", out), "folder")
    one_line_error(*cli_error(capsys, "viz", "--model", "evit_deit_tiny_patch16_22", *ok),
                   "unknown model", "evit_deit_tiny_patch16_224")
    one_line_error(*cli_error(capsys, "viz", "--model", "test_vit", *ok), "does not reduce tokens", "--keep-rate")
    one_line_error(*cli_error(capsys, "viz", "--model", "test_vit", "--keep-rate", "1.01", *ok), "(0, 1]")
    one_line_error(*cli_error(capsys, "viz", "--model", "test_vit", "--keep-rate", "0", *ok), "(0, 1]")
    one_line_error(*cli_error(capsys, "viz", "--checkpoint", files / "evit.pth", "--img-size", "-3", *ok), "--img-size")
    one_line_error(*cli_error(capsys, "viz", "--checkpoint", files / "evit.pth", "--batch-size", "0", *ok),
                   "--batch-size")
    one_line_error(*cli_error(capsys, "viz", "--model", "evit_deit_tiny_patch16_224", "--checkpoint",
                        files / "evit.pth", *ok), "does not fit")
    (tmp_path / "file").write_text("x")
    one_line_error(*cli_error(capsys, "viz", "--checkpoint", files / "evit.pth", "--images", files / "a.png",
                        "--output", tmp_path / "file"), "not a folder")
    one_line_error(*cli_error(capsys, "viz", "--checkpoint", files / "evit.pth", "--data", tmp_path / "nothing",
                        "--output", out), "no such folder")
