"""Checkpoint loading (formats, official layouts, resampling, errors) and atomic saving."""
import argparse
import os
import pickle

import pytest
import timm
import torch

import leanvit  # noqa: F401  (registers the models with timm)
from leanvit import LeanvitError, load_checkpoint, save_checkpoint
from leanvit.checkpoints import read_state_dict


def small(name="evit_deit3_small_patch16_224", **kw):
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)
    args.update(kw)
    return timm.create_model(name, **args).eval()


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("fmt", ["plain.pth", "wrapped.pth", "weights.safetensors"])
def test_round_trip_formats(tmp_path, fmt):
    src, dst = small(), small()
    assert not same_weights(src, dst)
    path = tmp_path / fmt
    sd = src.state_dict()
    save_checkpoint({"model": sd, "epoch": 3} if fmt.startswith("wrapped") else sd, path)
    load_checkpoint(dst, path)
    assert same_weights(src, dst)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(src(x), dst(x))


def test_official_training_file_with_args_and_ddp_prefix(tmp_path):
    """DeiT/EViT training files: {"model", "optimizer", "epoch", "args": Namespace}; DDP 'module.' keys."""
    src, dst = small("evit_deit_small_patch16_224"), small("evit_deit_small_patch16_224")
    sd = {"module." + k: v for k, v in src.state_dict().items()}
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": sd, "optimizer": {"state": {}}, "epoch": 299,
                "args": argparse.Namespace(model="deit_small_patch16_shrink_base", base_keep_rate=0.7)}, path)
    load_checkpoint(dst, path)
    assert same_weights(src, dst)


def test_deit3_official_gamma_layout(tmp_path):
    src, dst = small(), small()
    sd = {}
    for k, v in src.state_dict().items():
        sd[k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2")] = v
    assert any("gamma_1" in k for k in sd)
    torch.save({"model": sd}, tmp_path / "deit_3_small_224_1k.pth")
    load_checkpoint(dst, tmp_path / "deit_3_small_224_1k.pth")
    assert same_weights(src, dst)


@pytest.mark.parametrize("name", ["evit_deit_small_patch16_224", "evit_deit3_small_patch16_224"])
def test_resampled_pos_embed_at_288(tmp_path, name):
    src = timm.create_model(name, num_classes=3)
    save_checkpoint(src.state_dict(), tmp_path / "w224.pth")
    hi = timm.create_model(name, num_classes=3, img_size=288, keep_rate=0.5)
    load_checkpoint(hi, tmp_path / "w224.pth")
    n_prefix = 0 if hi.no_embed_class else 1
    assert hi.pos_embed.shape[1] == 18 * 18 + n_prefix
    # the resampled grid is a smooth interpolation of the source grid: corners stay close
    g_src = src.pos_embed[0, n_prefix:].reshape(14, 14, -1)
    g_hi = hi.pos_embed[0, n_prefix:].reshape(18, 18, -1)
    assert torch.allclose(g_hi[0, 0], g_src[0, 0], atol=0.05)
    assert torch.equal(hi.blocks[5].mlp.fc1.weight, src.blocks[5].mlp.fc1.weight)
    with torch.no_grad():
        _, kept = hi(torch.randn(1, 3, 288, 288), return_kept_indices=True)
    assert [k.shape[1] for k in kept] == [163, 83, 43]


def test_non_square_resolution(tmp_path):
    src = small()
    save_checkpoint(src.state_dict(), tmp_path / "w.pth")
    wide = small(img_size=(32, 48))
    load_checkpoint(wide, tmp_path / "w.pth")
    assert wide(torch.randn(1, 3, 32, 48)).shape == (1, 5)


def test_mismatched_architecture_names_keys(tmp_path):
    save_checkpoint(small(depth=4).state_dict(), tmp_path / "w.pth")
    with pytest.raises(LeanvitError, match=r"unexpected keys: blocks\.3\.") as e:
        load_checkpoint(small(depth=3), tmp_path / "w.pth")
    assert "does not fit" in str(e.value)
    with pytest.raises(LeanvitError, match=r"missing keys: blocks\.4\."):
        load_checkpoint(small(depth=5), tmp_path / "w.pth")
    with pytest.raises(LeanvitError, match=r"shape mismatch: cls_token \(1, 1, 32\) vs model \(1, 1, 48\)"
                                           r".*patch_embed\.proj\.bias \(32,\) vs model \(48,\)"):
        load_checkpoint(small(embed_dim=48), tmp_path / "w.pth")
    result = load_checkpoint(small(depth=5), tmp_path / "w.pth", strict=False)
    assert result.missing_keys and all(k.startswith("blocks.4.") for k in result.missing_keys)


def test_ignore_classifier_for_new_classes(tmp_path):
    save_checkpoint(small(num_classes=5).state_dict(), tmp_path / "w.pth")
    with pytest.raises(LeanvitError, match="head.weight"):
        load_checkpoint(small(num_classes=3), tmp_path / "w.pth")
    dst = small(num_classes=3)
    res = load_checkpoint(dst, tmp_path / "w.pth", ignore_classifier=True)
    assert set(res.skipped_keys) == {"head.weight", "head.bias"}


def test_unreadable_and_unsafe_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(small(), tmp_path / "nope.pth")
    (tmp_path / "garbage.pth").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(LeanvitError, match="garbage.pth"):
        load_checkpoint(small(), tmp_path / "garbage.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"12345678")
    with pytest.raises(LeanvitError, match="bad.safetensors"):
        load_checkpoint(small(), tmp_path / "bad.safetensors")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(LeanvitError, match="weights_only"):
        read_state_dict(tmp_path / "evil.pth")
    torch.save({"epoch": 1, "note": "no weights"}, tmp_path / "empty.pth")
    with pytest.raises(LeanvitError, match="no model state dict"):
        read_state_dict(tmp_path / "empty.pth")


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_checkpoint({"model": {"w": torch.ones(2)}}, path)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({"model": {"w": torch.zeros(2)}}, path)
    monkeypatch.undo()
    assert torch.equal(read_state_dict(path)["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temp file left behind


def test_a_command_reads_its_checkpoint_once(tmp_path, capsys, monkeypatch):
    """eval asks the checkpoint for its task, its model and its data options: one file read."""
    from cli_helpers import cli

    import leanvit.checkpoints as ck
    from leanvit.models import create_model

    spec = {"name": "test_vit", "kwargs": {"img_size": 32, "num_classes": 10}}
    path = tmp_path / "m.pth"
    ck.save_checkpoint({"model": create_model("test_vit", img_size=32, num_classes=10).state_dict(),
                        "model_spec": spec}, path)
    reads = []
    real = ck._read_checkpoint_file
    monkeypatch.setattr(ck, "_read_checkpoint_file", lambda p: reads.append(p) or real(p))
    rc, out, err = cli(capsys, "eval", "--checkpoint", path, "--data", "digits", "--max-batches", "1",
                       "--no-progress")
    assert rc == 0, err
    assert len(reads) == 1
    with ck.reading_once():  # a changed file is read again
        first = ck.read_checkpoint(path)
        first.pop("model")  # a caller changing what it got changes nothing for the next one
        assert "model" in ck.read_checkpoint(path)
        ck.save_checkpoint({"model": {}, "model_spec": spec, "note": 1}, path)
        assert ck.read_checkpoint(path).get("note") == 1
