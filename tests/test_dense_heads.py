"""Segmentation heads: the linear decoder, and the Semantic FPN / UperNet heads against plain re-implementations
of their published computation (the heads' own forwards fuse and reorder work; outputs must not change)."""
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

import leanvit  # noqa: F401
from leanvit.dense import create_backbone, create_segmenter
from leanvit.dense.fused_fpn import compose_convs, nearest2x_phase_kernels
from leanvit.errors import LeanvitError

VIT = dict(depth=2, embed_dim=64, num_heads=2, img_size=64)


def _reference_semantic_fpn(head, feats):
    """Panoptic FPN's semantic branch step by step, NCHW: every branch upsampled to the finest stride on
    its own, then summed (what SemanticFPNHead computes, without its reordering)."""
    levels = list(head.fpn(OrderedDict((str(i), f.contiguous()) for i, f in enumerate(feats))).values())
    out = None
    for branch, f in zip(head.branches, levels):
        y = f
        for layer in branch:
            y = layer(y.contiguous())
        if out is not None and y.shape[-2:] != out.shape[-2:]:
            y = F.interpolate(y, size=out.shape[-2:], mode="bilinear", align_corners=False)
        out = y if out is None else out + y
    return head.classifier(head.dropout(out))


def _reference_upernet(head, feats):
    def up(x, ref):
        return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)
    feats = [f.contiguous() for f in feats]
    top = feats[-1]
    psp = head.bottleneck(torch.cat([top] + [up(p(top), top) for p in head.ppm], dim=1))
    lat = [conv(f) for conv, f in zip(head.lateral, feats[:-1])] + [psp]
    for i in range(len(lat) - 1, 0, -1):
        lat[i - 1] = lat[i - 1] + up(lat[i], lat[i - 1])
    outs = [conv(x) for conv, x in zip(head.fpn_convs, lat[:-1])] + [lat[-1]]
    outs = [outs[0]] + [up(o, outs[0]) for o in outs[1:]]
    return head.classifier(head.dropout(head.fuse(torch.cat(outs, dim=1))))


@pytest.mark.parametrize("size", [(64, 96), (72, 88), (80, 80)])  # 72x88: odd coarse maps (5x6 -> 9x11 at stride 8)
@pytest.mark.parametrize("norm", ["gn", "bn"])
def test_semantic_fpn_equals_its_step_by_step_computation(size, norm):
    torch.manual_seed(0)
    seg = create_segmenter("semantic_fpn", "vit_tiny_patch16_224", 7, fpn_channels=32, channels=32, norm=norm, **VIT)
    for m in seg.modules():  # non-trivial norm statistics and affine parameters
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
            torch.nn.init.normal_(m.weight, 1.0, 0.3)
            torch.nn.init.normal_(m.bias, 0.0, 0.3)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0.0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    seg.eval()
    with torch.no_grad():
        feats = seg.backbone(torch.rand(2, 3, *size))
        got, want = seg.head(feats), _reference_semantic_fpn(seg.head, feats)
    assert got.shape == want.shape == (2, 7, feats[0].shape[-2], feats[0].shape[-1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - want).abs().max() < 1e-3 * want.abs().max()


def test_composed_kernels_equal_the_convolutions_they_replace():
    torch.manual_seed(0)
    x, t = torch.randn(2, 5, 12, 14), torch.randn(2, 5, 6, 7)
    inner, outer = torch.randn(6, 5, 3, 3), torch.randn(4, 6, 3, 3)
    both = compose_convs(outer, inner)
    assert both.shape == (4, 5, 5, 5)
    # without padding the composition is exact everywhere
    torch.testing.assert_close(F.conv2d(x, both), F.conv2d(F.conv2d(x, inner), outer), rtol=1e-4, atol=1e-4)
    w = torch.randn(3, 5, 5, 5)
    phases, pad = nearest2x_phase_kernels(w)
    assert phases.shape == (12, 5, 3, 3) and pad == 1
    want = F.conv2d(F.interpolate(t, scale_factor=2, mode="nearest"), w, padding=2)
    torch.testing.assert_close(F.pixel_shuffle(F.conv2d(t, phases, padding=pad), 2), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm", ["gn", "bn"])
@pytest.mark.parametrize("size", [(128, 160), (160, 128)])
def test_semantic_fpn_fused_finest_level_equals_the_step_by_step_head(norm, size):
    """At inference on maps of >= 32 x 32 the finest level composes the FPN's output convolution with the
    branch's (leanvit.dense.fused_fpn): same outputs, including the border rows and columns and the biases."""
    torch.manual_seed(0)
    seg = create_segmenter("semantic_fpn", "vit_tiny_patch16_224", 7, fpn_channels=32, channels=16, norm=norm,
                           **dict(VIT, img_size=size))
    for m in seg.head.modules():
        if isinstance(m, torch.nn.Conv2d) and m.bias is not None:
            torch.nn.init.normal_(m.bias, 0.0, 0.5)
    seg.eval()
    feats = seg.backbone(torch.rand(2, 3, *size))
    with torch.no_grad():
        assert seg.head._use_fused(feats)
        got, want = seg.head(feats), _reference_semantic_fpn(seg.head, feats)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # weights changed in place (an optimizer step, a loaded state dict): the composed kernels follow
        seg.head.fpn.layer_blocks[0][0].weight.mul_(-1.5)
        seg.head.branches[0][0][0].weight.add_(0.1)
        torch.testing.assert_close(seg.head(feats), _reference_semantic_fpn(seg.head, feats), rtol=1e-4, atol=1e-4)
    assert not seg.head._use_fused(feats)  # autograd on: the published order of operations


def test_semantic_fpn_exports_under_no_grad():
    """torch.export traces the published order of operations (the fused level reads parameter storage)."""
    torch.manual_seed(0)
    seg = create_segmenter("semantic_fpn", "vit_tiny_patch16_224", 3, fpn_channels=16, channels=16,
                           **dict(VIT, img_size=128)).eval()
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        program = torch.export.export(seg, (x,))
        torch.testing.assert_close(program.module()(x), seg(x), rtol=1e-4, atol=1e-4)


def test_semantic_fpn_gradients_match_the_step_by_step_computation():
    torch.manual_seed(0)
    seg = create_segmenter("semantic_fpn", "vit_tiny_patch16_224", 5, fpn_channels=32, channels=32, dropout=0.0, **VIT)
    feats = [f.detach().requires_grad_() for f in seg.backbone(torch.rand(2, 3, 64, 64))]
    grads = []
    for fn in (seg.head, lambda f: _reference_semantic_fpn(seg.head, f)):
        seg.zero_grad()
        fn(feats).square().mean().backward()
        grads.append([seg.head.fpn.layer_blocks[0][0].weight.grad.clone(), feats[3].grad.clone()])
        for f in feats:
            f.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_upernet_equals_its_step_by_step_computation():
    torch.manual_seed(0)
    seg = create_segmenter("upernet", "vit_tiny_patch16_224", 6, channels=32, **VIT).eval()
    with torch.no_grad():
        feats = seg.backbone(torch.rand(2, 3, 64, 96))
        torch.testing.assert_close(seg.head(feats), _reference_upernet(seg.head, feats), rtol=1e-5, atol=1e-5)


def test_linear_head_is_a_1x1_conv_on_the_patch_map():
    torch.manual_seed(0)
    seg = create_segmenter("linear", "vit_tiny_patch16_224", 5, **VIT).eval()
    assert list(seg.backbone.levels) == ["2"] and seg.backbone.strides == [16]  # no other pyramid level is built
    assert sum(p.numel() for p in seg.head.parameters()) == 64 * 5 + 5
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        y = seg(x)
        vit = seg.backbone.vit
        tokens = vit.forward_features((x - seg.pixel_mean) / seg.pixel_std)[:, vit.num_prefix_tokens:]
        grid = tokens.transpose(1, 2).reshape(2, 64, 4, 6)
        logits = torch.einsum("bchw,kc->bkhw", grid, seg.head.classifier.weight[:, :, 0, 0])
        logits = logits + seg.head.classifier.bias.view(1, -1, 1, 1)
        want = F.interpolate(logits, size=(64, 96), mode="bilinear", align_corners=False)
    assert y.shape == (2, 5, 64, 96)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)


def test_linear_head_subpixel_predicts_a_block_of_logits_per_token():
    """subpixel r: the token's one linear map gives its r x r sub-patch logits, in raster order within the
    patch (pixel shuffle), before the final bilinear upsampling."""
    torch.manual_seed(0)
    seg = create_segmenter("linear", "vit_tiny_patch16_224", 5, subpixel=4, **VIT).eval()
    assert sum(p.numel() for p in seg.head.parameters()) == 64 * 5 * 16 + 5 * 16
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        y = seg(x)
        vit = seg.backbone.vit
        tokens = vit.forward_features((x - seg.pixel_mean) / seg.pixel_std)[:, vit.num_prefix_tokens:]
        out = tokens @ seg.head.classifier.weight[:, :, 0, 0].T + seg.head.classifier.bias  # (B, 24, 5*16)
        fine = torch.empty(2, 5, 16, 24)
        for t in range(24):
            i, j = divmod(t, 6)
            for k in range(5):
                fine[:, k, 4 * i:4 * i + 4, 4 * j:4 * j + 4] = out[:, t, k * 16:(k + 1) * 16].reshape(2, 4, 4)
        want = F.interpolate(fine, size=(64, 96), mode="bilinear", align_corners=False)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)
    for bad in (0, 2.0, True):
        with pytest.raises(LeanvitError, match="subpixel must be a positive integer"):
            create_segmenter("linear", "vit_tiny_patch16_224", 5, subpixel=bad, **VIT)


def test_linear_head_trains_and_takes_one_map():
    torch.manual_seed(0)
    seg = create_segmenter("linear", "vit_tiny_patch16_224", 3, dropout=0.1, **VIT)
    y = seg(torch.rand(2, 3, 64, 64))
    F.cross_entropy(y, torch.randint(0, 3, (2, 64, 64))).backward()
    assert seg.head.classifier.weight.grad is not None and seg.backbone.vit.blocks[0].attn.qkv.weight.grad is not None
    seg = create_segmenter("linear", "shunted_t", 3, depths=[1, 1, 1, 1], embed_dims=[64, 64, 128, 128],
                           num_heads=[2, 2, 4, 4], mlp_ratios=[4, 4, 4, 4])
    assert seg.backbone.strides == [16] and seg(torch.rand(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    with pytest.raises(LeanvitError, match="linear head takes one map"):
        create_segmenter("linear", "vit_tiny_patch16_224", 3, out_indices=(0, 1, 2, 3), **VIT)
    with pytest.raises(LeanvitError, match="linear head takes one map"):
        create_segmenter("linear", create_backbone("vit_tiny_patch16_224", **VIT), 3)
    with pytest.raises(LeanvitError, match="unknown segmenter 'linaer'.*linear"):
        create_segmenter("linaer", "vit_tiny_patch16_224", 3, **VIT)


def test_mask_transformer_is_segmenters_decoder_step_by_step():
    """Segmenter's mask transformer: patches (projected) and class embeddings through the blocks together,
    masks = normalized patch . normalized class embeddings, LayerNorm over the classes."""
    torch.manual_seed(0)
    seg = create_segmenter("mask_transformer", "vit_tiny_patch16_224", 5, decoder_dim=32, decoder_heads=2, **VIT).eval()
    head = seg.head
    assert list(seg.backbone.levels) == ["2"] and len(head.blocks) == 2 and head.class_embed.shape == (1, 5, 32)
    assert "head.class_embed" in seg.no_weight_decay()
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        grid = seg.backbone((x - seg.pixel_mean) / seg.pixel_std)[-1]  # (2, 64, 4, 6)
        tokens = grid.flatten(2).transpose(1, 2) @ head.proj_in.weight.T + head.proj_in.bias
        z = torch.cat([tokens, head.class_embed.expand(2, -1, -1)], dim=1)
        for blk in head.blocks:
            z = blk(z)
        z = head.norm(z)
        p = F.normalize(z[:, :24] @ head.proj_patch.weight.T, dim=-1)
        c = F.normalize(z[:, 24:] @ head.proj_classes.weight.T, dim=-1)
        masks = F.layer_norm(p @ c.transpose(1, 2), (5,), head.mask_norm.weight, head.mask_norm.bias)
        want = F.interpolate(masks.transpose(1, 2).reshape(2, 5, 4, 6), size=(64, 96), mode="bilinear",
                             align_corners=False)
        y = seg(x)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)
    y = create_segmenter("mask_transformer", "vit_tiny_patch16_224", 5, decoder_depth=1, **VIT)(x)  # dim: the ViT's
    F.cross_entropy(y, torch.randint(0, 5, (2, 64, 96))).backward()
    with pytest.raises(LeanvitError, match="mask transformer takes one map"):
        create_segmenter("mask_transformer", "vit_tiny_patch16_224", 3, out_indices=(1, 2), **VIT)
    with pytest.raises(LeanvitError, match="divisible by decoder_heads"):
        create_segmenter("mask_transformer", "vit_tiny_patch16_224", 3, decoder_dim=30, decoder_heads=4, **VIT)


@pytest.mark.parametrize("reduction,restore", [("evit:1.0", "keep"), ("tome:0", "unmerge")])
def test_mask_transformer_with_reduction_off_is_the_unreduced_segmenter(reduction, restore):
    torch.manual_seed(0)
    plain = create_segmenter("mask_transformer", "vit_tiny_patch16_224", 4, **VIT).eval()
    reduced = create_segmenter("mask_transformer", "vit_tiny_patch16_224", 4, reduction=reduction, restore=restore,
                               **VIT).eval()
    reduced.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reduced(x), plain(x))


@pytest.mark.parametrize("name", ["vit_linear_seg_demo", "vit_semfpn_seg_demo", "vit_fcos_det_demo"])
def test_embedded_vit_dense_recipes_build_their_models(name):
    """The embedded plain-ViT dense recipes: a DeiT III-style ViT (LayerScale, patch 8: 144 tokens at 96 px)
    under the head they name, built with the options they give."""
    from leanvit.dense import create_detector
    from leanvit.train.recipes import resolve_config

    c = resolve_config(name)
    assert c["data"] in ("digits-seg", "digits-det") and c["img_size"] == 96
    opts = dict(c["model_kwargs"], **c["head_kwargs"], img_size=c["img_size"])
    if c["task"] == "detection":
        m = create_detector(c["detector"], c["model"], 10, min_size=96, max_size=96, **opts)
        vit = m.backbone.body.vit
    else:
        m = create_segmenter(c["segmenter"], c["model"], 11, **opts)
        vit = m.backbone.vit
        assert m(torch.rand(1, 3, 96, 96)).shape == (1, 11, 96, 96)
    assert vit.patch_embed.num_patches == 144 and float(vit.blocks[0].ls1.gamma.max()) == pytest.approx(0.1)


@pytest.mark.parametrize("reduction,restore", [("evit:1.0", "keep"), ("tome:0", "unmerge")])
def test_linear_head_with_reduction_off_is_the_unreduced_segmenter(reduction, restore):
    torch.manual_seed(0)
    plain = create_segmenter("linear", "vit_tiny_patch16_224", 4, **VIT).eval()
    torch.manual_seed(0)
    reduced = create_segmenter("linear", "vit_tiny_patch16_224", 4, reduction=reduction, restore=restore, **VIT).eval()
    reduced.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reduced(x), plain(x))


def test_linear_head_under_a_reduction_keeps_the_full_map():
    torch.manual_seed(0)
    seg = create_segmenter("linear", "vit_tiny_patch16_224", 4, reduction="evit:0.5", restore="keep",
                           depth=4, embed_dim=64, num_heads=2, img_size=64).eval()
    plain = create_segmenter("linear", "vit_tiny_patch16_224", 4, depth=4, embed_dim=64, num_heads=2,
                             img_size=64).eval()
    plain.load_state_dict(seg.state_dict())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        y, y0 = seg(x), plain(x)
    assert y.shape == y0.shape == (2, 4, 64, 64) and torch.isfinite(y).all()
    assert not torch.allclose(y, y0)  # the reduction changed the computation


def test_stride_bound_is_perfect_at_stride_1_and_falls_for_thin_structures():
    from leanvit.tasks.dense_eval import stride_bound

    mask = torch.zeros(32, 32, dtype=torch.long)
    mask[4:28, 10:12] = 1          # a 2-pixel-wide stroke
    mask[16:24, 16:24] = 2         # an 8 x 8 block
    mask[0, :] = 255               # ignored pixels take no part
    loader = [(None, [{"mask": mask}])]
    full = stride_bound(loader, 3, 1)
    assert full["val_miou"] == pytest.approx(1.0) and full["val_pixel_acc"] == pytest.approx(1.0)
    s8 = stride_bound(loader, 3, 8)
    iou = s8["per_class_iou"]
    assert iou[2] > 0.5 > iou[1]  # the block survives stride 8, the thin stroke does not
    assert stride_bound(loader, 3, 2)["val_miou"] > s8["val_miou"]
    with pytest.raises(LeanvitError, match="stride must be a positive integer"):
        stride_bound(loader, 3, 0)
