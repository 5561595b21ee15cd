"""``leanvit`` with a pause at a known optimizer step, so that tests can kill or signal a run at that point.

    python tests/train_driver.py train ...        (or: torchrun ... tests/train_driver.py train ...)

Environment:
    PAUSE_AT_STEP=S     after optimizer step S (and the recovery checkpoint it may write) the process writes
                        ``PAUSE_MARK.<rank>`` (its pid) and sleeps PAUSE_SECONDS (default 30): the test then
                        kills or signals it. Only in the first attempt of an elastic (torchrun) run.
    PAUSE_RANK=R        only rank R pauses (default: every rank).
Nothing else changes: the library is the installed one, unpatched otherwise.
"""
import os
import sys
import time


def _install():
    step = os.environ.get("PAUSE_AT_STEP")
    if not step or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return
    rank = int(os.environ.get("RANK", "0"))
    only = os.environ.get("PAUSE_RANK")
    if only is not None and int(only) != rank:
        return
    from leanvit.train import engine

    original = engine.Run._after_step

    def after_step(self, st):
        original(self, st)
        if st.step == int(step):
            mark = os.environ.get("PAUSE_MARK", "pause")
            with open(f"{mark}.{rank}.tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(f"{mark}.{rank}.tmp", f"{mark}.{rank}")
            time.sleep(float(os.environ.get("PAUSE_SECONDS", "30")))

    engine.Run._after_step = after_step


if __name__ == "__main__":
    _install()
    from leanvit.cli import main

    sys.exit(main(sys.argv[1:]))
