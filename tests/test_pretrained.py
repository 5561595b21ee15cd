"""Pretrained weights through timm's own machinery, save_for_hf / local-dir round trips, pickling and
feature extraction of the registered models (evit_*, shunted_*). No network: files and a replaced hub."""
import argparse
import json
import pickle

import pytest
import timm
import timm.models._builder as timm_builder
import torch

import leanvit
from leanvit.errors import LeanvitError
from leanvit.reduction.evit import FUSED_TOKEN_ID, apply_evit, is_evit, tokens_to_grid

TINY = dict(embed_dim=48, depth=6, num_heads=2, img_size=32, num_classes=10)


def _same_weights(model, state_dict):
    own = model.state_dict()
    assert set(own) == set(state_dict)
    for k, v in state_dict.items():
        assert torch.equal(own[k], v), k


@pytest.fixture(scope="module")
def deit_small_file(tmp_path_factory):
    """A DeiT-S state dict (random weights, timm layout) saved the way timm's hub files are."""
    torch.manual_seed(1)
    sd = timm.create_model("deit_small_patch16_224").state_dict()
    path = tmp_path_factory.mktemp("w") / "deit_small_state_dict.pth"
    torch.save(sd, path)
    return path, sd


def test_evit_pretrained_from_file_is_deit_small_with_evit(deit_small_file):
    path, sd = deit_small_file
    model = timm.create_model("evit_deit_small_patch16_224", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert is_evit(model) and model.keep_rate == 0.7 and model.evit_locations == (3, 6, 9)
    _same_weights(model, sd)
    deit = apply_evit(timm.create_model("deit_small_patch16_224").eval(), keep_rate=0.7)
    deit.load_state_dict(sd)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), deit(x))
    assert model.pretrained_cfg["architecture"] == "evit_deit_small_patch16_224"
    assert model.pretrained_cfg["file"] == str(path)


def test_evit_plain_pretrained_goes_through_timm_hub_download(monkeypatch, deit_small_file):
    """pretrained=True asks timm's hub loader for the parent's weights (replaced here by a local file)."""
    path, sd = deit_small_file
    asked = []

    def fake_hub(hub_id, *args, **kwargs):
        asked.append(hub_id)
        return torch.load(path, weights_only=True)

    monkeypatch.setattr(timm_builder, "load_state_dict_from_hf", fake_hub)
    model = timm.create_model("evit_deit_small_patch16_224", pretrained=True, keep_rate=0.5)
    assert asked == ["timm/deit_small_patch16_224.fb_in1k"]
    assert is_evit(model) and model.keep_rate == 0.5
    _same_weights(model, sd)
    # timm's own semantics: a new classifier size drops the head, the rest loads
    model10 = timm.create_model("evit_deit_small_patch16_224", pretrained=True, num_classes=10)
    assert model10.head.weight.shape == (10, 384)
    assert torch.equal(model10.blocks[5].mlp.fc1.weight, sd["blocks.5.mlp.fc1.weight"])


def test_evit_pretrained_cfgs_are_their_own():
    names = timm.list_pretrained("evit_*")
    assert "evit_deit_small_patch16_224.fb_in1k" in names
    assert "evit_deit3_small_patch16_224.fb_in22k_ft_in1k" in names
    for name in names:
        cfg = timm.models.get_pretrained_cfg(name)
        arch, _, tag = name.partition(".")
        parent = timm.models.get_pretrained_cfg(arch[len("evit_"):] + "." + tag)
        assert cfg.architecture == arch
        assert cfg.hf_hub_id == parent.hf_hub_id and cfg.hf_hub_id.startswith("timm/deit")
        for key in ("mean", "std", "crop_pct", "input_size", "interpolation", "url"):
            assert getattr(cfg, key) == getattr(parent, key), (name, key)
    # the default tag is the parent's default
    assert timm.models.get_pretrained_cfg("evit_deit3_small_patch16_224").tag == \
        timm.models.get_pretrained_cfg("deit3_small_patch16_224").tag


def test_evit_deit3_official_layout_file(tmp_path):
    """An official DeiT III training file ({'model', 'args'}, gamma_1/gamma_2) through pretrained_cfg_overlay."""
    src = timm.create_model("deit3_small_patch16_224", **TINY)
    sd = src.state_dict()
    official = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v for k, v in sd.items()}
    path = tmp_path / "deit_3_small_224_1k.pth"
    torch.save({"model": official, "args": argparse.Namespace(lr=1e-3)}, path)
    model = timm.create_model("evit_deit3_small_patch16_224", pretrained=True, keep_rate=0.6,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=10), **TINY)
    _same_weights(model, sd)
    assert model.keep_rate == 0.6


def test_shunted_pretrained_file_and_clear_error_without(tmp_path):
    with pytest.raises(LeanvitError, match=r"Google Drive.*Baidu"):
        timm.create_model("shunted_t", pretrained=True)
    src = timm.create_model("shunted_t", num_classes=7)
    sd = src.state_dict()
    path = tmp_path / "ckpt_T.pth"
    torch.save({"model": {"module." + k: v for k, v in sd.items()}}, path)  # official wrapper + DDP prefix
    model = timm.create_model("shunted_t", pretrained=True, num_classes=7,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=7))
    _same_weights(model, sd)
    # towhee-style names map back
    towhee = {k.replace(".mlp.dwconv.dwconv.", ".mlp.dwconv."): v for k, v in sd.items()}
    torch.save(towhee, tmp_path / "towhee.pth")
    model = timm.create_model("shunted_t", pretrained=True, num_classes=7,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "towhee.pth"), num_classes=7))
    _same_weights(model, sd)


@pytest.mark.parametrize("rate", [0.6, (1.0, 0.5)])
def test_evit_save_for_hf_local_dir_round_trip(tmp_path, rate):
    model = timm.create_model("evit_deit_tiny_patch16_224", img_size=32, num_classes=5, locations=(1, 4)).eval()
    model.keep_rate = rate  # changed after creation: the saved config has the current value
    timm.models.save_for_hf(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architecture"] == "evit_deit_tiny_patch16_224"
    assert cfg["model_args"]["keep_rate"] == (list(rate) if isinstance(rate, tuple) else rate)
    assert cfg["model_args"]["locations"] == [1, 4]
    back = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert is_evit(back) and back.keep_rate == rate and back.evit_locations == (1, 4)
    _same_weights(back, model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_shunted_save_for_hf_local_dir_round_trip(tmp_path):
    model = timm.create_model("shunted_t", num_classes=4, img_size=64).eval()
    timm.models.save_for_hf(model, tmp_path)
    back = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    _same_weights(back, model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_evit_model_pickles():
    model = timm.create_model("evit_deit_tiny_patch16_224", img_size=32, num_classes=3, keep_rate=0.5).eval()
    x = torch.randn(2, 3, 32, 32)
    back = pickle.loads(pickle.dumps(model))
    assert type(back) is type(model) and back.keep_rate == 0.5
    assert type(back.blocks[3]) is type(model.blocks[3])
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
        back.keep_rate = 1.0
        plain = leanvit.reduction.remove_reduction(back)
        assert not is_evit(plain) and plain(x).shape == (2, 3)


def test_features_only_and_forward_intermediates_defaults():
    torch.manual_seed(3)
    model = timm.create_model("evit_deit_tiny_patch16_224", img_size=32, keep_rate=0.5, locations=(2, 4),
                              embed_dim=48, depth=6, num_heads=2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert len(inter) == 6 and all(t.shape == (2, 48, 2, 2) for t in inter)
        assert torch.equal(final, model.forward_features(x))
        # blocks before the first reorganization: exactly the plain ViT's maps
        plain = leanvit.reduction.remove_reduction(pickle.loads(pickle.dumps(model)))
        want = plain.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        torch.testing.assert_close(inter[0], want[0], rtol=0, atol=0)
        torch.testing.assert_close(inter[1], want[1], rtol=0, atol=0)
        # later blocks: kept tokens at their patches, the other patches hold the fused token
        tokens = model.forward_intermediates(x, indices=[2], output_fmt="NLC", intermediates_only=True)[0]
        _, kept = model(x, return_kept_indices=True)
        grid = inter[2].flatten(2).transpose(1, 2)  # (B, 4, C)
        for b in range(2):
            ids = kept[0][b].tolist()
            assert ids[-1] == FUSED_TOKEN_ID and len(ids) == 3
            for pos, pid in enumerate(ids[:-1]):
                assert torch.equal(grid[b, pid], tokens[b, pos])
            for pid in set(range(4)) - set(ids):
                assert torch.equal(grid[b, pid], tokens[b, -1])
        torch.manual_seed(3)  # the same initial weights as ``model``
        feats = timm.create_model("evit_deit_tiny_patch16_224", img_size=32, keep_rate=0.5, locations=(2, 4),
                                  embed_dim=48, depth=6, num_heads=2, features_only=True, out_indices=(1, 3))
        out = feats.eval()(x)
        assert [t.shape for t in out] == [(2, 48, 2, 2)] * 2
        assert feats.model.evit_locations == (2,)  # block 4 was pruned with its reorganization
        torch.testing.assert_close(out[0], inter[1], rtol=0, atol=0)
        torch.testing.assert_close(out[1], inter[3], rtol=0, atol=0)


def test_tokens_to_grid_drop_mode_zeros():
    tokens = torch.arange(6.0).reshape(1, 2, 3)
    ids = torch.tensor([[3, 0]])
    grid = tokens_to_grid(tokens, ids, 4, fuse=False)
    assert torch.equal(grid[0, 3], tokens[0, 0]) and torch.equal(grid[0, 0], tokens[0, 1])
    assert grid[0, 1].abs().sum() == 0 and grid[0, 2].abs().sum() == 0
    fused = tokens_to_grid(tokens, torch.tensor([[3, FUSED_TOKEN_ID]]), 4, fuse=True)
    assert torch.equal(fused[0, 0], tokens[0, 1]) and torch.equal(fused[0, 3], tokens[0, 0])
