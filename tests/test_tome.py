"""ToMe token merging: exactness at r=0, semantics against a per-sample explicit reference, bookkeeping."""
import copy

import pytest
import timm
import torch

import leanvit
from leanvit import LeanvitError
from leanvit.reduction import applied_reduction, get_reduction, parse_reduction_spec
from leanvit.reduction.tome import (
    apply_tome,
    bipartite_soft_matching,
    decreasing_schedule,
    is_tome,
    map_groups,
    merge_tokens,
    remove_tome,
    tokens_per_block,
    unmerge,
)

IMG = 32


def tiny_vit(name="deit_small_patch16_224", **kw):
    args = dict(img_size=IMG, patch_size=4, embed_dim=48, depth=6, num_heads=3, num_classes=7)
    args.update(kw)
    return timm.create_model(name, **args).eval()


VARIANTS = {
    "deit": lambda: tiny_vit("deit_small_patch16_224"),
    "deit3": lambda: tiny_vit("deit3_small_patch16_224", init_values=0.5),
    "registers": lambda: tiny_vit("vit_small_patch16_224", reg_tokens=4, init_values=0.3),
    "distilled": lambda: tiny_vit("deit_small_distilled_patch16_224"),
    "gap": lambda: tiny_vit("vit_small_patch16_224", class_token=False, global_pool="avg"),
}


def reference_tome_forward(model, x, r):
    """The published algorithm (facebookresearch/ToMe, tome/merge.py + tome/patch/timm.py) written out per
    sample with Python lists: explicit softmax with + log(size) on the keys, keys averaged over heads as
    the metric, the *whole* sequence split alternately into A (even positions) and B (odd), prefix tokens
    in A protected by a -inf row and those in B by a -inf column, the r best A->B edges merged by
    size-weighted averages; the new sequence is the prefix tokens, the unmerged A tokens (in original
    order when there are prefix tokens, in score order otherwise), then the B tokens."""
    P = model.num_prefix_tokens
    outs = []
    for xi in x:
        t = model.norm_pre(model._pos_embed(model.patch_embed(xi[None])))[0]
        s = torch.ones(t.shape[0])
        for bi, blk in enumerate(model.blocks):
            a = blk.attn
            h = blk.norm1(t)
            N = h.shape[0]
            qkv = a.qkv(h).reshape(N, 3, a.num_heads, a.head_dim).permute(1, 2, 0, 3)
            q, k, v = a.q_norm(qkv[0]), a.k_norm(qkv[1]), qkv[2]
            logits = (q @ k.transpose(-1, -2)) * a.head_dim ** -0.5 + s.log()[None, None, :]
            o = (logits.softmax(-1) @ v).transpose(0, 1).reshape(N, -1)
            t = t + blk.ls1(a.proj(o))
            rr = min(r[bi] if isinstance(r, (list, tuple)) else r, (N - P) // 2)
            if rr > 0:
                m = k.mean(0)
                m = m / m.norm(dim=-1, keepdim=True)
                A, Bs = list(range(0, N, 2)), list(range(1, N, 2))
                sim = m[A] @ m[Bs].T
                for i, pos in enumerate(A):
                    if pos < P:
                        sim[i, :] = -float("inf")
                for j, pos in enumerate(Bs):
                    if pos < P:
                        sim[:, j] = -float("inf")
                best, partner = sim.max(-1)
                order = sorted(range(len(A)), key=lambda i: -best[i].item())
                keep = order[rr:]
                if P:
                    keep = sorted(keep)
                num = {j: t[Bs[j]] * s[Bs[j]] for j in range(len(Bs))}
                den = {j: s[Bs[j]].clone() for j in range(len(Bs))}
                for i in order[:rr]:
                    j = partner[i].item()
                    assert A[i] >= P and Bs[j] >= P  # prefix tokens are never merged
                    num[j] = num[j] + t[A[i]] * s[A[i]]
                    den[j] = den[j] + s[A[i]]
                rows = [t[A[i]] for i in keep if A[i] >= P] + [num[j] / den[j] for j in range(len(Bs)) if Bs[j] >= P]
                sizes = [s[A[i]] for i in keep if A[i] >= P] + [den[j] for j in range(len(Bs)) if Bs[j] >= P]
                t = torch.cat([t[:P], torch.stack(rows)])
                s = torch.cat([s[:P], torch.stack(sizes)])
            t = t + blk.ls2(blk.mlp(blk.norm2(t)))
        t = model.norm(t)[None]
        if model.global_pool == "avg":
            w = s[P:, None]
            pooled = (t[0, P:] * w).sum(0, keepdim=True) / w.sum()
            outs.append(model.head(model.fc_norm(pooled))[0])
        else:
            outs.append(model.forward_head(t)[0])
    return torch.stack(outs)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_r0_is_exactly_the_original(variant):
    model = VARIANTS[variant]()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        ref = model(x)
        tome = leanvit.apply_reduction(copy.deepcopy(model), "tome", r=0)
        assert is_tome(tome)
        assert torch.equal(tome(x), ref)
        assert torch.equal(apply_tome(copy.deepcopy(model), r=8)(x, r=0), ref)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_per_sample_reference(variant):
    model = VARIANTS[variant]()
    x = torch.randn(3, 3, IMG, IMG)
    tome = apply_tome(copy.deepcopy(model), r=9)
    with torch.no_grad():
        got = tome(x)
        ref = reference_tome_forward(model, x, 9)
        assert not torch.allclose(got, model(x), atol=1e-3)  # merging changes the result
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


def test_sdpa_path_equals_explicit_softmax_path():
    model = apply_tome(tiny_vit("deit3_small_patch16_224", init_values=0.5), r=10)
    explicit = copy.deepcopy(model)
    for blk in explicit.blocks:
        blk.attn.fused_attn = False
    assert all(b.attn.fused_attn for b in model.blocks)
    x = torch.randn(4, 3, IMG, IMG)
    with torch.no_grad():
        a, b = model(x), explicit(x)
    assert (a - b).abs().max().item() < 1e-5


def test_sdpa_gets_log_size_as_float_mask(monkeypatch):
    model = apply_tome(tiny_vit(), r=8)
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(None if attn_mask is None else (attn_mask.dtype, tuple(attn_mask.shape)))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        model(torch.randn(2, 3, IMG, IMG))
    assert seen[0] is None  # nothing merged before the first block
    assert all(s is not None and s[0] == torch.float32 and s[1][1:3] == (1, 1) for s in seen[1:])
    assert len(seen) == len(model.blocks)


@pytest.mark.parametrize("r", [3, 8, 100, [0, 20, 5, 0, 40, 2]])
def test_token_counts_follow_the_rule(r):
    model = apply_tome(tiny_vit(depth=6), r=r)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        feats, groups = model.forward_features(x, return_groups=True)
    rs = model.r_per_block
    expected = tokens_per_block(64, rs)
    assert feats.shape[1] == 1 + expected[-1]
    for i, g in enumerate(groups):
        n_in, n_out = expected[i], expected[i + 1]
        assert n_in - n_out == min(rs[i], n_in // 2)  # r fewer, at most half of the mergeable tokens
        for row in g:
            assert sorted(row.unique().tolist()) == list(range(n_out))  # every token holds >= 1 patch


def test_prefix_tokens_never_merged_and_sizes_add_up():
    model = apply_tome(tiny_vit("vit_small_patch16_224", reg_tokens=4, init_values=0.3), r=12)
    P = model.num_prefix_tokens
    assert P == 5
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        feats, size, _ = model._tome_features(x)
    assert torch.equal(size[:, :P], torch.ones(2, P, 1))
    assert torch.equal(size[:, P:].sum(dim=(1, 2)), torch.full((2,), 64.0))
    # the matching and merging primitives leave the prefix rows untouched
    t = torch.randn(2, P + 10, 6)
    plan = bipartite_soft_matching(torch.randn(2, P + 10, 4), 5, P)
    out, s = merge_tokens(t, None, plan)
    assert torch.equal(out[:, :P], t[:, :P]) and out.shape[1] == P + 5


def test_identical_tokens_are_merged_first():
    x = torch.randn(1, 1 + 8, 4)
    metric = torch.randn(1, 9, 4)  # the whole sequence: class token at 0 (set A), A = 0,2,..,8, B = 1,3,5,7
    metric[0, 4] = metric[0, 7] * 3.0  # A token 2 (position 4) points the same way as B token 3 (position 7)
    plan = bipartite_soft_matching(metric, 1, 1)
    assert plan.src.tolist() == [[2]] and plan.dst.tolist() == [[3]]
    assert plan.unm[0, 0].item() == 0  # the class token stays first
    size = torch.tensor([[1.0, 1, 1, 1, 2, 1, 1, 3, 1]]).unsqueeze(-1)
    out, s = merge_tokens(x, size, plan)
    merged = (x[0, 4] * 2 + x[0, 7] * 3) / 5  # size-weighted average of positions 4 (A2) and 7 (B3)
    assert torch.allclose(out[0, -1], merged, atol=1e-6) and s[0, -1, 0].item() == 5
    assert torch.equal(out[0, 0], x[0, 0])
    # the unmerged A tokens (positions 2, 6, 8) in original order, then the B tokens (1, 3, 5, 7)
    assert torch.equal(out[0, 1:4], x[0, [2, 6, 8]]) and torch.equal(out[0, 4:7], x[0, [1, 3, 5]])
    groups = map_groups(torch.arange(8)[None], plan, 9)
    assert groups[0, 3].item() == groups[0, 6].item() == 6  # patches at positions 4 and 7: the last token
    assert torch.equal(unmerge(out[:, 1:], groups)[0, 3], out[0, -1])


def test_protected_prefix_tokens_in_both_sets():
    """With a class token and a distillation token (or registers), a prefix token in set B is never a merge
    target, one in set A never merged away, even when it is the most similar token of all."""
    P = 3  # class token (A), register (B), register (A)
    metric = torch.randn(2, P + 12, 8)
    metric[:, 4::2] = metric[:, 1:2] * 2.0   # every non-prefix A token points at the register in B
    metric[:, 2] = metric[:, 3] * 2.0       # the register in A looks like the patch at position 3
    plan = bipartite_soft_matching(metric, 6, P)
    assert (plan.dst >= 1).all() and (plan.src >= 2).all()  # neither B index 0 nor A indices 0, 1
    assert plan.unm[:, :2].tolist() == [[0, 1], [0, 1]]
    x = torch.randn(2, P + 12, 5)
    out, size = merge_tokens(x, None, plan)
    assert torch.equal(out[:, :P], x[:, :P]) and torch.equal(size[:, :P], torch.ones(2, P, 1))
    assert torch.equal(size[:, P:].sum(dim=(1, 2)), torch.full((2,), 12.0))


def test_apply_remove_round_trip_and_switching_methods():
    model = tiny_vit("deit3_small_patch16_224", init_values=0.5)
    keys = list(model.state_dict())
    cls, blk_cls = type(model), type(model.blocks[0])
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        ref = model(x)
        leanvit.apply_reduction(model, "tome", r=8)
        assert applied_reduction(model).name == "tome" and list(model.state_dict()) == keys
        assert leanvit.reduction.reduction_spec(model) == {"method": "tome", "r": 8, "schedule": "constant",
                                                           "prop_attn": True}
        leanvit.apply_reduction(model, "evit", keep_rate=0.7)  # switching removes ToMe first
        assert applied_reduction(model).name == "evit" and not is_tome(model)
        leanvit.apply_reduction(model, "tome", r=4)
        remove_tome(model)
        assert type(model) is cls and all(type(b) is blk_cls for b in model.blocks)
        assert torch.equal(model(x), ref)


def test_strength_knob_schedule_and_errors():
    method = get_reduction("tome")
    assert (method.knob, method.none_value) == ("r", 0)
    m, values = parse_reduction_spec("tome:0,4,8")
    assert m is method and values == [0, 4, 8]
    with pytest.raises(LeanvitError, match="integer >= 0"):  # the knob's range, not "cannot read"
        parse_reduction_spec("tome:1.5")
    model = apply_tome(tiny_vit(depth=6), r=[1, 2, 3, 4, 5, 6])
    assert model.r_per_block == (1, 2, 3, 4, 5, 6)
    method.set_strength(model, 3)
    assert model.r_per_block == (3,) * 6 and method.get_strength(model) == 3
    for bad in (-1, 2.5, "x", [1, 2]):
        with pytest.raises(LeanvitError):
            method.set_strength(model, bad)
    assert decreasing_schedule(8, 5) == (16, 12, 8, 4, 0)
    dec = apply_tome(tiny_vit(depth=6), r=6, schedule="decreasing")
    assert dec.r_per_block[0] == 12 and dec.r_per_block[-1] == 0 and dec.r == 6
    assert method.schedule(0, 12, 0, 10) == 0 and method.schedule(5, 12, 0, 10) == 6
    assert method.schedule(10, 12, 0, 10) == 12
    with pytest.raises(LeanvitError, match="timm VisionTransformer"):
        apply_tome(torch.nn.Linear(2, 2))


def test_gmacs_drop_and_reduced_view():
    from leanvit.measure.benchmark import ReducedView
    model = tiny_vit()
    base = leanvit.gmacs(model, IMG)
    tome = apply_tome(copy.deepcopy(model), r=0)
    assert leanvit.gmacs(tome, IMG) == pytest.approx(base)
    g8 = leanvit.gmacs(tome, IMG, r=8)
    assert g8 < 0.75 * base
    view = ReducedView(tome, get_reduction("tome"), 8)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        assert torch.equal(view(x), tome(x, r=8))
    assert tome.r == 0  # the per-call override leaves the model's own r alone


def test_trains_with_gradients_in_train_mode():
    model = apply_tome(tiny_vit("deit3_small_patch16_224", init_values=0.5, drop_path_rate=0.1), r=8).train()
    model.set_grad_checkpointing(True)
    loss = model(torch.randn(4, 3, IMG, IMG)).logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and all(torch.isfinite(g).all() for g in grads)


def test_tome_models_pickle():
    """ToMe's classes are made at run time, like EViT's: pickling (torch.save(model), spawn workers)
    records the timm class and the mixin and rebuilds the same class."""
    import pickle

    torch.manual_seed(0)
    model = apply_tome(timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8).eval(), r=2)
    again = pickle.loads(pickle.dumps(model))
    assert type(again) is type(model) and type(again.blocks[0]) is type(model.blocks[0])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    assert again.r == 2


def test_switching_methods_undoes_the_previous_one():
    torch.manual_seed(0)
    base = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8).eval()
    model = apply_tome(copy.deepcopy(base), r=2)
    leanvit.apply_evit(model, keep_rate=0.5)
    assert not is_tome(model) and not any(is_tome(b) or "ToMe" in type(b).__name__ for b in model.blocks)
    want = leanvit.apply_evit(copy.deepcopy(base), keep_rate=0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), want(x))


def test_row_helpers_equal_gather_and_scatter_with_gradients():
    """leanvit.reduction.rows reads / writes whole rows through a flat (B * N, C) table: the same numbers
    and gradients as gather / scatter / scatter_add_ with an index expanded over the channels."""
    from leanvit.reduction.rows import add_rows_, put_rows, put_rows_, take_rows

    torch.manual_seed(0)
    B, N, C, M = 3, 11, 5, 4
    x = torch.randn(B, N, C, requires_grad=True)
    src = torch.randn(B, M, C, requires_grad=True)
    index = torch.stack([torch.randperm(N)[:M] for _ in range(B)])   # distinct rows per sample
    repeated = torch.randint(0, N, (B, M))                            # rows that may repeat (adds)
    wide = lambda i: i.unsqueeze(-1).expand(-1, -1, C)  # noqa: E731

    def check(ours, reference):
        got, want = ours(), reference()
        assert torch.allclose(got, want, atol=1e-6)
        w = torch.randn_like(want)
        g_ours = torch.autograd.grad((got * w).sum(), (x, src), allow_unused=True)
        g_ref = torch.autograd.grad((want * w).sum(), (x, src), allow_unused=True)
        for a, b in zip(g_ours, g_ref):
            assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6)

    check(lambda: take_rows(x, index), lambda: x.gather(1, wide(index)))
    check(lambda: put_rows(x, index, src), lambda: x.scatter(1, wide(index), src))
    check(lambda: put_rows_(x.clone(), index, src), lambda: x.clone().scatter_(1, wide(index), src))
    check(lambda: add_rows_(x.clone(), repeated, src), lambda: x.clone().scatter_add_(1, wide(repeated), src))
    assert take_rows(x, index[:, :0]).shape == (B, 0, C)


def test_a_merge_count_no_block_reaches_is_refused_where_it_would_be_recorded():
    """build_model (eval, bench, sweep, viz, export) refuses a ToMe r above half of the patch tokens: the model
    would clamp it at run time and the results would name a configuration that never ran."""
    from leanvit.models.build import build_model
    with pytest.raises(LeanvitError, match="tome:999 merges more tokens than a block has.*at most 2 per block"):
        build_model("test_vit", reduction="tome:999", img_size=32, num_classes=3)
    assert build_model("test_vit", reduction="tome:2", img_size=32, num_classes=3).model.r == 2
