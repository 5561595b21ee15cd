"""Export to ONNX / torch.export with a dynamic batch (and dynamic H/W for Shunted), verified against eager
PyTorch; the ``leanvit export`` command; the runtime wrappers ``leanvit bench --runtime`` uses."""
import re

import pytest
import timm
import torch
from cli_helpers import cli, one_line_error

import leanvit  # noqa: F401  (registers the models)
from leanvit.deploy.export import export_model, keep_rate_path, load_exported, min_dynamic_side, verify_export
from leanvit.deploy.runtimes import prepare_runtime
from leanvit.errors import LeanvitError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TINY = dict(embed_dim=48, depth=4, num_heads=2, img_size=32, num_classes=10)


def _tiny_evit(rate=0.5):
    return timm.create_model("evit_deit_tiny_patch16_224", keep_rate=rate, locations=(1, 2), **TINY).eval()


def test_onnx_evit_dynamic_batch_matches_eager(tmp_path):
    model = _tiny_evit()
    path = export_model(model, tmp_path / "evit.onnx", img_size=32)
    results = verify_export(model, path, img_sizes=[(32, 32)], batch_sizes=(1, 3, 5))
    assert [r.batch_size for r in results] == [1, 3, 5]
    assert max(r.max_abs_diff for r in results) <= 1e-4
    # the keep rate is baked in: changing the PyTorch model's rate changes eager, not the file
    runner = load_exported(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        baked = runner(x)
        model.keep_rate = 1.0
        assert (baked - model(x)).abs().max() > 1e-3
        model.keep_rate = 0.5
        torch.testing.assert_close(baked, model(x), atol=1e-4, rtol=0)


def test_pt2_export_and_errors(tmp_path):
    model = _tiny_evit()
    path = export_model(model, tmp_path / "evit.pt2", img_size=32)
    assert max(r.max_abs_diff for r in verify_export(model, path, img_sizes=[32])) <= 1e-5
    with pytest.raises(LeanvitError, match="fixed patch grid"):
        export_model(model, tmp_path / "x.pt2", img_size=32, dynamic_size=True)
    with pytest.raises(LeanvitError, match="unknown export format"):
        export_model(model, tmp_path / "x.bin", img_size=32)
    assert not list(tmp_path.glob(".x*"))  # no temporary file left behind
    assert keep_rate_path("out/m.onnx", 0.7).name == "m_keep0.7.onnx"


def test_shunted_min_dynamic_side():
    assert min_dynamic_side(timm.create_model("shunted_t")) == 63


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_shunted_dynamic_size_export(tmp_path, fmt):
    """The size check is torch._check: the graph stays symbolic in H and W (not specialized to 64x64). One block
    per stage (every kind of Shunted block, half of Shunted-T's graph to trace)."""
    model = timm.create_model("shunted_t", num_classes=5, depths=(1, 1, 1, 1)).eval()
    path = export_model(model, tmp_path / f"s.{fmt}", img_size=64, dynamic_size=True)
    results = verify_export(model, path, img_sizes=[(64, 64), (96, 160), (63, 70)], batch_sizes=(1, 2))
    assert max(r.max_abs_diff for r in results) <= 1e-4


def test_export_command_keep_rate_list(tmp_path, capsys):
    rc, out, err = cli(capsys, "export", "evit_deit_tiny_patch16_224", "--img-size", "32", "--num-classes", "4",
                       "--keep-rate", "0.5", "0.8", "--format", "pt2", "--output", tmp_path / "m.pt2")
    assert rc == 0, err
    assert (tmp_path / "m_keep0.5.pt2").exists() and (tmp_path / "m_keep0.8.pt2").exists()
    assert out.count("is fixed in this file") == 2
    diffs = [float(d) for d in re.findall(r"max abs diff (\S+)", out)]
    assert len(diffs) == 2 and max(diffs) <= 1e-5


def test_export_command_errors(tmp_path, capsys):
    rc, _, err = cli(capsys, "export", "deit_tiny_patch16_224", "--img-size", "32", "--output", tmp_path / "m.bin")
    one_line_error(rc, err, "--format")
    rc, _, err = cli(capsys, "export", "deit_tiny_patch16_224", "--img-size", "32", "--dynamic-size",
                     "--output", tmp_path / "m.onnx")
    one_line_error(rc, err, "--dynamic-size", "fixed patch grid")
    rc, _, err = cli(capsys, "export", "shunted_t", "--keep-rate", "0.5", "--output", tmp_path / "m.onnx")
    assert rc == 2 and "Traceback" not in err


def test_onnxruntime_runtime_wrapper(tmp_path):
    model = _tiny_evit()
    x = torch.randn(2, 3, 32, 32)
    rt = prepare_runtime(model, "onnxruntime", x, workdir=tmp_path, threads=1)
    assert rt.setup_s > 0
    with torch.no_grad():
        torch.testing.assert_close(rt.model(x), model(x), atol=1e-4, rtol=0)
    with pytest.raises(LeanvitError, match="unknown runtime"):
        prepare_runtime(model, "tensorrt", x)


@pytest.mark.slow
def test_benchmark_models_runtimes_and_batch1_latency(tmp_path):
    from leanvit.measure import benchmark_models

    model = _tiny_evit(0.5)
    rows = benchmark_models({"evit": model}, batch_size=2, warmup=1, repeats=2, memory=False, progress=False,
                            runtimes=("eager", "onnxruntime"), latency_repeats=4, workdir=tmp_path)
    assert [(r["label"], r["runtime"]) for r in rows] == [("evit", "eager"), ("evit [onnxruntime]", "onnxruntime")]
    assert all(r["keep_rate"] == "0.5" and r["model"] == "evit" for r in rows)
    assert rows[0]["setup_s"] == 0.0 and rows[1]["setup_s"] > 0
    assert all(0 < r["lat1_ms"] <= r["lat1_p90_ms"] for r in rows)
    assert rows[0]["gmacs"] == rows[1]["gmacs"]


def test_bench_runtime_flag_errors(tmp_path, capsys):
    rc, _, err = cli(capsys, "bench", "--models", "deit_tiny_patch16_224", "--runtime", "eager,tensorrt",
                     "--output", tmp_path)
    one_line_error(rc, err, "--runtime", "tensorrt")


@pytest.mark.slow
def test_compile_runtime_reports_compile_time():
    model = _tiny_evit(0.5)
    x = torch.randn(2, 3, 32, 32)
    rt = prepare_runtime(model, "compile", x)
    assert rt.setup_s > 0
    with torch.no_grad():
        torch.testing.assert_close(rt.model(x), model(x), atol=1e-5, rtol=1e-4)
