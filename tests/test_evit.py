"""EViT token reorganization: semantics against an explicit reference, exactness, bookkeeping."""
import math

import pytest
import timm
import torch

import leanvit
from leanvit import LeanvitError, apply_evit
from leanvit.reduction.evit import default_locations, is_evit, remove_evit


def tiny_vit(name="deit_small_patch16_224", **kw):
    args = dict(img_size=32, patch_size=4, embed_dim=48, depth=6, num_heads=3, num_classes=7)
    args.update(kw)
    return timm.create_model(name, **args).eval()


def reference_evit_forward(model, x, locations, keep_rate, fuse):
    """Straight transcription of the EViT reference algorithm: explicit attention matrix, sorted top-k,
    complement by mask, fused token = raw-score-weighted sum of the rest, appended last."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    track = torch.arange(x.shape[1] - 1).expand(x.shape[0], -1)
    kept_ids = []
    for i, blk in enumerate(model.blocks):
        if i not in locations:
            x = blk(x)
            continue
        a = blk.attn
        h = blk.norm1(x)
        B, N, C = h.shape
        q, k, v = a.qkv(h).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        attn = (q * a.scale @ k.transpose(-2, -1)).softmax(-1)
        out = a.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        x = x + blk.ls1(out)
        cls_attn = attn[:, :, 0, 1:].mean(1)
        left = math.ceil(keep_rate * (N - 1))
        if left < N - 1:
            _, idx = torch.topk(cls_attn, left, dim=1, largest=True, sorted=True)
            non_cls = x[:, 1:]
            kept = torch.gather(non_cls, 1, idx[..., None].expand(-1, -1, C))
            mask = torch.ones(B, N - 1, dtype=torch.bool).scatter(1, idx, False)
            parts = [x[:, :1], kept]
            new_track = torch.gather(track, 1, idx)
            if fuse:
                w = cls_attn * mask
                parts.append((non_cls * w[..., None]).sum(1, keepdim=True))
                new_track = torch.cat([new_track, torch.full((B, 1), -1)], 1)
            x = torch.cat(parts, 1)
            track = new_track
        kept_ids.append(track)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return model.forward_head(model.norm(x)), kept_ids


@pytest.mark.parametrize("base", ["deit_small_patch16_224", "deit3_small_patch16_224"])
@pytest.mark.parametrize("fuse", [True, False])
def test_matches_explicit_reference(base, fuse):
    model = tiny_vit(base, **({"init_values": 0.5} if "deit3" in base else {}))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want, want_ids = reference_evit_forward(model, x, (1, 3, 4), 0.6, fuse)
        apply_evit(model, keep_rate=0.6, locations=(1, 3, 4), fuse=fuse)
        got, got_ids = model(x, return_kept_indices=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(got_ids, want_ids):
        assert torch.equal(g, w)


@pytest.mark.parametrize("base", ["deit_small_patch16_224", "deit3_small_patch16_224", "vit_small_patch16_224"])
def test_keep_rate_one_is_exact_real_size(base):
    model = timm.create_model(base).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = model(x)
        apply_evit(model, keep_rate=1.0)
        got = model(x)
        assert (got - want).abs().max().item() <= 1e-5
        # and a run-time keep rate of 1 on a model built at 0.7
        model.keep_rate = 0.7
        assert (model(x, keep_rate=1.0) - want).abs().max().item() <= 1e-5


def test_token_counts_deit_small():
    model = timm.create_model("evit_deit_small_patch16_224", keep_rate=0.7).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        _, kept = model(x, return_kept_indices=True)
        assert [k.shape[1] for k in kept] == [139, 99, 71]
        model_drop = timm.create_model("evit_deit_small_patch16_224", keep_rate=0.7, fuse=False).eval()
        _, kept = model_drop(x, return_kept_indices=True)
        assert [k.shape[1] for k in kept] == [138, 97, 68]
        _, kept = model(x, keep_rate=0.5, return_kept_indices=True)
        assert [k.shape[1] for k in kept] == [99, 51, 27]


def test_gmacs_table():
    model = timm.create_model("evit_deit_small_patch16_224")
    want = {1.0: 4.60, 0.9: 4.02, 0.8: 3.48, 0.7: 3.03, 0.6: 2.64, 0.5: 2.31}
    for rate, g in want.items():
        model.keep_rate = rate
        assert leanvit.gmacs(model) == pytest.approx(g, abs=0.006), rate
    assert leanvit.gmacs(timm.create_model("deit_small_patch16_224")) == pytest.approx(4.60, abs=0.006)
    hi = timm.create_model("evit_deit_small_patch16_224", keep_rate=0.5, img_size=304)
    assert leanvit.gmacs(hi, 304) == pytest.approx(4.44, abs=0.006)
    drop = timm.create_model("evit_deit_small_patch16_224", keep_rate=0.7, fuse=False)
    assert leanvit.gmacs(drop) == pytest.approx(3.00, abs=0.006)


def test_kept_indices_are_patches_and_fused_is_not_patch_zero():
    model = apply_evit(tiny_vit(), keep_rate=0.5, locations=(1, 2, 3))
    with torch.no_grad():
        _, kept = model(torch.randn(4, 3, 32, 32), return_kept_indices=True)
    n = model.patch_embed.num_patches
    for ids in kept:
        real = ids[ids >= 0]
        assert real.max() < n
        # every row: real patch ids are distinct
        for row in ids:
            r = row[row >= 0]
            assert r.unique().numel() == r.numel()
    # each reorganization appends its fused token last, reported as -1 (never as a patch id such as 0)
    assert all((ids[:, -1] == -1).all() for ids in kept)
    assert (kept[0][:, :-1] >= 0).all()  # before it, only real patches were there to keep
    assert all((ids == 0).sum(1).le(1).all() for ids in kept)
    masks = leanvit.kept_token_masks(kept, n)
    assert [m.shape for m in masks] == [(4, n)] * 3
    assert all(m.sum(1).le(ids.shape[1]).all() for m, ids in zip(masks, kept))
    # later layers keep a subset of earlier ones
    assert not (masks[1] & ~masks[0]).any() and not (masks[2] & ~masks[1]).any()


def test_fused_token_weighted_sum():
    from leanvit.reduction.reorg import reorganize

    x = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    scores = torch.tensor([[0.1, 0.4, 0.2, 0.05], [0.3, 0.0, 0.25, 0.2]])
    out, ids = reorganize(x, scores, 2, fuse=True, token_ids=torch.arange(4).expand(2, -1))
    assert out.shape == (2, 4, 3)
    assert ids.tolist() == [[1, 2, -1], [0, 2, -1]]
    torch.testing.assert_close(out[0, 1], x[0, 2])  # top score 0.4 is token index 1 -> position 2
    torch.testing.assert_close(out[0, 3], 0.1 * x[0, 1] + 0.05 * x[0, 4])
    dropped, _ = reorganize(x, scores, 2, fuse=False)
    assert dropped.shape == (2, 3, 3)
    torch.testing.assert_close(dropped, out[:, :3])


@pytest.mark.parametrize("prefix", [1, 2])
@pytest.mark.parametrize("fuse", [True, False])
def test_reorganize_matches_per_sample_reference(prefix, fuse):
    """The batched row gather gives, sample by sample, the prefix, then the top-k tokens in descending
    score order, then (fusing) the score-weighted sum of the others."""
    from leanvit.reduction.reorg import reorganize

    torch.manual_seed(0)
    B, n, C, k = 3, 9, 4, 5
    x = torch.randn(B, prefix + n, C)
    scores = torch.rand(B, n)
    out, ids = reorganize(x, scores, k, fuse=fuse, num_prefix_tokens=prefix,
                          token_ids=torch.arange(n).expand(B, -1))
    assert out.shape == (B, prefix + k + int(fuse), C)
    for b in range(B):
        order = scores[b].argsort(descending=True)
        want = [x[b, :prefix], x[b, prefix + order[:k]]]
        if fuse:
            rest = order[k:]
            want.append((x[b, prefix + rest] * scores[b, rest, None]).sum(0, keepdim=True))
        torch.testing.assert_close(out[b], torch.cat(want), atol=1e-6, rtol=1e-6)
        assert ids[b, :k].tolist() == order[:k].tolist()


def test_explicit_attention_gives_the_same_tokens_and_outputs():
    """timm's ``fused_attn=False``: the reorganizing blocks read the scores off the explicit attention
    probabilities instead of computing the class row beside SDPA; same kept tokens, same logits."""
    torch.manual_seed(0)
    model = timm.create_model("evit_deit_small_patch16_224", img_size=64, keep_rate=0.6).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        fused, fused_kept = model.forward_features(x, return_kept_indices=True)
        for blk in model.blocks:
            blk.attn.fused_attn = False
        explicit, explicit_kept = model.forward_features(x, return_kept_indices=True)
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(explicit_kept, fused_kept))


def test_batch_independence():
    model = timm.create_model("evit_deit_small_patch16_224", keep_rate=0.6).eval()
    x = torch.randn(5, 3, 224, 224)
    with torch.no_grad():
        batch = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(5)])
    assert (batch - alone).abs().max().item() <= 1e-5


def test_gradients_flow_in_train_mode():
    model = timm.create_model("evit_deit3_small_patch16_224", img_size=32, patch_size=4, embed_dim=48,
                              depth=6, num_heads=3, num_classes=5, drop_path_rate=0.1, keep_rate=0.5)
    model.train()
    x = torch.randn(4, 3, 32, 32)
    loss = model(x).logsumexp(-1).mean()
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_grad_checkpointing_matches():
    model = apply_evit(tiny_vit(), keep_rate=0.6)
    model.train()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    a = model(x)
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    b = model(x)
    torch.testing.assert_close(a, b)
    b.sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_runtime_and_per_layer_keep_rates():
    model = apply_evit(tiny_vit(), keep_rate=(0.9, 0.7, 0.5), locations=(1, 2, 4))
    assert model.keep_rate == (0.9, 0.7, 0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, kept = model(x, return_kept_indices=True)
        assert [k.shape[1] for k in kept] == [58 + 1, math.ceil(0.7 * 59) + 1, math.ceil(0.5 * 43) + 1]
        model.keep_rate = 0.5
        assert model.keep_rate == 0.5
        _, kept = model(x, return_kept_indices=True)
        assert [k.shape[1] for k in kept] == [33, 18, 10]
        ref = model(x)
        model.keep_rate = 0.9
        torch.testing.assert_close(model(x, keep_rate=0.5), ref)


def test_default_locations_rule_and_registered_models():
    assert default_locations(12) == (3, 6, 9)
    assert default_locations(24) == (6, 12, 18)
    assert default_locations(32) == (8, 16, 24)
    for name in ["evit_deit_tiny_patch16_224", "evit_deit_small_patch16_224", "evit_deit_base_patch16_224",
                 "evit_deit3_small_patch16_224", "evit_deit3_medium_patch16_224", "evit_deit3_base_patch16_224",
                 "evit_deit3_large_patch16_224"]:
        assert timm.is_model(name)
    large = timm.create_model("evit_deit3_large_patch16_224", img_size=32, embed_dim=64, num_heads=2)
    assert large.evit_locations == (6, 12, 18)
    m = timm.create_model("evit_deit3_small_patch16_224", keep_rate=0.5, locations=(2, 5), fuse=False,
                          num_classes=3, img_size=32)
    assert m.keep_rate == 0.5 and m.evit_locations == (2, 5) and not m.fuse
    assert is_evit(m) and not is_evit(remove_evit(m))


def test_remove_and_reapply_are_exact():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        apply_evit(model, 0.5)
        apply_evit(model, 0.7, locations=(2,))
        assert model.evit_locations == (2,)
        remove_evit(model)
        torch.testing.assert_close(model(x), want, atol=0, rtol=0)


def test_state_dict_keys_unchanged():
    plain = timm.create_model("deit3_small_patch16_224")
    evit = timm.create_model("evit_deit3_small_patch16_224")
    assert list(plain.state_dict()) == list(evit.state_dict())
    assert sum(p.numel() for p in evit.parameters()) == 22_059_496


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5, float("nan"), "high"])
def test_bad_keep_rate(rate):
    with pytest.raises(LeanvitError, match="keep_rate"):
        apply_evit(tiny_vit(), keep_rate=rate)
    model = apply_evit(tiny_vit(), keep_rate=0.5)
    with pytest.raises(LeanvitError, match="keep_rate"):
        model.keep_rate = rate


def test_bad_locations_and_models():
    with pytest.raises(LeanvitError, match=r"outside the model's blocks 0..5"):
        apply_evit(tiny_vit(), locations=(2, 6))
    with pytest.raises(LeanvitError, match="3 keep rates for 2"):
        apply_evit(tiny_vit(), keep_rate=(0.5, 0.6, 0.7), locations=(1, 2))
    no_cls = tiny_vit("vit_small_patch16_224", class_token=False, global_pool="avg")
    with pytest.raises(LeanvitError, match="class token"):
        apply_evit(no_cls)
    with pytest.raises(LeanvitError, match="VisionTransformer"):
        apply_evit(torch.nn.Linear(3, 3))


def test_keep_rate_schedule():
    s = leanvit.keep_rate_schedule
    assert s(0, 0.7, start_iter=10, span_iters=100) == 1.0
    assert s(9, 0.7, 10, 100) == 1.0
    assert s(10, 0.7, 10, 100) == pytest.approx(1.0)
    assert s(60, 0.7, 10, 100) == pytest.approx(0.85)
    assert s(35, 0.7, 10, 100) == pytest.approx(0.7 + 0.3 * (math.cos(math.pi / 4) + 1) / 2)
    assert s(110, 0.7, 10, 100) == 0.7 and s(10_000, 0.7, 10, 100) == 0.7
    assert s(0, 0.7) == 0.7  # fine-tuning: target from the first iteration
    values = [s(i, 0.5, 0, 50) for i in range(60)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    with pytest.raises(LeanvitError):
        s(0, 0.0)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    """fullgraph=True: the reorganization compiles without graph breaks (static shapes, no .item())."""
    model = apply_evit(tiny_vit(), keep_rate=0.6)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want, want_kept = model(x, return_kept_indices=True)
        got = torch.compile(model, fullgraph=True)(x)
        _, got_kept = torch.compile(lambda t: model(t, return_kept_indices=True), fullgraph=True)(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(got_kept, want_kept))


def test_forward_intermediates_before_and_after_reorganization():
    model = apply_evit(tiny_vit(), keep_rate=0.5, locations=(2, 4))
    x = torch.randn(2, 3, 32, 32)
    early = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    assert [t.shape for t in early] == [(2, 48, 8, 8)] * 2
    late_maps = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)  # scattered to the grid
    assert [t.shape for t in late_maps] == [(2, 48, 8, 8)] * 2
    late = model.forward_intermediates(x, indices=[1, 3], output_fmt="NLC", intermediates_only=True)
    assert late[0].shape == (2, 64, 48) and late[1].shape == (2, 32 + 1, 48)


@pytest.mark.parametrize("name,kw", [("deit_small_distilled_patch16_224", {}),
                                     ("vit_small_patch14_reg4_dinov2", {"patch_size": 8})])
def test_extra_prefix_tokens_stay(name, kw):
    """Distillation and register tokens are prefix tokens: always kept, never scored or fused."""
    model = tiny_vit(name, **kw)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        apply_evit(model, keep_rate=1.0, locations=(1, 3))
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=0)
        model.keep_rate = 0.5
        _, kept = model(x, return_kept_indices=True)
    n = model.patch_embed.num_patches
    assert model.num_prefix_tokens > 1
    assert [k.shape[1] for k in kept] == [math.ceil(n / 2) + 1, math.ceil((math.ceil(n / 2) + 1) / 2) + 1]
