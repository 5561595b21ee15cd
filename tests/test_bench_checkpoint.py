"""`leanvit bench` on checkpoints: a segmentation / detection checkpoint (as `leanvit train` writes it) timed
unreduced and with token reductions in its backbone, each restoration, the head's share of the time; a
classification checkpoint the same way; and the one-line errors for bad input."""
import csv

import pytest
import torch
from cli_helpers import cli, cli_error, one_line_error

from leanvit.checkpoints import save_checkpoint
from leanvit.tasks import get_task

VIT = {"patch_size": 8, "embed_dim": 32, "depth": 5, "num_heads": 2, "init_values": 0.1}
FAST = ("--batch-size", "2", "--threads", "1", "--repeats", "1", "--warmup", "0", "--latency-repeats", "1",
        "--no-progress")
QUICK = FAST + ("--no-memory",)


@pytest.fixture(autouse=True)
def _threads():
    """`--threads` sets torch's thread count for the process: give the other tests theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _dense_checkpoint(path, task, head, model="deit3_small_patch16_224", kwargs=VIT, size=32, head_kwargs=None):
    """A randomly initialized dense model saved with what `leanvit train` records (spec, task, config, classes)."""
    torch.manual_seed(0)
    t = get_task(task)
    cfg = {"model": model, "model_kwargs": kwargs, "img_size": size, "min_size": size, "max_size": size,
           t.head_key: head, "head_kwargs": head_kwargs or {}}
    model, spec, _ = t.build_model(cfg, 3)
    save_checkpoint({"model": model.state_dict(), "model_spec": spec, "task": t.name, "config": cfg,
                     "classes": ["a", "b", "c"]}, path)
    return str(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchck")
    return {"seg": _dense_checkpoint(root / "seg.pth", "segmentation", "semantic_fpn",
                                     head_kwargs={"fpn_channels": 8, "channels": 8}),
            "det": _dense_checkpoint(root / "det.pth", "detection", "fcos",
                                     head_kwargs={"fpn_channels": 64, "head_convs": 1}),
            "root": root}


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_bench_segmentation_checkpoint_reductions_restorations_head_share(ckpts, capsys, tmp_path):
    rc, text, err = cli(capsys, "bench", "--models", ckpts["seg"], "--reduction", "evit:0.5", "tome:4", *FAST,
                        "--output", tmp_path)
    assert rc == 0, err
    rows = _rows(tmp_path / "bench.csv")
    assert [(r["reduction"], r["strength"]) for r in rows] == [
        ("-", "-"), ("evit/keep", "0.5"), ("evit/reactivate:1", "0.5"), ("evit/fused", "0.5"),
        ("tome/unmerge", "4"), ("tome/reactivate:1", "4")]
    assert all(r["model"] == ckpts["seg"] and r["task"] == "segmentation" and r["img_size"] == "32x32"
               for r in rows)
    base = float(rows[0]["img_per_s"])
    for r in rows:  # the speed-up is the ratio of the measured throughputs, over the unreduced model
        assert float(r["speedup"]) == pytest.approx(float(r["img_per_s"]) / base, rel=1e-4)
        assert float(r["backbone_ms"]) > 0 and 0 <= float(r["head_share"]) < 1
        assert float(r["head_share"]) == pytest.approx(max(0.0, 1 - float(r["backbone_ms"]) / float(r["latency_ms"])),
                                                       abs=1e-4)
    assert float(rows[0]["speedup"]) == 1.0
    assert float(rows[1]["gmacs"]) < float(rows[0]["gmacs"])  # the reduced backbone does less work
    assert all(float(r["peak_mem_mb"]) > 0 for r in rows)
    assert "head share" in text and "evit/keep" in text


def test_bench_restores_subset_and_checkpoint_beside_a_model_name(ckpts, capsys, tmp_path):
    rc, _, err = cli(capsys, "bench", "--models", f"test_vit,{ckpts['seg']}", "--reduction", "evit:0.7", "tome:2",
                     "--restore", "keep", "unmerge", *QUICK, "--output", tmp_path)
    assert rc == 0, err
    rows = _rows(tmp_path / "bench.csv")
    assert [(r["model"], r["reduction"]) for r in rows] == [
        ("test_vit", "evit"), ("test_vit", "tome"),
        (ckpts["seg"], "-"), (ckpts["seg"], "evit/keep"), (ckpts["seg"], "tome/unmerge")]
    assert rows[0]["head_share"] == "" and rows[2]["head_share"] != ""  # a classifier has no head apart


def test_bench_detection_checkpoint(ckpts, capsys, tmp_path):
    rc, _, err = cli(capsys, "bench", "--models", ckpts["det"], "--reduction", "evit:0.5", "--restore", "keep",
                     *QUICK, "--output", tmp_path)
    assert rc == 0, err
    rows = _rows(tmp_path / "bench.csv")
    assert [(r["task"], r["reduction"]) for r in rows] == [("detection", "-"), ("detection", "evit/keep")]
    assert all(float(r["backbone_ms"]) > 0 for r in rows)


def test_bench_classification_checkpoint_with_its_own_reduction(capsys, tmp_path):
    import leanvit
    torch.manual_seed(0)
    model = leanvit.create_model("test_vit", img_size=32, num_classes=3)
    path = tmp_path / "cls.pth"
    save_checkpoint({"model": model.state_dict(),
                     "model_spec": {"name": "test_vit", "kwargs": {"img_size": 32, "num_classes": 3},
                                    "reduction": {"method": "evit", "keep_rate": 0.7}}}, path)
    rc, _, err = cli(capsys, "bench", "--models", path, "--reduction", "tome:2", *QUICK, "--output", tmp_path / "o")
    assert rc == 0, err
    rows = _rows(tmp_path / "o" / "bench.csv")
    # unreduced first, then the grid, then the reduction it was trained with
    assert [(r["reduction"], r["strength"], r["task"]) for r in rows] == [
        ("-", "-", "classification"), ("tome", "2", "classification"), ("evit", "0.7", "classification")]
    assert rows[2]["keep_rate"] == "0.7" and "head_share" not in rows[0]
    rc, err = cli_error(capsys, "bench", "--models", path, "--reduction", "evit:0.5", "--restore", "keep",
                        "--output", tmp_path / "o")
    one_line_error(rc, err, "restore")


def test_bench_checkpoint_errors(ckpts, capsys, tmp_path):
    root = ckpts["root"]
    (root / "corrupt.pth").write_bytes(b"not a checkpoint at all")

    def error(*args, needles=()):
        rc, err = cli_error(capsys, "bench", *args, "--threads", "1", "--output", tmp_path)
        one_line_error(rc, err, *needles)

    seg = ckpts["seg"]
    error("--models", seg, "--reduction", "evit:0.5", "--restore", "unmerge", needles=["unmerge", "evit"])
    error("--models", seg, "--reduction", "evit:0.5", "tome:2", "--restore", "reactivate:9",
          needles=["reactivate:9"])
    error("--models", seg, "--reduction", "tome:abc", needles=["abc"])
    error("--models", seg, "--restore", "keep", needles=["keep", "reduction"])
    error("--models", seg, "--restore", "bogus", needles=["bogus"])
    error("--models", str(root / "missing.pth"), needles=["missing.pth"])
    error("--models", str(root / "corrupt.pth"), needles=["corrupt.pth"])
    error("--models", "test_vit", "--restore", "keep", needles=["--restore"])
    error("--models", seg, "--img-sizes", "64", needles=["input size", "seg.pth"])  # measured at its own size


def test_a_hierarchical_checkpoint_in_a_list_is_measured_unreduced_with_a_note(ckpts, capsys, tmp_path):
    """One Shunted checkpoint does not abort the list: it is measured once, unreduced, as a named Shunted is."""
    tiny_shunted = {"depths": [1, 1, 1, 1], "embed_dims": [64, 16, 32, 32], "num_heads": [2, 2, 4, 4],
                    "mlp_ratios": [2, 2, 2, 2]}
    shunted = _dense_checkpoint(tmp_path / "shunted.pth", "segmentation", "semantic_fpn", model="shunted_t",
                                kwargs=tiny_shunted, size=64, head_kwargs={"fpn_channels": 8, "channels": 8})
    rc, text, err = cli(capsys, "bench", "--models", ckpts["seg"], shunted, "--reduction", "evit:0.5", "--restore",
                        "keep", *QUICK, "--output", tmp_path / "o")
    assert rc == 0, err
    assert "shunted.pth (shunted_t) takes no token reduction: measured once" in text
    rows = _rows(tmp_path / "o" / "bench.csv")
    assert [(r["model"].endswith("shunted.pth"), r["reduction"]) for r in rows] == [
        (False, "-"), (False, "evit/keep"), (True, "-")]


def test_backbone_part_is_exactly_what_the_head_takes():
    import copy

    from leanvit.dense import apply_dense_reduction, create_detector, create_segmenter
    from leanvit.dense.reduction import BackbonePart, ReducedDense
    from leanvit.tasks import get_task
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny ops: no thread contention on a shared machine (restored after the test)
    x = torch.rand(2, 3, 32, 32)
    seg = create_segmenter("linear", "deit3_small_patch16_224", 3, img_size=32, **VIT).eval()
    reduced = apply_dense_reduction(copy.deepcopy(seg), "evit:0.7")
    view = ReducedDense(reduced, "evit", 0.5, "keep")  # another strength and restoration than the model's own
    reference = apply_dense_reduction(copy.deepcopy(seg), "evit:0.5", restore="keep")
    with torch.no_grad():
        maps = get_task("segmentation").backbone_part(view)(x)
        want = reference.backbone((x - reference.pixel_mean) / reference.pixel_std)
        assert all(torch.equal(a, b) for a, b in zip(maps, want))
        logits = torch.nn.functional.interpolate(reference.head(maps), size=(32, 32), mode="bilinear",
                                                 align_corners=False)
        assert torch.allclose(logits, view(x), atol=1e-6)  # the head on these maps is the whole model
        det = create_detector("fcos", "deit3_small_patch16_224", 3, img_size=32, min_size=32, max_size=32,
                              fpn_channels=64, head_convs=1, **VIT).eval()
        maps = BackbonePart(det)(x)
        want = det.backbone.body(det.transform(list(x))[0].tensors)
        assert all(torch.equal(a, b) for a, b in zip(maps, want))
    assert get_task("classification").backbone_part(seg) is None
