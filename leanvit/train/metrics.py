"""The per-epoch metrics log of a run: ``metrics.jsonl`` and ``metrics.csv`` in the run folder."""
from __future__ import annotations

import csv
import json
from pathlib import Path

__all__ = ["MetricsLog"]


class MetricsLog:
    """One row per epoch, appended to ``metrics.jsonl`` and ``metrics.csv``."""

    def __init__(self, out: Path):
        self.jsonl, self.csv = Path(out) / "metrics.jsonl", Path(out) / "metrics.csv"

    def truncate_after(self, epoch: int) -> None:
        """Drop rows of epochs >= ``epoch`` (written before a crash that is now being resumed)."""
        rows = self.rows()
        kept = [r for r in rows if r["epoch"] < epoch]
        if len(kept) != len(rows):
            self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in kept))
            self._write_csv(kept)

    def rows(self) -> list:
        if not self.jsonl.exists():
            return []
        return [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]

    def append(self, row: dict) -> None:
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self._write_csv(self.rows())

    def _write_csv(self, rows: list) -> None:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with self.csv.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
