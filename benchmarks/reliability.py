"""Reliability checks of ``leanvit train``: kill -9, SIGTERM, torchrun restarts; prints one line per check.

    PYTHONPATH=. python benchmarks/reliability.py [--out /tmp/leanvit_reliability] [--skip-torchrun]

Each check trains a tiny ViT on the embedded digits (2 epochs x 4 steps, rrc crop, flip, 3-Augment, mixup/
cutmix, drop-path: every random piece on) and compares the final ``last.pth`` (model and optimizer
tensors, bit for bit) with an uninterrupted run's:

1. kill -9 right after step 7 (the last recovery checkpoint: step 6, mid-epoch 2), then ``--resume``;
2. SIGTERM during step 6: the time to exit, the exit status (75) and the checkpoint's step; then ``--resume``;
3. torchrun, 2 processes (gloo): rank 1 killed with -9 after step 7, then ``torchrun ... --resume``;
4. ``torchrun --max-restarts 2 ... --auto-resume`` (``--standalone``: c10d rendezvous on a free port), rank 1
   killed with -9 after step 7: torchrun restarts both workers, which resume from the recovery checkpoint.

Runs use tests/train_driver.py, which only adds a pause at a known step for the kill to land on.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "train_driver.py"
RECIPE = """model: deit3_small_patch16_224
model_kwargs: {patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}
img_size: 32
data: digits
digits: {val_fraction: 0.05}
crop: rrc
hflip: 0.5
three_augment: true
mixup: 0.8
cutmix: 1.0
drop_path: 0.1
opt: adamw
lr: 1.0e-3
loss: ce
smoothing: 0.0
warmup_epochs: 1
epochs: 2
batch_size: 16
max_train_batches: 4
save_every_steps: 2
workers: 0
"""


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _cmd(recipe: Path, out: Path, *flags, nproc: int = 0, restarts: int = 0):
    train = ["train", "--recipe", str(recipe), "--output", str(out), "--no-progress", "--device", "cpu", *flags]
    if not nproc:
        return [sys.executable, str(DRIVER), *train]
    tr = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    if restarts:
        tr += ["--max-restarts", str(restarts)]
    return tr + [str(DRIVER), *train, "--batch-size", "8"]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> str:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"run ended (rc {proc.returncode}) before {path.name}: {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            raise RuntimeError(f"timed out waiting for {path}")
        time.sleep(0.05)
    return path.read_text()


def same_weights(a: Path, b: Path) -> str:
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    bad = [k for k in x["model"] if not torch.equal(x["model"][k], y["model"][k])]
    so, to = x["optimizer"]["state"], y["optimizer"]["state"]
    bad += [f"optimizer {i}.{n}" for i in so for n in so[i] if torch.is_tensor(so[i][n])
            and not torch.equal(so[i][n], to[i][n])]
    if x["step"] != y["step"]:
        bad.append(f"step {x['step']} vs {y['step']}")
    return "bit-identical" if not bad else f"DIFFERENT ({len(bad)}: {bad[:3]})"


def run(cmd, **env):
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(**env), timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[-12:])} failed (rc {r.returncode}):\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}")
    return r


def check_kill9(recipe, base, ref, nproc=0):
    out = base / f"kill9_{nproc or 1}p"
    mark = base / f"mark_kill9_{nproc}"
    p = subprocess.Popen(_cmd(recipe, out, nproc=nproc),
                         env=_env(PAUSE_AT_STEP=7, PAUSE_MARK=mark, PAUSE_RANK=1 if nproc else 0),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    pid = int(_wait_for(Path(f"{mark}.{1 if nproc else 0}"), p))
    os.kill(pid, signal.SIGKILL)
    if nproc:  # torchrun then stops the other worker and exits non-zero
        p.wait(timeout=120)
    else:
        p.wait(timeout=30)
    ck = torch.load(out / "last.pth", weights_only=True)
    at = (f"killed after step 7; last.pth at step {ck['step']} (epoch {ck['epoch'] + 1}, "
          f"step {ck.get('epoch_step')} of it)")
    r = run(_cmd(recipe, out, "--resume", nproc=nproc))
    resumed = [line for line in r.stdout.splitlines() if "resuming" in line or "stale lock" in line]
    return f"{at}; --resume: {same_weights(ref, out / 'last.pth')} ({' | '.join(resumed)})"


def check_sigterm(recipe, base, ref):
    out, mark = base / "sigterm", base / "mark_sigterm"
    p = subprocess.Popen(_cmd(recipe, out), env=_env(PAUSE_AT_STEP=5, PAUSE_SECONDS=2, PAUSE_MARK=mark),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(Path(f"{mark}.0"), p)
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=60)
    secs = time.time() - t0
    err = p.stderr.read().strip().splitlines()
    ck = torch.load(out / "last.pth", weights_only=True)
    run(_cmd(recipe, out, "--resume"))  # raises if the resumed run fails
    return (f"exit {p.returncode} {secs:.1f} s after SIGTERM (including the 2 s pause in step 5), last.pth at "
            f"step {ck['step']} (epoch {ck['epoch'] + 1}, step {ck.get('epoch_step')}); message: "
            f"'{err[-1] if err else ''}'; --resume: {same_weights(ref, out / 'last.pth')}")


def check_elastic(recipe, base, ref):
    out, mark = base / "elastic", base / "mark_elastic"
    cmd = _cmd(recipe, out, "--auto-resume", nproc=2, restarts=2)
    p = subprocess.Popen(cmd, env=_env(PAUSE_AT_STEP=7, PAUSE_MARK=mark, PAUSE_RANK=1, LEANVIT_INIT_TIMEOUT=30),
                         stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    pid = int(_wait_for(Path(f"{mark}.1"), p))
    t0 = time.time()
    os.kill(pid, signal.SIGKILL)
    try:
        stdout, stderr = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        _kill_tree(p.pid)
        return "HUNG (killed after 600 s)"
    (base / "elastic.stdout").write_text(stdout)
    (base / "elastic.stderr").write_text(stderr)
    if p.returncode != 0:
        errors = [line for line in stderr.splitlines() if "error" in line.lower() and "elastic/errors" not in line]
        return f"FAILED rc {p.returncode} (full output in {base}/elastic.stderr): {' | '.join(errors[-4:])}"
    resumed = [line for line in stdout.splitlines() if "resuming" in line]
    watchdog = stderr.count("did not connect within")
    return (f"torchrun exit 0 {time.time() - t0:.0f} s after the kill; {' | '.join(resumed)}; "
            f"{watchdog} init watchdog exit(s); "
            f"{same_weights(ref, out / 'last.pth')} with the uninterrupted 2-process run")


def _kill_tree(pid: int) -> None:
    """torchrun's workers live in their own sessions: kill the children first, then torchrun."""
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    for k in kids:
        _kill_tree(int(k))
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/leanvit_reliability")
    ap.add_argument("--skip-torchrun", action="store_true")
    ap.add_argument("--only-elastic", type=int, default=0, metavar="N",
                    help="only check 4 (after its 2-process reference), N times")
    a = ap.parse_args()
    base = Path(a.out)
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    recipe = base / "tiny.yaml"
    recipe.write_text(RECIPE)
    print(f"load at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; torch {torch.__version__}", flush=True)
    if a.only_elastic:
        run(_cmd(recipe, base / "ref_2p", nproc=2))
        for i in range(a.only_elastic):
            shutil.rmtree(base / "elastic", ignore_errors=True)
            for m in base.glob("mark_elastic*"):
                m.unlink()
            print(f"4. torchrun --standalone --max-restarts 2 --auto-resume, rank 1 killed (try {i + 1}):",
                  check_elastic(recipe, base, base / "ref_2p" / "last.pth"), flush=True)
        print(f"load at end: {os.getloadavg()[0]:.2f}")
        return
    t = time.time()
    run(_cmd(recipe, base / "ref_1p"))
    print(f"uninterrupted 1-process run: {time.time() - t:.0f} s", flush=True)
    print("1. kill -9, 1 process:", check_kill9(recipe, base, base / "ref_1p" / "last.pth"), flush=True)
    print("2. SIGTERM, 1 process:", check_sigterm(recipe, base, base / "ref_1p" / "last.pth"), flush=True)
    if not a.skip_torchrun:
        t = time.time()
        run(_cmd(recipe, base / "ref_2p", nproc=2))
        print(f"uninterrupted 2-process run: {time.time() - t:.0f} s", flush=True)
        ref2 = base / "ref_2p" / "last.pth"
        print("3. kill -9 of rank 1, torchrun 2 processes, then --resume:", check_kill9(recipe, base, ref2, nproc=2),
              flush=True)
        print("4. torchrun --standalone --max-restarts 2 --auto-resume, rank 1 killed:",
              check_elastic(recipe, base, ref2), flush=True)
    print(f"load at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
