"""Shunted Transformer: official layout and counts, GMACs, SDPA vs explicit softmax vs a literal
transcription of the official forward, input sizes, timm backbone API, checkpointing, compile, checkpoints."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import leanvit
from leanvit import LeanvitError
from leanvit.models.shunted import ShuntedAttention, ShuntedTransformer, min_input_size, set_fused_attn, stage_grids

LAYOUT = json.loads((Path(__file__).parent / "data" / "shunted_layout.json").read_text())
NAMES = ["shunted_t", "shunted_s", "shunted_b"]
ENTRIES = {"shunted_t": 260, "shunted_s": 596, "shunted_b": 1010}
PARAMS = {"shunted_t": 11_553_576, "shunted_s": 22_401_256, "shunted_b": 39_614_376}
GMACS = {"shunted_t": 2.15, "shunted_s": 4.99, "shunted_b": 8.15}


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def randomize_norms(model):
    """Non-trivial LayerNorm/BN parameters and BN statistics, so that the checks see them."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.5 * torch.rand(m.running_var.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return randomize_norms(timm.create_model("shunted_t")).eval()


# ---------------------------------------------------------------------------------------------
# Registry, layout, counts
def test_registered_with_timm_and_kwargs():
    for name in NAMES:
        assert timm.is_model(name)
    m = timm.create_model("shunted_s", num_classes=7, drop_path_rate=0.2, img_size=(256, 320), in_chans=1)
    assert isinstance(m, ShuntedTransformer)
    assert m.head.out_features == 7 and m.patch_embed1.conv[0].in_channels == 1
    assert m.img_size == (256, 320) and m.pretrained_cfg["input_size"] == (1, 256, 320)
    rates = [getattr(blk.drop_path, "drop_prob", 0.0) for i in range(1, 5) for blk in getattr(m, f"block{i}")]
    assert rates[-1] == pytest.approx(0.2) and len(rates) == 19 and rates == sorted(rates)
    with torch.no_grad():
        assert m.eval()(torch.randn(1, 1, 64, 96)).shape == (1, 7)
    assert leanvit.create_model("shunted_t", img_size=96).img_size == (96, 96)


def test_pretrained_true_points_to_load_checkpoint():
    with pytest.raises(LeanvitError, match=r"Google Drive.*leanvit\.load_checkpoint"):
        timm.create_model("shunted_t", pretrained=True)


def test_default_cfg_and_no_weight_decay(tiny):
    cfg = tiny.default_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD
    assert cfg["classifier"] == "head" and cfg["first_conv"] == "patch_embed1.conv.0"
    nwd = tiny.no_weight_decay()
    assert isinstance(nwd, set) and all(n in dict(tiny.named_parameters()) for n in nwd)
    from timm.optim import create_optimizer_v2

    create_optimizer_v2(tiny, "adamw", lr=1e-3, weight_decay=0.05)  # uses no_weight_decay


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_layout_and_param_count_match_official(name):
    m = timm.create_model(name)
    sd = m.state_dict()
    ref = LAYOUT[name]
    assert len(sd) == len(ref) == ENTRIES[name]
    assert list(sd) == list(ref)  # same names, same order
    bad = [k for k in ref if list(sd[k].shape) != ref[k]]
    assert not bad, bad[:5]
    assert sum(p.numel() for p in m.parameters()) == PARAMS[name]


def test_norm_eps_as_official(tiny):
    assert tiny.block1[0].norm1.eps == 1e-6 and tiny.norm4.eps == 1e-6
    assert tiny.patch_embed1.norm.eps == 1e-5 and tiny.patch_embed2.norm.eps == 1e-5
    assert tiny.block1[0].attn.norm1.eps == 1e-5 and tiny.block3[0].attn.norm2.eps == 1e-5


# ---------------------------------------------------------------------------------------------
# GMACs
@pytest.mark.parametrize("name", NAMES)
def test_gmacs_at_224(name):
    m = timm.create_model(name)
    g = leanvit.gmacs(m, 224)
    assert g == pytest.approx(GMACS[name], rel=0.02)
    if name == "shunted_t":
        set_fused_attn(m, False)  # the SDPA kernels are counted like the explicit matmuls
        assert leanvit.gmacs(m, 224) == pytest.approx(g, rel=1e-9)


def test_flops_cli_shunted():
    r = subprocess.run([sys.executable, "-m", "leanvit.cli", "flops", "shunted_t"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "2.15 GMACs" in r.stdout and "11.55M params" in r.stdout and "224x224" in r.stdout


# ---------------------------------------------------------------------------------------------
# Attention: SDPA vs explicit vs a literal transcription of the official code
def official_attention(a: ShuntedAttention, x, H, W):
    """The official ``Attention.forward`` (SSA.py), reshapes and all, on ``a``'s weights."""
    B, N, C = x.shape
    nh = a.num_heads
    q = a.q(x).reshape(B, N, nh, C // nh).permute(0, 2, 1, 3)
    if a.sr_ratio > 1:
        x_ = x.permute(0, 2, 1).reshape(B, C, H, W)
        x_1 = a.act(a.norm1(a.sr1(x_).reshape(B, C, -1).permute(0, 2, 1)))
        x_2 = a.act(a.norm2(a.sr2(x_).reshape(B, C, -1).permute(0, 2, 1)))
        kv1 = a.kv1(x_1).reshape(B, -1, 2, nh // 2, C // nh).permute(2, 0, 3, 1, 4)
        kv2 = a.kv2(x_2).reshape(B, -1, 2, nh // 2, C // nh).permute(2, 0, 3, 1, 4)
        k1, v1 = kv1[0], kv1[1]
        k2, v2 = kv2[0], kv2[1]
        attn1 = ((q[:, :nh // 2] @ k1.transpose(-2, -1)) * a.scale).softmax(dim=-1)
        v1 = v1 + a.local_conv1(
            v1.transpose(1, 2).reshape(B, -1, C // 2).transpose(1, 2).view(B, C // 2, H // a.sr_ratio, W // a.sr_ratio)
        ).view(B, C // 2, -1).view(B, nh // 2, C // nh, -1).transpose(-1, -2)
        x1 = (attn1 @ v1).transpose(1, 2).reshape(B, N, C // 2)
        attn2 = ((q[:, nh // 2:] @ k2.transpose(-2, -1)) * a.scale).softmax(dim=-1)
        v2 = v2 + a.local_conv2(
            v2.transpose(1, 2).reshape(B, -1, C // 2).transpose(1, 2)
            .view(B, C // 2, H * 2 // a.sr_ratio, W * 2 // a.sr_ratio)
        ).view(B, C // 2, -1).view(B, nh // 2, C // nh, -1).transpose(-1, -2)
        x2 = (attn2 @ v2).transpose(1, 2).reshape(B, N, C // 2)
        out = torch.cat([x1, x2], dim=-1)
    else:
        kv = a.kv(x).reshape(B, -1, 2, nh, C // nh).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        attn = ((q @ k.transpose(-2, -1)) * a.scale).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(B, N, C) + a.local_conv(
            v.transpose(1, 2).reshape(B, N, C).transpose(1, 2).view(B, C, H, W)).view(B, C, N).transpose(1, 2)
    return a.proj(out)


def official_forward(m: ShuntedTransformer, x):
    """The official ``ShuntedTransformer.forward`` (stem ``Head``, blocks, stage norms, token mean, head)."""
    B = x.shape[0]
    for i in range(4):
        x, H, W = getattr(m, f"patch_embed{i + 1}")(x)
        for blk in getattr(m, f"block{i + 1}"):
            x = x + official_attention(blk.attn, blk.norm1(x), H, W)
            h = blk.mlp.fc1(blk.norm2(x))
            h = F.gelu(h + blk.mlp.dwconv.dwconv(h.transpose(1, 2).view(B, -1, H, W)).flatten(2).transpose(1, 2))
            x = x + blk.mlp.fc2(h)
        x = getattr(m, f"norm{i + 1}")(x)
        if i != 3:
            x = x.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()
    return m.head(x.mean(dim=1))


@pytest.mark.parametrize("size", [(64, 64), (72, 100), (224, 224)])
def test_matches_official_forward_both_paths(tiny, size):
    x = torch.randn(2 if size[0] < 224 else 1, 3, *size)
    with torch.no_grad():
        ref = official_forward(tiny, x)
        fused = tiny(x)
        explicit = set_fused_attn(copy.deepcopy(tiny), False)(x)
    assert rel_err(fused, explicit) <= 1e-5
    assert rel_err(explicit, ref) <= 1e-5
    assert rel_err(fused, ref) <= 1e-5


def test_sdpa_vs_explicit_shunted_s_and_attention_layers():
    torch.manual_seed(0)
    m = randomize_norms(timm.create_model("shunted_s", fused_attn=True)).eval()
    assert all(a.fused_attn for a in m.modules() if isinstance(a, ShuntedAttention))
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        fused = m(x)
        m.set_fused_attn(False)
        assert not any(a.fused_attn for a in m.modules() if isinstance(a, ShuntedAttention))
        explicit = m(x)
    assert rel_err(fused, explicit) <= 1e-5
    for sr, dim, heads, hw in [(8, 64, 2, (16, 24)), (4, 128, 4, (9, 7)), (2, 256, 8, (5, 3)), (1, 512, 16, (3, 2))]:
        a = ShuntedAttention(dim, heads, sr_ratio=sr).eval()
        t = torch.randn(2, hw[0] * hw[1], dim)
        with torch.no_grad():
            ref = official_attention(a, t, *hw)
            a.fused_attn = True
            out_f = a(t, *hw)
            a.fused_attn = False
            out_e = a(t, *hw)
        assert rel_err(out_f, ref) <= 1e-5 and rel_err(out_e, ref) <= 1e-5, sr
    with pytest.raises(LeanvitError, match="no Shunted attention"):
        set_fused_attn(torch.nn.Linear(2, 2), False)


# ---------------------------------------------------------------------------------------------
# Input sizes
def test_input_sizes(tiny):
    assert min_input_size() == 31
    assert stage_grids(224) == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert stage_grids((256, 320)) == [(64, 80), (32, 40), (16, 20), (8, 10)]
    with torch.no_grad():
        for size in [(224, 224), (256, 320), (512, 512), (64, 64), (31, 31), (97, 130), (33, 47)]:
            assert tiny(torch.randn(1, 3, *size)).shape == (1, 1000), size
        for size in [(64, 64), (31, 31), (97, 130), (33, 47)]:
            feats = tiny.forward_features(torch.randn(1, 3, *size))
            assert feats.shape[-2:] == stage_grids(size)[-1], size


@pytest.mark.parametrize("size", [(30, 30), (16, 16), (64, 30), (29, 224)])
def test_too_small_input_is_a_clear_error(tiny, size):
    with pytest.raises(LeanvitError, match=r"smallest valid input is 31x31") as e:
        tiny(torch.randn(1, 3, *size))
    assert f"{size[0]}x{size[1]}" in str(e.value) and "aggregation rate 8" in str(e.value)
    with pytest.raises(LeanvitError, match="31x31"):
        timm.create_model("shunted_t", img_size=size)
    with pytest.raises(LeanvitError, match="31x31"):
        tiny.forward_intermediates(torch.randn(1, 3, *size))


# ---------------------------------------------------------------------------------------------
# Backbone API
@pytest.mark.parametrize("name", NAMES)
def test_features_only(name):
    torch.manual_seed(0)
    f = timm.create_model(name, features_only=True).eval()
    assert f.feature_info.channels() == [64, 128, 256, 512]
    assert f.feature_info.reduction() == [4, 8, 16, 32]
    x = torch.randn(2, 3, 128, 96)
    with torch.no_grad():
        outs = f(x)
    assert [tuple(o.shape) for o in outs] == [(2, 64, 32, 24), (2, 128, 16, 12), (2, 256, 8, 6), (2, 512, 4, 3)]
    assert not any(k.startswith("head.") for k in f.state_dict())


def test_features_only_out_indices_prunes_later_stages():
    f = timm.create_model("shunted_t", features_only=True, out_indices=(0, 2)).eval()
    assert f.feature_info.channels() == [64, 256]
    assert not any(k.startswith(("block4", "patch_embed4", "norm4")) for k in f.state_dict())
    with torch.no_grad():
        outs = f(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(1, 64, 16, 16), (1, 256, 4, 4)]


def test_forward_intermediates(tiny):
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        final, inter = tiny.forward_intermediates(x)
        assert [tuple(t.shape) for t in inter] == [(2, 64, 24, 16), (2, 128, 12, 8), (2, 256, 6, 4), (2, 512, 3, 2)]
        assert torch.allclose(final, tiny.forward_features(x)) and torch.allclose(final, inter[-1])
        only = tiny.forward_intermediates(x, indices=[1, -1], intermediates_only=True, norm=True)
        assert torch.allclose(only[0], inter[1]) and torch.allclose(only[1], inter[3])
        last2 = tiny.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [t.shape[1] for t in last2] == [256, 512]
        early = tiny.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        assert len(early) == 1 and torch.allclose(early[0], inter[0])
        # the same maps as the features_only wrapper on the same weights
        f = timm.create_model("shunted_t", features_only=True)
        f.model.load_state_dict({k: v for k, v in tiny.state_dict().items() if not k.startswith("head.")})
        for a, b in zip(f.eval()(x), inter):
            assert torch.allclose(a, b)


def test_grad_checkpointing_same_gradients(monkeypatch):
    torch.manual_seed(0)
    m = randomize_norms(timm.create_model("shunted_t", num_classes=10)).train()
    m2 = copy.deepcopy(m)
    m2.set_grad_checkpointing(True)
    import leanvit.models.shunted as mod

    calls = []
    real = mod.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(fn)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(mod, "checkpoint", counting)
    x = torch.randn(2, 3, 64, 64)
    target = torch.tensor([1, 7])
    for model in (m, m2):
        F.cross_entropy(model(x), target).backward()
    assert len(calls) == sum(m.depths) == 8  # one checkpoint per block
    g1 = dict(m.named_parameters())
    for n, p in m2.named_parameters():
        assert torch.allclose(p.grad, g1[n].grad, rtol=1e-4, atol=1e-6), n


def test_reset_classifier_and_forward_head(tiny):
    m = copy.deepcopy(tiny)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = m.forward_features(x)
        assert feats.shape == (2, 512, 2, 2)
        pooled = m.forward_head(feats, pre_logits=True)
        assert pooled.shape == (2, 512) and torch.allclose(pooled, feats.mean(dim=(2, 3)))
        m.reset_classifier(10)
        assert m.get_classifier().out_features == 10 and m(x).shape == (2, 10) and m.num_classes == 10
        m.reset_classifier(0)
        assert torch.allclose(m(x), pooled)
        m.reset_classifier(0, "")
        assert m(x).shape == (2, 512, 2, 2)


# ---------------------------------------------------------------------------------------------
# torch.compile
@pytest.mark.slow
def test_torch_compile_matches_eager():
    """One block per stage covers every kind of Shunted block (multi-scale stages 1-3, plain stage 4) and
    compiles in a third of shunted_t's time."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model("shunted_t", depths=(1, 1, 1, 1))).eval()
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        eager = model(x)
        out = compiled(x)
    assert rel_err(out, eager) <= 1e-4


# ---------------------------------------------------------------------------------------------
# Checkpoints
def test_load_checkpoint_strict_round_trip(tmp_path, tiny):
    path = tmp_path / "ckpt_t.pth"
    torch.save({"model": tiny.state_dict()}, path)  # the official training-script format
    fresh = timm.create_model("shunted_t").eval()
    res = leanvit.load_checkpoint(fresh, path, strict=True)
    assert res.missing_keys == [] and res.unexpected_keys == []
    for k, v in tiny.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), tiny(x))
    # towhee-style names (mlp.dwconv.weight) map back; another variant is a clear error
    renamed = {k.replace("mlp.dwconv.dwconv.", "mlp.dwconv."): v for k, v in tiny.state_dict().items()}
    torch.save(renamed, tmp_path / "towhee.pth")
    leanvit.load_checkpoint(timm.create_model("shunted_t"), tmp_path / "towhee.pth", strict=True)
    with pytest.raises(LeanvitError, match="shape mismatch: head.weight"):
        leanvit.load_checkpoint(timm.create_model("shunted_t", num_classes=5), path, strict=True)
    partial = dict(tiny.state_dict())
    del partial["block4.0.attn.kv.weight"]
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(LeanvitError, match=r"missing keys: block4\.0\.attn\.kv\.weight"):
        leanvit.load_checkpoint(timm.create_model("shunted_t"), tmp_path / "partial.pth", strict=True)
    # fine-tuning to another number of classes
    res = leanvit.load_checkpoint(timm.create_model("shunted_t", num_classes=5), path, ignore_classifier=True)
    assert sorted(res.skipped_keys) == ["head.bias", "head.weight"]


def test_builds_on_the_meta_device():
    """No tensor value is read while building (drop-path rates are plain floats), so the model can be made
    on the meta device, materialized with to_empty() and loaded: the way large models are initialized."""
    torch.manual_seed(0)
    ref = timm.create_model("shunted_t", drop_path_rate=0.1).eval()
    with torch.device("meta"):
        meta = timm.create_model("shunted_t", drop_path_rate=0.1)
    assert all(p.is_meta for p in meta.parameters())
    model = meta.to_empty(device="cpu")
    model.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), ref(x))
