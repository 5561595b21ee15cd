"""`leanvit flops` end to end, and its user errors."""
import subprocess
import sys


def leanvit(*args):
    return subprocess.run([sys.executable, "-m", "leanvit.cli", *args], capture_output=True, text=True, timeout=300)


def test_flops_evit_and_plain():
    r = leanvit("flops", "evit_deit_small_patch16_224", "--keep-rate", "0.7")
    assert r.returncode == 0, r.stderr
    assert "3.03 GMACs" in r.stdout and "22.05M params" in r.stdout
    r = leanvit("flops", "deit_small_patch16_224", "--keep-rate", "0.5", "--img-size", "304")
    assert r.returncode == 0, r.stderr
    assert "4.44 GMACs" in r.stdout and "304x304" in r.stdout


def test_flops_user_errors():
    r = leanvit("flops", "evit_deit_smal_patch16_224")
    assert r.returncode == 2
    assert "unknown model 'evit_deit_smal_patch16_224'" in r.stderr and "evit_deit_small_patch16_224" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = leanvit("flops", "evit_deit_small_patch16_224", "--keep-rate", "1.2")
    assert r.returncode == 2 and "keep_rate must be in (0, 1]" in r.stderr and "Traceback" not in r.stderr
    r = leanvit("flops", "resnet18", "--keep-rate", "0.5")
    assert r.returncode == 2 and "VisionTransformer" in r.stderr
