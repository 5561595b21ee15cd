"""Experiment tracking (--log-to): TensorBoard scalars equal metrics.jsonl and a resumed run continues the same
step axis; W&B in offline mode resumes the same run; bad backends are one-line errors."""
import json

import pytest
from cli_helpers import cli, one_line_error

from leanvit.errors import LeanvitError
from leanvit.train import train
from leanvit.train.tracking import parse_log_to

TINY = dict(model="deit3_small_patch16_224",
            model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
            img_size=32, data="digits", digits={"val_fraction": 0.05}, crop="none", hflip=0.0, batch_size=16,
            max_train_batches=3, epochs=2, warmup_epochs=1, lr=1e-3, opt="adamw", loss="ce", mixup=0.0, cutmix=0.0,
            workers=0, log_every=1, keep_rate=0.5)


def _run(out, **kw):
    return train({**TINY, "output": str(out), **kw}, progress=False, device="cpu")


def _events(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tensorboard_scalars_equal_metrics_and_resume_continues_the_axis(tmp_path):
    out = tmp_path / "tb"
    _run(out, log_to="tensorboard")
    res = train({**TINY, "output": str(out), "epochs": 3, "log_to": "tensorboard"}, progress=False, device="cpu",
                resume=True)
    acc = _events(out)
    rows = _rows(out)
    assert len(rows) == 3 and res["epochs_done"] == 3
    tags = acc.Tags()["scalars"]
    for key in ("train_loss", "lr", "train_img_per_s", "strength", "val_top1", "val_top5", "val_loss"):
        assert key in tags, key
        events = acc.Scalars(key)
        assert [e.step for e in events] == [3, 6, 9]  # one step axis: optimizer steps, continued by the resume
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6), key
    steps = [e.step for e in acc.Scalars("step/train_loss")]
    assert steps == list(range(1, 10))  # every log_every (1) step, no step twice
    assert "pictures/kept_tokens" in acc.Tags()["images"]  # EViT: the kept tokens at each evaluation
    assert len(acc.Images("pictures/kept_tokens")) == 3


@pytest.mark.slow
def test_tensorboard_drops_steps_of_a_stopped_attempt(tmp_path):
    """A run overwritten (or resumed from an earlier step) does not show the discarded attempt's values twice."""
    out = tmp_path / "tb"
    _run(out, log_to="tensorboard", epochs=1)
    train({**TINY, "output": str(out), "epochs": 1, "seed": 1, "log_to": "tensorboard"}, progress=False, device="cpu",
        overwrite=True)
    acc = _events(out)
    rows = _rows(out)
    assert [e.value for e in acc.Scalars("train_loss")] == pytest.approx([rows[0]["train_loss"]], rel=1e-6)


@pytest.mark.slow
def test_wandb_offline_resumes_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    _run(out, log_to="wandb", epochs=1)
    run_id = (out / "wandb_run_id").read_text().strip()
    train({**TINY, "output": str(out), "epochs": 2, "log_to": "wandb"}, progress=False, device="cpu", resume=True)
    assert (out / "wandb_run_id").read_text().strip() == run_id
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)  # one W&B run, resumed
    assert all(list(r.glob("*.wandb")) for r in runs)


def test_wandb_offline_resume_logs_the_checkpoint_history_again(tmp_path, monkeypatch):
    """A kill -9 can leave W&B's offline run file without the rows its background process had not written:
    the resumed attempt logs the checkpoint's rows again, each at its epoch's last step (the W&B run is a
    stub here: what matters is what leanvit hands it)."""
    from leanvit.train import tracking

    logged = []
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(tracking.WandbTracker, "__init__", lambda self, out, cfg, resume: None)
    monkeypatch.setattr(tracking.WandbTracker, "log_scalars", lambda self, values, step: logged.append((step, values)))
    monkeypatch.setattr(tracking.WandbTracker, "log_images", lambda self, images, step: None)
    monkeypatch.setattr(tracking.WandbTracker, "close", lambda self: None)
    out = tmp_path / "wb"
    first = _run(out, log_to="wandb", epochs=1, keep_rate=None)
    row = first["history"][0]
    logged.clear()
    train({**TINY, "output": str(out), "epochs": 2, "log_to": "wandb", "keep_rate": None}, progress=False,
          device="cpu", resume=True)
    replayed = [(step, v) for step, v in logged if step == 3 and "val_top1" in v]
    assert replayed and replayed[0][1]["val_top1"] == pytest.approx(row["val_top1"])
    assert any(step == 6 and "val_top1" in v for step, v in logged)  # then the new epoch, as before


def test_bad_log_to_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    with pytest.raises(LeanvitError, match="unknown log_to backend 'mlflow'"):
        parse_log_to("tensorboard,mlflow")
    assert parse_log_to(["TensorBoard", "wandb", "wandb"]) == ["tensorboard", "wandb"]
    assert parse_log_to("none") == parse_log_to("off") == parse_log_to("-") == []  # no tracking, not a backend
    rc, _, err = cli(capsys, "train", "--recipe", "deit3_demo", "--log-to", "tensorbored", "--output", tmp_path / "r",
                     "--no-progress")
    one_line_error(rc, err, "tensorbored")
    assert not (tmp_path / "r").exists()  # nothing written before the error
    import builtins

    real = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == "wandb":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    rc, _, err = cli(capsys, "train", "--recipe", "deit3_demo", "--log-to", "wandb", "--output", tmp_path / "r",
                     "--no-progress")
    one_line_error(rc, err, "pip install leanvit[wandb]")


@pytest.mark.slow
def test_tensorboard_gets_the_segmentation_pictures_and_metrics(tmp_path):
    """A dense task: its validation metrics (val_miou, ...) as scalars and its predicted masks as a picture."""
    out = tmp_path / "seg"
    train(dict(task="segmentation", segmenter="semantic_fpn", model="shunted_t", img_size=64, min_size=64,
               model_kwargs={"depths": [1, 1, 1, 1], "embed_dims": [64, 32, 32, 32], "num_heads": [2, 2, 2, 2],
                             "mlp_ratios": [1, 1, 1, 1]},
               head_kwargs={"fpn_channels": 16, "channels": 16}, data="digits-seg",
               digits_dense={"canvas_size": 64, "min_digit": 10, "max_digit": 28, "max_objects": 3,
                             "val_fraction": 0.02},
               hflip=0.0, epochs=1, batch_size=4, max_train_batches=2, opt="adamw", lr=1e-3, warmup_epochs=0,
               loss="ce", mixup=0.0, cutmix=0.0, three_augment=False, schedule="poly", output=str(out),
               log_to="tensorboard"), device="cpu", progress=False)
    acc = _events(out)
    row = _rows(out)[-1]
    for key in ("val_miou", "val_pixel_acc", "train_loss"):
        assert acc.Scalars(key)[-1].value == pytest.approx(row[key], rel=1e-6), key
    assert "pictures/predictions" in acc.Tags()["images"]
