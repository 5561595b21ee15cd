"""ToMe's merged-group pictures: the library (groups, painting) and `leanvit viz` on a ToMe model."""
import pytest
import timm
import torch
from cli_helpers import leanvit as run_cli
from PIL import Image

import leanvit
from leanvit.viz.merges import merge_groups, paint_groups, render_merged_tokens, shown_blocks


def tiny_tome(r=6):
    model = timm.create_model("deit3_small_patch16_224", img_size=32, patch_size=4, embed_dim=48, depth=4,
                              num_heads=3, num_classes=5, init_values=0.3).eval()
    return leanvit.apply_reduction(model, "tome", r=r)


def test_groups_per_shown_block():
    model = tiny_tome(r=6)
    assert shown_blocks(4) == [0, 1, 2, 3] and shown_blocks(12) == [2, 5, 8, 11]
    _, groups = merge_groups(model, torch.randn(2, 3, 32, 32))
    assert len(groups) == 4 and groups[0].shape == (2, 8, 8)
    for g, n in zip(groups, (58, 52, 46, 40)):  # 64 patches, 6 fewer tokens per block
        assert all(len(row.unique()) == n for row in g)
    # a group only grows: patches merged together stay together in later blocks
    a, b = groups[0].reshape(2, -1), groups[-1].reshape(2, -1)
    same_early = a[:, :, None] == a[:, None, :]
    same_late = b[:, :, None] == b[:, None, :]
    assert bool((same_late | ~same_early).all())


def test_paint_groups_colours_merged_patches_only():
    img = torch.rand(1, 3, 8, 8)
    groups = torch.tensor([[[0, 0], [1, 2]]])  # patches (0,0) and (0,1) merged; two singletons
    out = paint_groups(img, groups, (4, 4))
    assert torch.equal(out[:, :, 5:, :], img[:, :, 5:, :])  # singletons unchanged (no border between them)
    assert out[:, :, 4, :].abs().sum() == 0  # the outline of the merged group above them
    top = out[0, :, 1:4, 1:8].reshape(3, -1)  # inside the merged group, away from the outline at row/col 0
    assert torch.allclose(top, top[:, :1].expand_as(top))   # one colour for the whole group
    assert not torch.allclose(out[:, :, :4], img[:, :, :4])


@pytest.mark.slow
def test_render_and_cli(tmp_path):
    model = tiny_tome(r=6)
    png = render_merged_tokens(model, [Image.new("RGB", (40, 40), (200, 30, 30))], tmp_path / "m.png")
    assert png.exists() and png.stat().st_size > 0
    img = tmp_path / "a.png"
    Image.fromarray((torch.rand(64, 64, 3) * 255).to(torch.uint8).numpy()).save(img)
    out = tmp_path / "viz"
    r = run_cli("viz", "--model", "test_vit", "--reduction", "tome:8", "--img-size", "64", "--images", str(img),
                "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "merged_tokens.png").exists() and (out / "000_a.png").exists()
