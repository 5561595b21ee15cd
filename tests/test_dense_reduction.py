"""Token reduction inside dense ViT backbones: exactness with the reduction off, each restoration strategy
against a per-sample reference written out here, and the errors."""
import math

import pytest
import torch

import leanvit  # noqa: F401
from leanvit import LeanvitError
from leanvit.dense import (
    apply_dense_reduction,
    create_backbone,
    create_detector,
    create_segmenter,
    dense_reduction_spec,
    parse_restore,
)

IMG = 48
VIT = dict(img_size=IMG, patch_size=8, embed_dim=48, depth=6, num_heads=3)   # 36 patches, EViT blocks 1, 3, 4


def backbone(name="deit_small_patch16_224", seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(VIT)
    args.update(kw)
    return create_backbone(name, out_indices=(2,), **args).eval()


def images(n=2, h=IMG, w=IMG, seed=1):
    torch.manual_seed(seed)
    return torch.rand(n, 3, h, w)


# ---------------------------------------------------------------------------------------------
# Per-sample references
def _attention(blk, t, size=None):
    """Explicit attention of one sample (N, C): (output, probabilities (H, N, N), keys (H, N, d))."""
    a = blk.attn
    N = t.shape[0]
    qkv = a.qkv(t).reshape(N, 3, a.num_heads, a.head_dim).permute(1, 2, 0, 3)
    q, k, v = a.q_norm(qkv[0]), a.k_norm(qkv[1]), qkv[2]
    logits = (q @ k.transpose(-1, -2)) * a.head_dim ** -0.5
    if size is not None:
        logits = logits + size.log()[None, None, :]
    p = logits.softmax(-1)
    return a.proj((p @ v).transpose(0, 1).reshape(N, -1)), p, k


def _embed(vit, img):
    return vit.norm_pre(vit._pos_embed(vit.patch_embed(img[None])))[0]


def reference_evit_map(vit, img, restore="keep", blocks=1):
    """EViT per sample: the top-k tokens by head-averaged class attention kept (in score order), the rest
    fused (attention-weighted sum) or dropped; every patch's features recorded when it leaves the
    sequence. keep: the map of last states; reactivate: the removed tokens re-enter before the last
    ``blocks`` blocks."""
    P = vit.num_prefix_tokens
    t = _embed(vit, img)
    n = t.shape[0] - P
    ids, last = list(range(n)), {}
    depth = len(vit.blocks)
    first_full = depth - blocks if restore == "reactivate" else depth

    def record(tokens, ids):
        for pid, row in zip(ids, tokens[P:]):
            if pid >= 0:
                last[pid] = row

    for i, blk in enumerate(vit.blocks):
        if i == first_full:
            record(t, ids)
            t = torch.cat([t[:P], torch.stack([last[p] for p in range(n)])])
            ids = list(range(n))
        if i in vit.evit_locations and i < first_full:
            out, p, _ = _attention(blk, blk.norm1(t))
            t = t + blk.ls1(out)
            scores = p[:, 0, P:].mean(0)
            m = len(ids)
            k = max(1, math.ceil(blk.keep_rate * m))
            record(t, ids)
            order = sorted(range(m), key=lambda j: -scores[j].item())
            rows, new_ids = [t[P + j] for j in order[:k]], [ids[j] for j in order[:k]]
            if blk.fuse and k < m:
                rows.append(sum(scores[j] * t[P + j] for j in order[k:]))
                new_ids.append(-1)
            t, ids = torch.cat([t[:P], torch.stack(rows)]), new_ids
            t = t + blk.ls2(blk.mlp(blk.norm2(t)))
        else:
            t = blk(t[None])[0]
    record(t, ids)
    return vit.norm(torch.stack([last[p] for p in range(n)]))


def reference_tome_map(vit, img, r, restore="unmerge", blocks=1):
    """ToMe per sample (published partition: whole sequence alternated, prefix tokens protected), each
    token's set of patches tracked as a Python list; unmerge: every patch takes its token's features;
    reactivate: unmerged before the last ``blocks`` blocks, which run unreduced."""
    P = vit.num_prefix_tokens
    t = _embed(vit, img)
    n = t.shape[0] - P
    s = torch.ones(t.shape[0])
    members = [[]] * P + [[p] for p in range(n)]
    depth = len(vit.blocks)
    first_full = depth - blocks if restore == "reactivate" else depth

    def unmerged(t):
        rows = [None] * n
        for row, mem in zip(t[P:], members[P:]):
            for p in mem:
                rows[p] = row
        return torch.stack(rows)

    for i, blk in enumerate(vit.blocks):
        if i == first_full:
            t = torch.cat([t[:P], unmerged(t)])
            s, members = torch.ones(t.shape[0]), [[]] * P + [[p] for p in range(n)]
        N = t.shape[0]
        rr = min(r, (N - P) // 2) if i < first_full else 0
        out, _, k = _attention(blk, blk.norm1(t), s)
        t = t + blk.ls1(out)
        if rr > 0:
            metric = k.mean(0)
            metric = metric / metric.norm(dim=-1, keepdim=True)
            A, B = list(range(0, N, 2)), list(range(1, N, 2))
            sim = metric[A] @ metric[B].T
            sim[[i for i, pos in enumerate(A) if pos < P]] = -float("inf")
            sim[:, [j for j, pos in enumerate(B) if pos < P]] = -float("inf")
            best, partner = sim.max(-1)
            order = sorted(range(len(A)), key=lambda i: -best[i].item())
            kept = sorted(order[rr:])
            num = {j: t[B[j]] * s[B[j]] for j in range(len(B))}
            den = {j: s[B[j]].clone() for j in range(len(B))}
            mem = {j: list(members[B[j]]) for j in range(len(B))}
            for a in order[:rr]:
                j = partner[a].item()
                num[j], den[j] = num[j] + t[A[a]] * s[A[a]], den[j] + s[A[a]]
                mem[j] += members[A[a]]
            kept = [a for a in kept if A[a] >= P]
            bs = [j for j in range(len(B)) if B[j] >= P]
            t = torch.cat([t[:P], torch.stack([t[A[a]] for a in kept] + [num[j] / den[j] for j in bs])])
            s = torch.cat([s[:P], torch.stack([s[A[a]] for a in kept] + [den[j] for j in bs])])
            members = members[:P] + [members[A[a]] for a in kept] + [mem[j] for j in bs]
        t = t + blk.ls2(blk.mlp(blk.norm2(t)))
    return vit.norm(unmerged(t))


def _as_map(bb, x):
    with torch.no_grad():
        m = bb(x)[0]
    return m.flatten(2).transpose(1, 2)  # (B, patches, C)


# ---------------------------------------------------------------------------------------------
VARIANTS = {"deit": dict(name="deit_small_patch16_224"),
            "deit3": dict(name="deit3_small_patch16_224", init_values=0.5),
            "registers": dict(name="vit_small_patch16_224", reg_tokens=2, init_values=0.3)}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("reduction,restore", [("evit:1.0", "keep"), ("evit:1.0", "reactivate"), ("evit:1", "fused"),
                                               ("evit-drop:1.0", None), ("tome:0", "unmerge"),
                                               ("tome:0", "reactivate:2")])
def test_reduction_off_is_exactly_the_unreduced_model(variant, reduction, restore):
    plain = backbone(**VARIANTS[variant])
    reduced = backbone(**VARIANTS[variant], reduction=reduction, restore=restore)
    reduced.load_state_dict(plain.state_dict())
    x = images()
    assert torch.equal(_as_map(reduced, x), _as_map(plain, x))


def test_reduction_off_segmenter_and_detector_outputs():
    kw = dict(VIT, fpn_channels=16, channels=8)
    torch.manual_seed(0)
    plain = create_segmenter("semantic_fpn", "deit3_small_patch16_224", 3, **kw).eval()
    for spec in ("evit:1.0", "tome:0"):
        seg = create_segmenter("semantic_fpn", "deit3_small_patch16_224", 3, reduction=spec, **kw).eval()
        seg.load_state_dict(plain.state_dict())
        x = images()
        with torch.no_grad():
            assert torch.equal(seg(x), plain(x))
    dkw = dict(VIT, min_size=IMG, max_size=IMG, fpn_channels=16, score_thresh=0.0)
    torch.manual_seed(0)
    det = create_detector("retinanet", "deit_small_patch16_224", 2, **dkw).eval()
    red = create_detector("retinanet", "deit_small_patch16_224", 2, reduction="tome:0", **dkw).eval()
    red.load_state_dict(det.state_dict())
    ims = list(images())
    with torch.no_grad():
        a, b = det(ims), red(ims)
    assert all(torch.equal(u["boxes"], v["boxes"]) and torch.equal(u["scores"], v["scores"]) for u, v in zip(a, b))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("method,restore,blocks", [("evit", "keep", 1), ("evit-drop", "keep", 1),
                                                   ("evit", "reactivate", 1)])
def test_evit_restorations_match_reference(variant, method, restore, blocks):
    bb = backbone(**VARIANTS[variant], reduction=f"{method}:0.5", restore=restore)
    x = images(h=IMG, w=IMG + 8)  # not square: 6 x 7 patches
    got = _as_map(bb, x)
    with torch.no_grad():
        ref = torch.stack([reference_evit_map(bb.vit, xi, restore, blocks) for xi in x])
        plain = backbone(**VARIANTS[variant])
        plain.load_state_dict(bb.state_dict())
        assert not torch.allclose(got, _as_map(plain, x), atol=1e-3)  # the reduction changes the map
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    # removed patches keep features of their own: no two patches share one vector (unlike `fused`)
    assert len(torch.unique(got[0], dim=0)) == got.shape[1]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("restore,blocks", [("unmerge", 1), ("reactivate", 1), ("reactivate", 3)])
def test_tome_restorations_match_reference(variant, restore, blocks):
    spec = restore if restore == "unmerge" else {"name": "reactivate", "blocks": blocks}
    bb = backbone(**VARIANTS[variant], reduction="tome:5", restore=spec)
    x = images(h=IMG, w=IMG + 8)
    got = _as_map(bb, x)
    with torch.no_grad():
        ref = torch.stack([reference_tome_map(bb.vit, xi, 5, restore, blocks) for xi in x])
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    if restore == "unmerge":  # merged patches share their token's features
        assert len(torch.unique(got[0], dim=0)) < got.shape[1]


def test_fused_restoration_fills_removed_patches_with_the_fused_token():
    bb = backbone(reduction="evit:0.5", restore="fused")
    x = images()
    got = _as_map(bb, x)
    with torch.no_grad():
        tokens, kept = bb.vit.forward_features(x, return_kept_indices=True)
    last = kept[-1]
    assert (last[:, -1] == -1).all()  # the fused token is last
    for b in range(2):
        ids = last[b]
        patch = ids >= 0  # an earlier fused token can be among the kept ones: not a patch
        removed = torch.ones(36, dtype=torch.bool)
        removed[ids[patch]] = False
        assert torch.equal(got[b, removed], tokens[b, -1].expand(int(removed.sum()), -1))
        assert torch.equal(got[b, ids[patch]], tokens[b, 1:][patch])


def test_trains_with_gradients_and_checkpointing():
    torch.manual_seed(0)
    for spec, restore in (("evit:0.5", "keep"), ("evit:0.5", "reactivate"), ("tome:4", "unmerge"),
                          ("tome:4", "reactivate")):
        seg = create_segmenter("semantic_fpn", "deit3_small_patch16_224", 3, reduction=spec, restore=restore,
                               fpn_channels=16, channels=8, drop_path_rate=0.1, **VIT).train()
        seg.set_grad_checkpointing(True)
        seg(images()).logsumexp(1).mean().backward()
        grads = [p.grad for n, p in seg.named_parameters() if p.requires_grad and "pos_embed" in n]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_switching_reduction_on_a_built_model_and_spec():
    seg = create_segmenter("upernet", "deit_small_patch16_224", 3, channels=8, **VIT).eval()
    x = images()
    with torch.no_grad():
        ref = seg(x)
        apply_dense_reduction(seg, "tome:6", restore="reactivate")
        assert dense_reduction_spec(seg) == {"method": "tome", "r": 6, "schedule": "constant", "prop_attn": True,
                                             "restore": {"name": "reactivate", "blocks": 1}}
        assert not torch.allclose(seg(x), ref, atol=1e-4)
        apply_dense_reduction(seg, {"method": "evit", "keep_rate": 0.7})
        assert dense_reduction_spec(seg)["restore"] == "keep" and dense_reduction_spec(seg)["keep_rate"] == 0.7
        apply_dense_reduction(seg, "none")
        assert dense_reduction_spec(seg) is None and torch.equal(seg(x), ref)


@pytest.mark.parametrize("reduction,restore,message", [
    ("evit:1.5", None, "1.5"), ("evit:0", None, "0"), ("tome:-1", None, "-1"), ("tome:abc", None, "abc"),
    ("evit:0.5,0.7", None, "one strength"), ("nope:3", None, "nope"), ("evit:0.5", "unmerge", "unmerge"),
    ("tome:4", "fused", "fused"), ("evit:0.5", "bogus", "bogus"), ("evit:0.5", "reactivate:2", "reactivate:2"),
    ("tome:4", {"name": "reactivate", "blocks": 6}, "reactivate:6"), ("evit:0.5", "keep:2", "keep:2"),
    ("evit:0.5", "reactivate:0", "reactivate:0"), (None, "keep", "needs a reduction"),
])
def test_bad_values_are_one_line_errors(reduction, restore, message):
    with pytest.raises(LeanvitError, match=message) as e:
        backbone(reduction=reduction, restore=restore)
    assert "\n" not in str(e.value)


def test_failed_switch_leaves_the_model_as_it_was():
    bb = backbone(reduction="evit:0.5")
    with pytest.raises(LeanvitError):
        bb.set_reduction("tome:4", "keep")
    assert dense_reduction_spec(bb)["method"] == "evit" and bb.restoration().name == "keep"


def test_hierarchical_backbones_refuse_a_reduction():
    with pytest.raises(LeanvitError, match="plain ViT"):
        create_backbone("shunted_t", reduction="evit:0.7", depths=[1, 1, 1, 1], embed_dims=[64, 64, 128, 128],
                        num_heads=[2, 2, 4, 4], mlp_ratios=[4, 4, 4, 4])
    assert parse_restore("reactivate:3").blocks == 3


def test_mapping_with_restore_and_strength_knob_reaches_the_vit():
    """As recipes and checkpoints write it; the engine's schedule sets the knob on the whole model."""
    from leanvit.reduction import get_reduction
    seg = create_segmenter("linear" if "linear" in leanvit.dense.SEGMENTERS else "upernet", "deit_small_patch16_224",
                           3, reduction={"method": "tome", "r": 4, "restore": {"name": "reactivate", "blocks": 2},
                                         "start_epoch": 0, "epochs": 1}, **VIT)
    assert dense_reduction_spec(seg)["restore"] == {"name": "reactivate", "blocks": 2}
    tome = get_reduction("tome")
    tome.set_strength(seg, 2)
    assert tome.get_strength(seg) == 2 and seg.backbone.vit.r_per_block == (2,) * 6
    with pytest.raises(LeanvitError, match="no evit"):
        get_reduction("evit").set_strength(seg, 0.5)
