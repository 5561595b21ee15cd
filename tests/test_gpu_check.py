"""benchmarks/gpu_check.py: its CPU half (bf16 autocast training steps of every task) and its no-CUDA exit."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


@pytest.mark.slow
def test_cpu_half_trains_every_task_in_bf16():
    rows = gpu_check.cpu_half(steps=2)
    names = [r["model"] for r in rows]
    assert names == ["DeiT III-S", "EViT-DeiT-S 0.7", "ToMe-DeiT-S r=13", "Shunted-T", "Shunted-T RetinaNet",
                     "Shunted-T Semantic FPN"]
    for r in rows:
        assert r["ok"] and torch.isfinite(torch.tensor(r["loss"])), r


def test_train_steps_reports_a_non_finite_loss():
    class Bad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            return (x.mean((1, 2, 3), keepdim=False)[:, None] * self.w * float("inf")).expand(-1, 1000)

    r = gpu_check.train_steps("bad", Bad, "cpu", torch.bfloat16, 8, 2, steps=1)
    assert not r["ok"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the full check would run")
def test_without_cuda_it_says_so_and_exits_0():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "no CUDA device" in r.stdout, r.stderr[-2000:]
