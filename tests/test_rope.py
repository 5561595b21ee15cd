"""Token reduction on RoPE ViTs (timm ``Eva``: DINOv3, EVA-02): positions travel with their tokens."""
import math

import pytest
import timm
import torch
from timm.layers import apply_rot_embed_cat

import leanvit
from leanvit.errors import LeanvitError
from leanvit.reduction.positions import rope_angles, rope_table

SMALL = {  # name -> (kwargs of a small variant, input size)
    "vit_small_patch16_dinov3": (dict(depth=4, embed_dim=96, num_heads=2), 64),
    "eva02_small_patch14_224": (dict(depth=4, embed_dim=96, num_heads=2, img_size=56), 56),
}


def small(name, seed=0):
    kwargs, size = SMALL[name]
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    for blk in model.blocks:  # LayerScale 1e-5 would make every block nearly the identity: test real mixing
        for g in (blk.gamma_1, blk.gamma_2):
            if g is not None:
                torch.nn.init.constant_(g, 0.5)
    torch.nn.init.normal_(model.head.weight, std=0.1)  # logits of order 1, so that tolerances mean something
    return model, torch.randn(2, 3, size, size)


@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3", "eva02_small_patch14_224"])
def test_rotary_table_from_angles_is_timms(name):
    model, x = small(name)
    for size in {x.shape[-1], 48 if "dinov3" in name else x.shape[-1]}:
        grid = model.patch_embed.dynamic_feat_size((size, size)) if model.dynamic_img_size else \
            model.patch_embed.grid_size
        _, rope = model._pos_embed(model.patch_embed(torch.zeros(1, 3, size, size)))
        table = rope_table(rope_angles(model.rope, grid), model.blocks[0].attn.rotate_half)
        assert torch.equal(table, rope)


@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3", "eva02_small_patch14_224"])
@torch.no_grad()
def test_reduction_off_is_the_unreduced_model_exactly(name):
    model = timm.create_model(name).eval()  # the full-size model, as timm builds it
    x = torch.randn(1, 3, 224, 224)
    ref = model(x)
    for method, off in (("evit", {"keep_rate": 1.0}), ("evit-drop", {"keep_rate": 1.0}), ("tome", {"r": 0})):
        leanvit.apply_reduction(model, method, **off)
        assert torch.equal(model(x), ref), method
    leanvit.remove_reduction(model)
    assert type(model).__name__ == "Eva" and torch.equal(model(x), ref)


@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3", "eva02_small_patch14_224"])
@pytest.mark.parametrize("method", ["evit", "evit-drop"])
@torch.no_grad()
def test_permuting_tokens_with_their_positions_changes_nothing(name, method):
    """Pruning ranks tokens by score, so the order of the patch tokens does not matter as long as each keeps
    its own rotary position; a reduction that lost the positions (or rotated by sequence index) fails this."""
    model, x = small(name)
    leanvit.apply_reduction(model, method, keep_rate=0.5, locations=(1, 2))
    ref = model(x)
    P = model.num_prefix_tokens
    timm_pos_embed = model._pos_embed
    perm = torch.randperm(x.shape[-1] ** 2 // model.patch_embed.patch_size[0] ** 2, generator=torch.Generator()
                          .manual_seed(1))

    def permuted(tokens):
        t, rope = timm_pos_embed(tokens)
        t = torch.cat([t[:, :P], t[:, P:][:, perm]], dim=1)
        return t, rope[perm]

    model._pos_embed = permuted
    out = model(x)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    # the same permutation of the tokens alone (positions left in place) is a different model
    model._pos_embed = lambda tokens: (permuted(tokens)[0], timm_pos_embed(tokens)[1])
    assert not torch.allclose(model(x), ref, atol=1e-3)


def reference_evit_drop(model, x, keep_rate, locations):
    """EViT without fusion, one sample at a time, written from timm's Eva pieces: the top-k patch tokens by the
    class token's head-averaged attention are kept, gathered with their rows of the rotary table."""
    outs = []
    for img in x:
        t = model.patch_embed(img[None])
        t, rope = model._pos_embed(t)
        t = model.norm_pre(t)
        P = model.num_prefix_tokens
        for i, blk in enumerate(model.blocks):
            if i not in locations:
                t = blk(t, rope=rope)
                continue
            a = blk.attn
            h = blk.norm1(t)
            bias = torch.cat((a.q_bias, a.k_bias, a.v_bias)) if a.q_bias is not None else None
            qkv = torch.nn.functional.linear(h, a.qkv.weight, bias).reshape(1, -1, 3, a.num_heads, a.head_dim)
            q, k = a.q_norm(qkv[:, :, 0].transpose(1, 2)), a.k_norm(qkv[:, :, 1].transpose(1, 2))
            q = torch.cat([q[:, :, :P], apply_rot_embed_cat(q[:, :, P:], rope, half=a.rotate_half)], dim=2)
            k = torch.cat([k[:, :, :P], apply_rot_embed_cat(k[:, :, P:], rope, half=a.rotate_half)], dim=2)
            cls = ((q[:, :, :1] @ k.transpose(-1, -2)) * a.scale).softmax(-1)[0, :, 0, P:].mean(0)
            t = t + (1 if blk.gamma_1 is None else blk.gamma_1) * blk.attn(h, rope=rope)
            n = t.shape[1] - P
            keep = cls.argsort(descending=True)[:math.ceil(keep_rate * n)]
            t = torch.cat([t[:, :P], t[:, P + keep]], dim=1)
            rope = rope[keep]
            t = t + (1 if blk.gamma_2 is None else blk.gamma_2) * blk.mlp(blk.norm2(t))
        outs.append(model.forward_head(model.norm(t)))
    return torch.cat(outs)


@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3", "eva02_small_patch14_224"])
@torch.no_grad()
def test_evit_on_eva_matches_an_independent_reimplementation(name):
    model, x = small(name)
    ref = reference_evit_drop(model, x, 0.5, (1, 2))
    leanvit.apply_reduction(model, "evit-drop", keep_rate=0.5, locations=(1, 2))
    out = model(x)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()


@torch.no_grad()
def test_tome_merged_positions():
    """A merged token takes the size-weighted mean angle of what it absorbed ("mean") or its destination's
    ("dst"); both differ from each other and run under the same r; unknown modes are refused."""
    model, x = small("vit_small_patch16_dinov3")
    outs = {}
    for position in ("mean", "dst"):
        leanvit.apply_reduction(model, "tome", r=6, position=position)
        outs[position] = model(x)
        assert leanvit.reduction.reduction_spec(model).get("position", "mean") == position
    assert not torch.allclose(outs["mean"], outs["dst"])
    with pytest.raises(LeanvitError, match="position must be one of mean, dst.*'median'"):
        leanvit.apply_reduction(model, "tome", r=6, position="median")
    leanvit.apply_reduction(model, "tome", r=999)  # clamped at run time (half of the tokens), as published
    with pytest.raises(LeanvitError, match="tome:999 merges more tokens than a block has.*at most 128 per block"):
        leanvit.reduction.get_reduction("tome").check_runs_as_given(model, 999)  # what training refuses


def test_mean_position_of_two_patches_is_their_midpoint():
    model, _ = small("vit_small_patch16_dinov3")
    grid = (4, 4)
    angles = rope_angles(model.rope, grid)
    # patches (0, 0) and (0, 2): their mean angle is the angle of (0, 1), the midpoint
    assert torch.allclose((angles[0] + angles[2]) / 2, angles[1], atol=1e-6)


@torch.no_grad()
def test_eva_bad_input_is_one_line():
    model, _ = small("eva02_small_patch14_224")
    leanvit.apply_reduction(model, "evit", keep_rate=0.5)
    model.patch_embed.strict_img_size = False  # timm's own size check off: the rotary table is still 4x4
    with pytest.raises(LeanvitError, match=r"rotary table has 16 positions \(grid \(4, 4\)\) but the 112x112 "
                                           r"input gives 64"):
        model(torch.randn(1, 3, 112, 112))
    shunted = leanvit.create_model("shunted_t", num_classes=10)
    with pytest.raises(LeanvitError, match="no adapter for ShuntedTransformer.*eva .*vit "):
        leanvit.apply_reduction(shunted, "tome", r=4)


@pytest.mark.parametrize("method,strength", [("evit", {"keep_rate": 0.5}), ("tome", {"r": 4})])
def test_eva_trains_with_gradient_checkpointing(method, strength):
    model, x = small("vit_small_patch16_dinov3")
    leanvit.apply_reduction(model, method, **strength)
    model.train()
    plain = model(x).square().mean()
    plain.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().mean().backward()
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_dinov3_pretrained_through_timm_with_a_reduction(tmp_path):
    """``pretrained=True`` goes through timm's own machinery (a local file here), then the reduction applies."""
    kwargs, size = SMALL["vit_small_patch16_dinov3"]
    torch.manual_seed(3)
    sd = timm.create_model("vit_small_patch16_dinov3", num_classes=10, **kwargs).state_dict()
    path = tmp_path / "dinov3_small.pth"
    torch.save(sd, path)
    model = leanvit.create_model("vit_small_patch16_dinov3", pretrained=True, num_classes=10, reduction="tome:3",
                                 pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()
    assert leanvit.reduction.reduction_spec(model)["r"] == 3
    backbone = {k: v for k, v in sd.items() if not k.startswith("head.")}  # timm's DINOv3 cfg has no classifier
    assert len(backbone) > 20
    for k, v in backbone.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_eva_checkpoint_through_the_commands(tmp_path, capsys):
    """eval, viz, export, bench and sweep take a RoPE checkpoint with a reduction as they take DeiT's."""
    from cli_helpers import cli

    from leanvit.checkpoints import save_checkpoint

    kwargs, size = SMALL["vit_small_patch16_dinov3"]
    spec = {"name": "vit_small_patch16_dinov3", "kwargs": {**kwargs, "img_size": 48, "patch_size": 8,
                                                           "num_classes": 10}}
    ckpt = tmp_path / "dino.pth"
    torch.manual_seed(0)
    save_checkpoint({"model": leanvit.create_model(spec["name"], **spec["kwargs"]).state_dict(), "model_spec": spec},
                    ckpt)
    data = ("--data", "digits")
    rc, out, err = cli(capsys, "eval", "--checkpoint", ckpt, *data, "--reduction", "tome:4", "--no-progress")
    assert rc == 0 and "top-1" in out, err
    rc, _, err = cli(capsys, "viz", "--checkpoint", ckpt, *data, "--num-images", "2", "--reduction", "evit:0.5",
                     "--output", tmp_path / "viz")
    assert rc == 0 and (tmp_path / "viz" / "kept_tokens.png").exists(), err
    rc, out, err = cli(capsys, "export", "--checkpoint", ckpt, "--reduction", "evit:0.5", "--format", "onnx",
                       "--output", tmp_path / "dino.onnx")
    assert rc == 0, err
    diffs = [float(d) for d in __import__("re").findall(r"max abs diff (\S+)", out)]
    assert diffs and max(diffs) <= 1e-4
    rc, out, err = cli(capsys, "bench", "--models", ckpt, "--reduction", "evit:0.5", "tome:4", "--batch-size", "2",
                       "--repeats", "1", "--output", tmp_path / "bench")
    assert rc == 0, err
    assert "evit" in out and "tome" in out


@torch.no_grad()
def test_eva_intermediates_with_a_reduction():
    model, x = small("vit_small_patch16_dinov3")
    ref = model.forward_intermediates(x)[1]
    leanvit.apply_reduction(model, "tome", r=0)  # timm's own loop through the merging blocks, nothing merged
    assert all(torch.equal(a, b) for a, b in zip(model.forward_intermediates(x)[1], ref))
    leanvit.apply_reduction(model, "evit", keep_rate=0.5, locations=(1, 2))
    maps = model.forward_intermediates(x)[1]
    assert torch.equal(maps[0], ref[0]) and maps[-1].shape == ref[-1].shape  # before pruning: the same map
    leanvit.apply_reduction(model, "tome", r=4)
    with pytest.raises(LeanvitError, match="not available while ToMe merges"):
        model.forward_intermediates(x)


@torch.no_grad()
def test_token_count_bound_runs_the_reduced_lengths():
    """At the unreduced model's own lengths the bound computes the model; at EViT's it runs them by truncation."""
    from leanvit.measure.bound import TokenCountBound, sequence_lengths

    model, x = small("vit_small_patch16_dinov3")
    full = sequence_lengths(model, x)
    assert torch.allclose(TokenCountBound(model, full)(x), model(x), atol=1e-5)
    leanvit.apply_reduction(model, "evit", keep_rate=0.5, locations=(1, 2))
    lengths = sequence_lengths(model, x)
    assert lengths[1][1] < lengths[1][0] == full[1][0]  # block 1 prunes after its attention
    bound = TokenCountBound(model, lengths)
    assert leanvit.reduction.applied_reduction(bound.vit) is None
    assert sequence_lengths(bound.vit, x) == full and bound(x).shape == model(x).shape
