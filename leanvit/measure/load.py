"""Machine load around a measurement: timings taken while other work keeps the cores busy are not
trustworthy, and a report must say so (``leanvit bench``, ``leanvit demo``)."""
from __future__ import annotations

from typing import Optional, Tuple

from leanvit.utils import machine_load

__all__ = ["LoadWatch"]


class LoadWatch:
    """The 1-minute load average at the start and the end of some work, and whether the machine was busy
    (load above the cores available to this process at either point)."""

    def __init__(self):
        self.start: Optional[Tuple[float, int]] = machine_load()
        self.end: Optional[Tuple[float, int]] = None

    def stop(self) -> "LoadWatch":
        self.end = machine_load()
        return self

    @property
    def cores(self) -> Optional[int]:
        got = self.end or self.start
        return got[1] if got else None

    @property
    def busy(self) -> bool:
        return any(v is not None and v[0] > v[1] for v in (self.start, self.end))

    @property
    def line(self) -> str:
        if self.start is None:
            return "machine load: unknown on this system"
        end = f", {self.end[0]:.1f} at the end" if self.end is not None else ""
        return f"machine load: {self.start[0]:.1f} at the start{end} (1-minute average; {self.cores} cores available)"

    @property
    def warning(self) -> Optional[str]:
        if not self.busy:
            return None
        peak = max(v[0] for v in (self.start, self.end) if v is not None)
        return (f"the machine was busy (load up to {peak:.1f} on {self.cores} cores): other work competed for the "
                "CPU, so throughputs and speed-ups are not trustworthy; rerun on an idle machine")
