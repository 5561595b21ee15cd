"""WebDataset tar shards and Hugging Face datasets as training/evaluation data: the same results as the same
images in an ImageFolder, every sample once per epoch across processes and loader workers, exact resumption
after SIGTERM, and one-line errors for bad input."""
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import cli, one_line_error
from data_helpers import color_tree, png_bytes, write_hf, write_shards

from leanvit.data import create_dataset, dataset_classes, resolve_dataset_kind
from leanvit.data.shards import ShardDataset, ShardOrderSampler, expand_shards
from leanvit.errors import LeanvitError
from leanvit.train import train

FAST = dict(img_size=32, batch_size=16, epochs=2, warmup_epochs=0.5, eval_every=1,
            model_kwargs={"embed_dim": 48, "depth": 2, "num_heads": 2})
DRIVER = Path(__file__).resolve().parent / "train_driver.py"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    tree = color_tree(d / "tree")
    return {"tree": tree, "shards": write_shards(tree, d / "sh"), "hf": write_hf(tree, d / "hf"), "root": d}


def _train(data, out, **kw):
    return train("deit3_demo", device="cpu", progress=False, data=str(data), output=str(out), **{**FAST, **kw})


# ---------------------------------------------------------------------------------------------- reading
def test_kinds_patterns_and_classes(data):
    sh = data["shards"]
    assert resolve_dataset_kind(str(sh)).name == "shards"
    assert resolve_dataset_kind(str(data["hf"])).name == "hf"
    assert resolve_dataset_kind(str(data["tree"])).name == "imagefolder"
    assert expand_shards(str(sh / "data-train-{00..03}.tar")) == sorted(str(p) for p in sh.glob("*train*.tar"))
    assert dataset_classes(str(sh), "train") == ["c0", "c1", "c2", "c3"]  # classes.txt
    folder = create_dataset(str(data["tree"]), "val")
    for name in ("shards", "hf"):
        ds = create_dataset(str(data[name]), "val")
        assert len(ds) == len(folder) == 64 and ds.classes == folder.classes
        # the same images with the same labels (orders differ: compare as sets of (pixels, label))
        a = sorted((bytes(folder.load(i).tobytes()), folder.targets[i]) for i in range(len(folder)))
        b = sorted((bytes(ds.load(i).tobytes()), ds.targets[i]) for i in range(len(ds)))
        assert a == b, name
    # the validation shards by pattern (val_data) and without a class map: labels 0..max
    pattern = str(sh / "data-train-{00..03}.tar")
    v = create_dataset(pattern, "val", options={"val_data": str(sh / "data-validation-*.tar"), "train_data": pattern})
    assert len(v) == 64


def test_every_sample_once_per_epoch_across_ranks_and_workers(data):
    ds = create_dataset(str(data["shards"]), "train")
    keys = ds.keys
    assert len(set(keys)) == len(keys) == 192
    for ws in (1, 2, 3, 5):
        for epoch in (0, 1):
            seen = []
            for r in range(ws):
                s = ds.train_sampler(ws, r, seed=3)
                s.set_epoch(epoch)
                seen += [keys[i] for i in s]
                assert len(s) == 192 // ws
            assert len(seen) == len(set(seen)) == 192 // ws * ws  # no duplicate; only n % ws wait an epoch
    s0, s1 = ShardOrderSampler(ds.shard_of, seed=3), ShardOrderSampler(ds.shard_of, seed=3)
    s1.set_epoch(1)
    assert list(s0) != list(s1) and sorted(s0) == sorted(s1)  # a new order every epoch
    # locality: a group of 4 shards is one window here, so a 1-shard group reads shard after shard
    one = ShardOrderSampler(ds.shard_of, seed=0, group=1)
    shard_seq = [ds.shard_of[i] for i in one]
    assert sum(a != b for a, b in zip(shard_seq, shard_seq[1:])) == 3

    class Keys(torch.utils.data.Dataset):  # the bytes are read in the workers, keyed by sample
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            return ds.keys[i], len(ds.read_bytes(i))

    for r in range(2):
        s = ds.train_sampler(2, r, seed=0)
        loader = torch.utils.data.DataLoader(Keys(), sampler=s, batch_size=8, num_workers=2)
        got = [k for batch, _ in loader for k in batch]
        assert got == [keys[i] for i in s]  # workers split the batches, in order, each sample once


def test_bad_shards_are_one_line_errors_and_corrupt_images_counted(tmp_path, data, capsys):
    import webdataset as wds

    with pytest.raises(LeanvitError, match="matches no file"):
        expand_shards(str(tmp_path / "none-*.tar"))
    with pytest.raises(LeanvitError, match=r"no such file .*none-01.tar"):
        expand_shards(str(tmp_path / "none-{01..02}.tar"))
    bad = tmp_path / "bad"
    bad.mkdir()
    w = wds.TarWriter(str(bad / "x-train-0.tar"))
    w.write({"__key__": "a", "png": png_bytes(), "cls": 0})
    w.write({"__key__": "b", "png": png_bytes()})
    w.close()
    with pytest.raises(LeanvitError, match=r"x-train-0.tar: sample b has no label"):
        create_dataset(str(bad), "train")
    w = wds.TarWriter(str(bad / "x-train-0.tar"))
    w.write({"__key__": "a", "png": png_bytes(), "cls": 0})
    w.write({"__key__": "b", "png": png_bytes(), "cls": 7})
    w.close()
    (bad / "classes.txt").write_text("zero\none\n")
    with pytest.raises(LeanvitError, match=r"sample b has label 7, outside the 2 classes"):
        create_dataset(str(bad), "train")
    w = wds.TarWriter(str(bad / "x-train-0.tar"))
    w.write({"__key__": "a", "png": png_bytes(), "cls": 0})
    w.write({"__key__": "b", "png": b"not an image at all", "cls": 1})
    w.close()
    with pytest.raises(LeanvitError, match="cannot read image x-train-0.tar:b"):
        create_dataset(str(bad), "train")[1]
    ds = create_dataset(str(bad), "train", skip_corrupt=True)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        assert ds[1][1] == 0  # replaced by the next readable sample
    assert ds.num_skipped == 1
    rc, _, err = cli(capsys, "train", "--recipe", "deit3_demo", "--data", str(tmp_path / "nope-{0..3}.tar"),
                     "--output", tmp_path / "run", "--no-progress")
    one_line_error(rc, err, "nope-0.tar")


def test_hf_bad_columns_and_corrupt_rows(tmp_path, data):
    import datasets

    with pytest.raises(LeanvitError, match=r"has no image column 'picture' \(columns: image, label\)"):
        create_dataset(str(data["hf"]), "train", options={"image_column": "picture"})
    d = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"pixels": [b"x"], "y": [0]}),
                              "validation": datasets.Dataset.from_dict({"pixels": [b"x"], "y": [0]})})
    d.save_to_disk(str(tmp_path / "odd"))
    with pytest.raises(LeanvitError, match=r"has no image column \(image or img; columns: pixels, y\)"):
        create_dataset(str(tmp_path / "odd"), "train")
    ds = create_dataset(str(tmp_path / "odd"), "train", options={"image_column": "pixels", "label_column": "y"})
    with pytest.raises(LeanvitError, match="cannot read image in row 0"):
        ds[0]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    rows = {"image": [{"bytes": png_bytes(), "path": None}, {"bytes": b"junk", "path": None}], "label": [0, 1]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=feats)}).save_to_disk(str(tmp_path / "c"))
    ds = create_dataset(str(tmp_path / "c"), "train", skip_corrupt=True)
    with pytest.warns(UserWarning):
        assert ds[1][1] == 0
    assert ds.num_skipped == 1 and ds.classes == ["a", "b"]


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.slow
def test_shards_and_hf_train_like_the_imagefolder(tmp_path, data, capsys):
    ref = _train(data["tree"], tmp_path / "folder")
    for name in ("shards", "hf"):
        res = _train(data[name], tmp_path / name)
        assert res["best_top1"] > 90 and abs(res["last_top1"] - ref["last_top1"]) <= 2.0, (name, res["history"])
        # the checkpoint evaluates the same on the ImageFolder copy of the validation images
        rc, _, err = cli(capsys, "eval", "--checkpoint", tmp_path / name / "best.pth", "--data", data["tree"],
                         "--no-progress", "--output", tmp_path / f"{name}.json")
        assert rc == 0, err
        assert json.loads((tmp_path / f"{name}.json").read_text())["top1"] == pytest.approx(res["best_top1"])


def _env(**kw):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path),
                **{k: str(v) for k, v in kw.items()})


def _cmd(data, out, *flags, nproc=0):
    args = ["train", "--recipe", "deit3_demo", "--data", str(data), "--output", str(out), "--no-progress",
            "--device", "cpu", "--img-size", "32", "--batch-size", "16", "--epochs", "2", "--set", "warmup_epochs=0.5",
            "--set", "model_kwargs={embed_dim: 48, depth: 2, num_heads: 2}", *flags]
    if not nproc:
        return [sys.executable, str(DRIVER), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            str(DRIVER), *args]


@pytest.mark.slow
def test_torchrun_two_processes_on_shards(tmp_path, data):
    one = _train(data["shards"], tmp_path / "one")
    r = subprocess.run(_cmd(data["shards"], tmp_path / "two", "--batch-size", "8", nproc=2), capture_output=True,
                       text=True, timeout=600, env=_env())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "x 2 process(es)" in r.stdout
    rows = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and abs(rows[-1]["val_top1"] - one["last_top1"]) <= 2.0, (rows, one["history"])


@pytest.mark.slow
def test_sigterm_mid_epoch_on_shards_then_auto_resume_is_exact(tmp_path, data):
    """The documented guarantee for shards is the ImageFolder one: resumption at the exact next sample, so the
    resumed run ends with the weights of a run that never stopped."""
    out = tmp_path / "term"
    pause = _env(PAUSE_AT_STEP=5, PAUSE_SECONDS=1, PAUSE_MARK=tmp_path / "m")
    p = subprocess.Popen(_cmd(data["shards"], out), env=pause,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (tmp_path / "m.0").exists():
        assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.time() - t0 < 300
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 75, err[-2000:]
    ck = torch.load(out / "last.pth", weights_only=True)
    assert (ck["step"], ck["epoch_step"]) == (6, 6)
    r = subprocess.run(_cmd(data["shards"], out, "--auto-resume"), capture_output=True, text=True, timeout=600,
                       env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 6/12 of epoch 1" in r.stdout + r.stderr
    r = subprocess.run(_cmd(data["shards"], tmp_path / "ref"), capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]  # the same command line, threads and all, never stopped
    a, b = torch.load(tmp_path / "ref" / "last.pth", weights_only=True), torch.load(out / "last.pth", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["history"][-1]["train_loss"] == pytest.approx(b["history"][-1]["train_loss"], rel=1e-6)


def test_shard_member_offsets_match_tarfile(data):
    """The index reads each image at its offset: the bytes are the tar member's."""
    ds = ShardDataset(sorted(str(p) for p in data["shards"].glob("*validation*.tar")))
    with tarfile.open(ds.files[0]) as tar:
        member = next(m for m in tar if m.name.endswith(".png"))
        want = tar.extractfile(member).read()
    assert ds.read_bytes(0) == want
