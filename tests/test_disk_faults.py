"""A disk that cannot take a write is one line naming the file or folder and the cause (exit 2), found
before the work where it can be, and loses nothing: a full disk at the start leaves no lock that blocks the
next run (an ownerless lock is taken over), a full disk mid-run leaves the last checkpoint as it was, an
unwritable `eval --output` is refused before evaluating. Disk faults are simulated where the write happens
(`os.fsync` / `tempfile.mkstemp` raising ENOSPC / EROFS), as a real full or read-only mount would raise."""
import errno
import os
import tempfile
import time

import pytest
import torch
from cli_helpers import cli, cli_error, one_line_error

from leanvit.errors import LeanvitError
from leanvit.train.run_folder import RunLock

ARGS = ["--model", "deit3_small_patch16_224", "--set",
        "model_kwargs={patch_size: 8, embed_dim: 16, depth: 1, num_heads: 1}", "--img-size", "16", "--data", "digits",
        "--set", "digits.val_fraction=0.02", "--batch-size", "8", "--set", "max_train_batches=2",
        "--set", "warmup_epochs=0", "--no-progress"]


def _full_when(monkeypatch, pred, err=errno.ENOSPC):
    """os.fsync raises ``err`` for the files ``pred(path)`` accepts, as a full disk does."""
    real = os.fsync

    def fsync(fd):
        if pred(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(err, os.strerror(err))
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)


def test_full_disk_at_start_leaves_no_lock_and_an_ownerless_lock_is_taken_over(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _full_when(m, lambda p: p.endswith(".lock"))
        rc, err = cli_error(capsys, "train", *ARGS, "--epochs", "1", "--output", out)
    one_line_error(rc, err, ".lock", "No space left on device")
    assert not (out / ".lock").exists()
    # an empty lock left by an older version (or a crash between create and write) blocks nothing for long
    (out / ".lock").write_text("")
    with pytest.raises(LeanvitError, match="an unknown owner"):  # fresh: maybe being written right now
        RunLock(out).acquire()
    old = time.time() - 60
    os.utime(out / ".lock", (old, old))
    rc, text, err = cli(capsys, "train", *ARGS, "--epochs", "1", "--output", out, "--auto-resume")
    assert rc == 0, err
    assert (out / "last.pth").exists() and not (out / ".lock").exists()


def test_full_disk_mid_run_is_one_line_and_the_checkpoint_survives(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    rc, _, err = cli(capsys, "train", *ARGS, "--epochs", "1", "--output", out)
    assert rc == 0, err
    before = (out / "last.pth").read_bytes()
    with monkeypatch.context() as m:
        _full_when(m, lambda p: os.path.basename(p).startswith(".last.pth."))
        rc, err = cli_error(capsys, "train", *ARGS, "--epochs", "2", "--output", out, "--resume")
    one_line_error(rc, err, f"cannot write last.pth in {out}", "No space left on device")
    assert (out / "last.pth").read_bytes() == before  # nothing lost
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")] and not (out / ".lock").exists()
    torch.load(out / "last.pth", weights_only=True)


def test_read_only_outputs_are_refused_before_the_work(tmp_path, monkeypatch, capsys):
    real = tempfile.mkstemp
    ro = tmp_path / "ro"

    def mkstemp(*a, dir=None, **k):
        if dir is not None and str(dir).startswith(str(ro)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real(*a, dir=dir, **k)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    rc, text, err = cli(capsys, "eval", "--model", "test_vit", "--img-size", "32", "--data", "digits",
                        "--no-progress", "--output", ro / "e.json")
    one_line_error(rc, err, "--output", str(ro), "Read-only file system")
    assert "top-1" not in text  # refused before evaluating
    for cmd in (["bench", "--models", "test_vit", "--img-sizes", "32", "--output", ro / "b"],
                ["export", "test_vit", "--img-size", "32", "--output", ro / "m.onnx"],
                ["train", *ARGS, "--epochs", "1", "--output", ro / "t"]):
        rc, text, err = cli(capsys, *cmd)
        one_line_error(rc, err, str(ro), "Read-only file system")
        assert "epoch 1/" not in text and "img/s" not in text  # before any work
