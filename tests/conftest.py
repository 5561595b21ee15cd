import os
import subprocess
import sys

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def demo_quick_run(tmp_path_factory):
    """`leanvit demo --quick` run once (subprocess, one thread): its report, plots and the three training runs
    (deit3_demo, evit_demo fine-tuned from it, shunted_demo), shared by the tests that read them."""
    out = tmp_path_factory.mktemp("demo_quick")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "leanvit.cli", "demo", "--quick", "--output", str(out), "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return out
