"""Progress of the data tools (``dqrm data synth``, preparation): redrawn in place on a terminal, plain lines elsewhere.

On a terminal one line is redrawn at most once a second; on a pipe or a file (logs, CI) a line is written every
``line_seconds`` and at the end, so a log holds a few readable lines instead of thousands of carriage-return frames.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressMeter:
    """Counts units of work and reports ``label: done/total unit (rate unit/s)``.

    Args:
        total: units of work in all.
        label: what is being done (``"synthesize"``).
        unit: ``"rows"``, or ``"MB"`` for byte counts (given in bytes, shown in MB).
        enabled: False reports nothing.
        stream: where to report (standard error by default).
        line_seconds: on a non-terminal, seconds between lines.
    """

    def __init__(
        self,
        total: int,
        label: str,
        unit: str = "rows",
        enabled: bool = True,
        stream: TextIO | None = None,
        line_seconds: float = 10.0,
    ) -> None:
        self.total, self.label, self.unit, self.enabled = total, label, unit, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = self.stream.isatty()
        self.every = 1.0 if self.terminal else line_seconds
        self.done = 0
        self.start = self.last = time.perf_counter()

    def _scaled(self, n: float) -> str:
        return f"{n / 1e6:,.1f}" if self.unit == "MB" else f"{n:,.0f}"

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        finished = self.done >= self.total
        if not self.enabled or not (finished or now - self.last >= self.every):
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        text = (
            f"{self.label}: {self._scaled(self.done)}/{self._scaled(self.total)} {self.unit} "
            f"({self._scaled(rate)} {self.unit}/s)"
        )
        if self.terminal:
            print(f"\r{text}", end="\n" if finished else "", file=self.stream, flush=True)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        """End the report (a final line if the total was not reached)."""
        if self.enabled and self.done < self.total and self.done > 0:
            self.total = self.done
            self.update(0)
