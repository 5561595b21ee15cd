"""`leanvit demo --quick` end to end (one subprocess, shared: conftest.py): report, table, plots; bad arguments."""

import pytest
from cli_helpers import cli_error, one_line_error


@pytest.mark.slow
def test_demo_quick_writes_report_and_plots(demo_quick_run):
    out = demo_quick_run
    report = (out / "report.md").read_text()
    for label in ("DeiT III (deit3_demo)", "fine-tuned (evit_demo)", "off the shelf", "Shunted (shunted_demo)"):
        assert label in report
    table = [line for line in report.splitlines() if line.startswith("| ") and "x |" in line]
    assert len(table) == 4
    for name in ("accuracy_vs_throughput.png", "kept_tokens.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for run in ("deit3_demo", "evit_demo", "shunted_demo"):
        assert (out / run / "best.pth").exists() and (out / run / "metrics.csv").exists()


def test_demo_bad_arguments_fail_cleanly(tmp_path, capsys):
    one_line_error(*cli_error(capsys, "demo", "--threads", "0", "--output", tmp_path), "--threads")
