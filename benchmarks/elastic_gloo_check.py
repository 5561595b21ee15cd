"""Do torchrun elastic restarts work with gloo here? A leanvit-free check (torch only).

    python benchmarks/elastic_gloo_check.py [--tries 3]

Runs ``torchrun --nproc_per_node 2 --max-restarts 2 <rendezvous options> THIS --worker`` for several
rendezvous configurations; in the first attempt rank 1 kills itself with SIGKILL after 20 all-reduces;
the restarted workers run 40 all-reduces and exit 0. Prints, per configuration, how many tries finished.
"""
import argparse
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reliability import _kill_tree  # noqa: E402  (the same kill of a torchrun tree; torch only, no leanvit)

# name -> (torchrun options, extra environment)
CONFIGS = {
    "--standalone": (["--standalone"], {}),
    "c10d localhost:0": (["--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "--rdzv-id", "x"], {}),
    "static --master-port": (["--master-addr", "127.0.0.1", "--master-port", "29561"], {}),
    "--standalone GLOO_SOCKET_IFNAME=lo": (["--standalone"], {"GLOO_SOCKET_IFNAME": "lo"}),
    "--standalone TORCH_GLOO_LAZY_INIT=1": (["--standalone"], {"TORCH_GLOO_LAZY_INIT": "1"}),
    # what leanvit does: a worker whose init_process_group has not returned after N s exits (status 3), so
    # that torchrun restarts the group again instead of waiting forever
    "--standalone + init watchdog 20 s, --max-restarts 4": (["--standalone", "--max-restarts", "4"],
                                                            {"INIT_WATCHDOG": "20"}),
}


def worker():
    import torch
    import torch.distributed as dist

    watchdog = None
    if os.environ.get("INIT_WATCHDOG"):
        import threading

        watchdog = threading.Timer(float(os.environ["INIT_WATCHDOG"]), os._exit, args=(3,))
        watchdog.daemon = True
        watchdog.start()
    dist.init_process_group("gloo")
    if watchdog is not None:
        watchdog.cancel()
    rank, attempt = dist.get_rank(), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    for i in range(40):
        t = torch.ones(1000)
        dist.all_reduce(t)
        if attempt == 0 and rank == 1 and i == 20:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.02)
    dist.barrier()
    print(f"rank {rank} attempt {attempt} done", flush=True)
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--tries", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--only", default=None)
    a = ap.parse_args()
    if a.worker:
        return worker()
    print(f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for name, (opts, extra_env) in CONFIGS.items():
        if a.only and a.only != name:
            continue
        ok, notes = 0, []
        for _ in range(a.tries):
            restarts = [] if "--max-restarts" in opts else ["--max-restarts", "2"]
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *restarts,
                   *opts, __file__, "--worker"]
            t0 = time.time()
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=dict(os.environ, OMP_NUM_THREADS="1", **extra_env), start_new_session=True)
            try:
                out, err = p.communicate(timeout=a.timeout)
                good = p.returncode == 0 and out.count(" done") == 2
                ok += good
                attempts = sorted({line.split("attempt ")[1].split()[0] for line in out.splitlines()
                                   if "attempt" in line})
                notes.append(f"{'ok' if good else 'rc %d' % p.returncode} {time.time() - t0:.0f}s"
                             f"{' (finished in attempt ' + ','.join(attempts) + ')' if good else ''}")
            except subprocess.TimeoutExpired:
                _kill_tree(p.pid)
                p.communicate()
                notes.append(f"hung>{a.timeout:.0f}s")
        print(f"{name}: {ok}/{a.tries} finished ({', '.join(notes)})", flush=True)


if __name__ == "__main__":
    main()
