"""An attempt's log on its worker: the lines its connector reports, buffered and bounded.

`StepRun.log(message, level)` lands here. Lines are written to PostgreSQL in batches
(emp_tasks.steps.attempt_logs.write): when FLUSH_LINES have gathered, at most every
FLUSH_INTERVAL_S while the connector checks for a stop, and once more when the attempt
ends, before it is recorded as completed or failed (so the lines are there when a client
reads the result). At most EMP_STEP_LOG_LINES lines are kept per attempt: the last one
kept says how many more were left out. A failed write is logged and its lines dropped;
the attempt goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime

from emp_tasks.core.config import get_settings
from emp_tasks.steps import attempt_logs

logger = logging.getLogger(__name__)

FLUSH_LINES = 50
FLUSH_INTERVAL_S = 1.0


class AttemptLog:
    def __init__(self, step_id: str, attempt: int, limit: int | None = None) -> None:
        self.step_id = step_id
        self.attempt = attempt
        self.limit = max(1, get_settings().step_log_lines if limit is None else limit)
        self._lock = threading.Lock()
        self._lines: list[tuple[str, str, datetime]] = []
        self._kept = 0
        self._dropped = 0
        self._last_flush = time.monotonic()

    def __call__(self, level: str, message: str) -> None:
        level = level if level in attempt_logs.LEVELS else "info"
        text = str(message)[: attempt_logs.MAX_LINE_CHARS]
        with self._lock:
            if self._kept >= self.limit:
                self._dropped += 1
                return
            self._lines.append((level, text, datetime.now(UTC)))
            self._kept += 1
            full = len(self._lines) >= FLUSH_LINES
        if full:
            self.flush()

    def flush_if_due(self) -> None:
        if self._lines and time.monotonic() - self._last_flush >= FLUSH_INTERVAL_S:
            self.flush()

    def flush(self, final: bool = False) -> None:
        """Write the buffered lines. The attempt's last allowed line is held until the end:
        if more came after it, the note saying how many were left out takes its place."""
        with self._lock:
            lines, self._lines = self._lines, []
            held = self._kept >= self.limit and lines and not final
            if held:
                self._lines.append(lines.pop())
            if final and self._dropped:
                dropped = self._dropped + (1 if lines and self._kept >= self.limit else 0)
                if lines and self._kept >= self.limit:
                    lines.pop()
                note = f"{dropped} more lines were not kept (EMP_STEP_LOG_LINES={self.limit})"
                lines.append(("warning", note, datetime.now(UTC)))
                self._dropped = 0
            self._last_flush = time.monotonic()
        if not lines:
            return
        try:
            attempt_logs.write(self.step_id, self.attempt, lines)
        except Exception:
            logger.warning(
                "Step log lines not stored",
                exc_info=True,
                extra={"action": "step_log_failed", "step_id": self.step_id, "lines": len(lines)},
            )
