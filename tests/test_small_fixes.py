"""Smaller dead ends: a resumed finished run's summary, one summary line per torchrun job, `--reduction evit:`
in train, the modes of run files, what `eval --help` says `--data` takes."""
import stat

from cli_helpers import cli, cli_error, one_line_error

ARGS = ["--model", "deit3_small_patch16_224", "--set",
        "model_kwargs={patch_size: 8, embed_dim: 16, depth: 1, num_heads: 1}", "--img-size", "16", "--data", "digits",
        "--set", "digits.val_fraction=0.02", "--batch-size", "8", "--set", "max_train_batches=2",
        "--set", "warmup_epochs=0", "--no-progress", "--epochs", "1"]


def test_finished_run_auto_resumed_and_run_file_modes(tmp_path, capsys):
    out = tmp_path / "run"
    rc, text, err = cli(capsys, "train", *ARGS, "--output", out)
    assert rc == 0, err
    first = [ln for ln in text.splitlines() if ln.startswith("done in")]
    rc, text, err = cli(capsys, "train", *ARGS, "--output", out, "--auto-resume")
    assert rc == 0, err
    done = [ln for ln in text.splitlines() if ln.startswith("done in")]
    assert len(done) == 1 and "None" not in done[0] and "last " in done[0]
    assert done[0].split("last ")[1].split(";")[0] == first[0].split("last ")[1].split(";")[0]
    mode = stat.S_IMODE((out / "config.yaml").stat().st_mode)
    for name in ("last.pth", "best.pth", "metrics.jsonl", "metrics.csv"):
        assert stat.S_IMODE((out / name).stat().st_mode) == mode, name


def test_only_the_main_process_prints_the_summary(monkeypatch, capsys, tmp_path):
    import leanvit.tools.train as tool
    res = {"task": "classification", "best_top1": 50.0, "last_top1": 50.0, "seconds": 1.0, "output": "x"}
    for is_main, lines in ((False, 0), (True, 1)):
        monkeypatch.setattr(tool, "train", lambda *a, main=is_main, **k: {**res, "is_main": main})
        rc, text, _ = cli(capsys, "train", "--model", "test_vit", "--output", tmp_path)
        assert rc == 0 and text.count("done in") == lines


def test_train_reduction_without_a_value_says_what_is_missing(tmp_path, capsys):
    rc, err = cli_error(capsys, "train", *ARGS, "--reduction", "evit:", "--output", tmp_path / "r")
    one_line_error(rc, err, "evit:", "keep_rate value is missing")


def test_eval_help_names_every_kind_of_data(capsys):
    import pytest
    with pytest.raises(SystemExit):
        cli(capsys, "eval", "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "tar shards" in text and "Hugging Face" in text and "--set" in text


def test_demo_plot_labels_do_not_overlap(tmp_path):
    """Two configurations at nearly the same accuracy and speed (the demo's DeiT III and EViT 0.7 fine-tune):
    their labels are placed apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from leanvit.tools.demo import annotate_apart
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    points = [(100.0, 90.0), (101.0, 90.1), (100.5, 89.9), (300.0, 70.0)]
    ax.scatter(*zip(*points))
    texts = annotate_apart(ax, points, ["DeiT III (deit3_demo)", "EViT/0.7 fine-tuned (evit_demo)",
                                        "EViT/0.5 off the shelf", "Shunted"])
    fig.canvas.draw()
    boxes = [t.get_window_extent(fig.canvas.get_renderer()) for t in texts]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    plt.close(fig)


def test_train_tome_r_beyond_what_a_block_can_merge_is_refused(tmp_path, capsys):
    """16 px, patch 8: 4 patch tokens, at most 2 merged per block; r=999 was clamped in the model but recorded
    (and scheduled) as 999."""
    rc, err = cli_error(capsys, "train", *ARGS, "--reduction", "tome:999", "--output", tmp_path / "r")
    one_line_error(rc, err, "tome:999", "at most 2 per block")
    assert not (tmp_path / "r" / "last.pth").exists()
