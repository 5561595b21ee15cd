"""The per-epoch metrics log of a run: ``metrics.jsonl`` and ``metrics.csv`` in the run folder.

Both files are rewritten whole and atomically (temporary file, fsync, rename) on every change, so a kill
never leaves a half-written row; on resumption they are rebuilt from the checkpoint's history, so a row
lost between the checkpoint and the write comes back and rows of work that was undone disappear.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import List

from leanvit.checkpoints import write_atomically

__all__ = ["MetricsLog"]

log = logging.getLogger(__name__)


def _write_atomic(path: Path, text: str) -> None:
    write_atomically(path, lambda f: f.write(text), binary=False)


class MetricsLog:
    """One row per epoch in ``metrics.jsonl`` and ``metrics.csv``."""

    def __init__(self, out: Path):
        self.jsonl, self.csv = Path(out) / "metrics.jsonl", Path(out) / "metrics.csv"

    def rows(self) -> List[dict]:
        """The rows on disk; a line that does not parse (a partial write of an older version) is dropped
        with a note, never a traceback."""
        if not self.jsonl.exists():
            return []
        rows, bad = [], 0
        for line in self.jsonl.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
        if bad:
            log.warning(f"note: dropped {bad} unreadable line(s) of {self.jsonl} (a partial write)")
        return rows

    def start(self, history: List[dict]) -> None:
        """The log as a run (re)starts: exactly ``history`` (the checkpoint's rows; [] for a fresh run)."""
        existed = self.jsonl.exists()
        epochs = {r.get("epoch") for r in self.rows()}
        restored = [r["epoch"] + 1 for r in history if r.get("epoch") not in epochs]
        if restored and existed:
            log.info(f"metrics: restored the row(s) of epoch(s) {restored} from the checkpoint")
        self.write(list(history))

    def write(self, rows: List[dict]) -> None:
        """Rewrite both files with exactly ``rows``."""
        rows = list(rows)
        self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.jsonl, "".join(json.dumps(r) + "\n" for r in rows))
        _write_atomic(self.csv, self._csv_text(rows))

    @staticmethod
    def _csv_text(rows: list) -> str:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()
