"""Running the ``leanvit`` command line from tests: as a subprocess, or in this process (fast)."""
import subprocess
import sys

from leanvit.cli import main


def leanvit(*args, cwd=None) -> subprocess.CompletedProcess:
    """``python -m leanvit.cli ARGS`` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "leanvit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def cli(capsys, *args):
    """The CLI in this process: (exit status, stdout, stderr)."""
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def cli_error(capsys, *args):
    """The CLI in this process: (exit status, stderr), for :func:`one_line_error`."""
    rc, _, err = cli(capsys, *args)
    return rc, err


def one_line_error(rc, err, *needles):
    assert rc == 2, (rc, err)
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def image_tree(root, classes=("a", "b"), per_class=4, size=24):
    """An ImageFolder tree (train/ and val/, one folder per class) of random RGB PNGs under ``root``."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            d = Path(root) / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(d / f"{i}.png")
    return Path(root)
