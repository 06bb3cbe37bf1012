"""Warnings about lasting trouble, at most one per interval (an outage would otherwise log
once per request or per refresh)."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

#: Seconds between two warnings about the same trouble.
WARN_EVERY = 30.0


class Throttled:
    """Says when the next warning about one trouble is due, and logs it then."""

    def __init__(self, logger: logging.Logger | None = None, every: float = WARN_EVERY) -> None:
        self.logger, self.every, self.last = logger, every, -math.inf

    def due(self) -> bool:
        """Whether a warning may go out now (``every`` seconds since the last); counts as one."""
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            return True
        return False

    def warning(self, message: str, *args: Any) -> None:
        if self.due():
            assert self.logger is not None
            self.logger.warning(message, *args)
