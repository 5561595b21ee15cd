"""`leanvit bench` end to end on tiny settings, its parsing helpers, and its user errors."""
import csv

import pytest
import torch
from cli_helpers import leanvit, one_line_error

from leanvit.errors import LeanvitError
from leanvit.measure import build_configurations, format_table, forward_peak_memory_mb
from leanvit.tools.bench import parse_img_sizes, parse_keep_rates


def test_bench_cli_table_csv_plot(tmp_path):
    out = tmp_path / "bench"
    r = leanvit("bench", "--models", "deit_tiny_patch16_224,resnet18", "--keep-rates", "none,0.5",
                "--img-sizes", "32", "--batch-size", "2", "--warmup", "1", "--repeats", "2", "--threads", "1",
                "--output", str(out))
    assert r.returncode == 0, r.stderr
    # the environment is printed with the figures
    assert "device=cpu" in r.stdout and "dtype=float32" in r.stdout and "batch=2" in r.stdout
    assert "threads=1" in r.stdout and "median of 2" in r.stdout
    assert "resnet18 is not a ViT" in r.stdout  # measured once, said so
    for col in ("img/s", "ms/batch", "peak mem (MiB)", "params (M)", "GMACs", "speed-up"):
        assert col in r.stdout
    with open(out / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(x["model"], x["keep_rate"]) for x in rows] == [
        ("deit_tiny_patch16_224", "-"), ("deit_tiny_patch16_224", "0.5"), ("resnet18", "-")]
    assert all(x["img_size"] == "32x32" and x["batch_size"] == "2" and x["threads"] == "1" for x in rows)
    assert float(rows[0]["speedup"]) == 1.0
    assert float(rows[1]["gmacs"]) < float(rows[0]["gmacs"])  # the reorganized model does less work
    assert float(rows[0]["params_m"]) == pytest.approx(float(rows[1]["params_m"]))
    assert all(float(x["img_per_s"]) > 0 and x["peak_mem_mb"] != "" for x in rows)
    assert (out / "bench.png").stat().st_size > 5000


def test_bench_cli_user_errors_subprocess(tmp_path):
    r = leanvit("bench", "--models", "deit_tiny_patch16_22", "--output", str(tmp_path))
    one_line_error(r.returncode, r.stderr, "unknown model 'deit_tiny_patch16_22'", "deit_tiny_patch16_224")


def test_bench_cli_user_errors(tmp_path, capsys):
    from leanvit.cli import main

    def bench(*args, needles=()):
        rc = main(["bench", "--output", str(tmp_path), *args])
        err = capsys.readouterr().err
        one_line_error(rc, err, *needles)

    bench("--models", "deit_tiny_patch16_224", "--keep-rates", "0.7,1.5", needles=["must be in (0, 1]"])
    bench("--models", "deit_tiny_patch16_224", "--keep-rates", "0", needles=["must be in (0, 1]"])
    # an empty strength is an error (not the method at no reduction), a value out of range names the range
    bench("--models", "deit_tiny_patch16_224", "--reduction", "evit:", needles=["'evit:'", "keep_rate", "missing"])
    bench("--models", "deit_tiny_patch16_224", "--reduction", "evit:0", needles=["'evit:0'", "(0, 1]"])
    bench("--models", "deit_tiny_patch16_224", "--reduction", "tome:-2", needles=["'tome:-2'", "integer >= 0"])
    bench("--models", "deit_tiny_patch16_224", "--img-sizes", "big", needles=["--img-sizes"])
    bench("--models", "deit_tiny_patch16_224", "--img-sizes", "8", needles=["smaller than the model's 16x16"])
    if not torch.cuda.is_available():
        bench("--models", "deit_tiny_patch16_224", "--device", "cuda:7", needles=["CUDA"])
    bench("--models", "deit_tiny_patch16_224", "--device", "tpu", needles=["device"])
    bench("--models", "deit_tiny_patch16_224", "--batch-size", "0", needles=["--batch-size"])
    bench("--models", "deit_tiny_patch16_224", "--repeats", "0", needles=["--repeats"])
    (tmp_path / "f").write_text("x")
    rc = main(["bench", "--models", "deit_tiny_patch16_224", "--output", str(tmp_path / "f")])
    one_line_error(rc, capsys.readouterr().err, "not a folder")


def test_parsers():
    assert parse_keep_rates(None) == [None]
    assert parse_keep_rates(["none,1.0", "0.7"]) == [None, 1.0, 0.7]
    with pytest.raises(LeanvitError):
        parse_keep_rates(["0"])
    assert parse_img_sizes(["224,256x320"]) == [(224, 224), (256, 320)]
    assert parse_img_sizes(None) == [None]
    with pytest.raises(LeanvitError):
        parse_img_sizes(["0"])


def test_configurations_share_weights_and_keep_vanilla():
    notes = []
    cfg = build_configurations(["deit_tiny_patch16_224"], [None, 1.0, 0.5], [(32, 32)], notes=notes)
    (vanilla, hw, extra), (one, _, _), (half, _, _) = cfg.values()
    assert hw == (32, 32) and extra["keep_rate"] == "-" and not notes
    from leanvit.reduction.evit import is_evit

    assert not is_evit(vanilla)  # the "none" row is the unmodified timm model
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(vanilla.eval()(x), one.eval()(x), atol=1e-5)
    assert one.model is half.model  # keep-rate views share one model


def test_format_table_and_memory():
    t = format_table([{"a": "x", "b": 1.234}, {"a": "long", "b": None}], [("a", "A", ""), ("b", "B", ".1f")])
    lines = t.splitlines()
    assert lines[0].split() == ["A", "B"] and "1.2" in lines[2] and "n/a" in lines[3]
    # exact on CPU: the 1 MiB hidden layer and its 1 MiB ReLU output are alive together; nothing else counts
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 1024), torch.nn.ReLU(),
                            torch.nn.Linear(1024, 4))
    assert forward_peak_memory_mb(m, batch_size=256, img_size=8) == pytest.approx(2.0, abs=0.01)
    # a reorganizing ViT needs less, repeatably
    from leanvit.models.factory import create_model

    vit = create_model("test_vit", img_size=64)
    evit = create_model("test_vit", img_size=64, keep_rate=0.25)
    full, reorg = (forward_peak_memory_mb(x, batch_size=4, img_size=64) for x in (vit, evit))
    assert 0 < reorg < full and full == forward_peak_memory_mb(vit, batch_size=4, img_size=64)


def test_benchmark_models_api_on_built_models():
    """What a demo calls: ready models (plain, or with a size and extra fields), rows back."""
    from leanvit.measure import benchmark_models
    from leanvit.models.factory import create_model
    from leanvit.reduction.evit import apply_evit

    vit = create_model("test_vit", img_size=32, num_classes=10)
    evit = apply_evit(create_model("test_vit", img_size=32, num_classes=10), keep_rate=0.5)
    rows = benchmark_models({"vit": vit, "evit": (evit, None, {"model": "vit"}), "evit64": (evit, 64)},
                            batch_size=2, warmup=0, repeats=1, memory=False, progress=False)
    assert [r["label"] for r in rows] == ["vit", "evit", "evit64"]
    assert [r["img_size"] for r in rows] == ["32x32", "32x32", "64x64"]
    assert [r["keep_rate"] for r in rows] == ["-", "0.5", "0.5"]
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] == rows[1]["img_per_s"] / rows[0]["img_per_s"]
    assert rows[2]["speedup"] == 1.0  # the first of its (model, size)
    assert rows[1]["gmacs"] < rows[0]["gmacs"] < rows[2]["gmacs"]
    assert all(r["peak_mem_mb"] is None and r["batch_size"] == 2 and r["dtype"] == "float32" for r in rows)
    with pytest.raises(LeanvitError):
        benchmark_models({"x": "not a model"})


def test_configurations_measure_each_once():
    """'none' and an EViT model's own keep rate are the same configuration: one row."""
    cfg = build_configurations(["evit_deit_tiny_patch16_224"], [None, 0.7, 0.5], [(32, 32)])
    assert [e["keep_rate"] for _, _, e in cfg.values()] == ["0.7", "0.5"]
    with pytest.raises(LeanvitError, match="smaller than"):
        build_configurations(["deit_tiny_patch16_224"], [None], [(8, 8)])


def test_interleaved_measure_balances_the_order():
    """Every model follows every other equally often, so a runtime that leaves its threads busy after a
    run (onnxruntime spinning) slows all the others alike, not always the one timed after it."""
    from leanvit.measure import interleaved_measure

    calls = []

    class Recorder(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            assert torch.is_inference_mode_enabled()  # no autograd graph: timing and memory of inference
            calls.append(self.name)
            return x.mean()

    res = interleaved_measure({n: Recorder(n) for n in "abc"}, batch_size=1, img_size=8, warmup=0, repeats=6)
    assert sorted(res) == ["a", "b", "c"] and calls.count("a") == 6
    follows = {}
    for start in range(0, len(calls), 3):  # within each round of three timed runs
        rnd = calls[start:start + 3]
        assert sorted(rnd) == ["a", "b", "c"]
        for pair in zip(rnd, rnd[1:]):
            follows[pair] = follows.get(pair, 0) + 1
    assert len(follows) == 6 and set(follows.values()) == {2}  # each ordered pair twice


def test_threads_of_a_command_run_in_process_are_given_back(tmp_path, capsys):
    """`leanvit bench --threads 1` run through main() in a process leaves the process's thread count as it was
    (a later command in the same process, a test or a notebook, measures with its own)."""
    import torch
    from cli_helpers import cli

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rc, _, err = cli(capsys, "bench", "--models", "test_vit", "--img-sizes", "32", "--batch-size", "2",
                         "--warmup", "0", "--repeats", "1", "--threads", "1", "--no-memory", "--output", tmp_path)
        assert rc == 0, err
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
