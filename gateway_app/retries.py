"""When a failed upstream call may be tried again on another instance.

Only when nothing of the request can have reached the upstream (the connection failed), or the
request is idempotent (GET, HEAD, OPTIONS, PUT, DELETE, or it carries ``Idempotency-Key``) and
its body, if any, was small enough to keep for a replay. At most :data:`MAX_RETRIES` times,
inside the request's overall time, and under a budget: retries never exceed
:data:`BUDGET_RATIO` of the requests of the last window, so a failing upstream is not buried
under retries (Envoy's retry budgets; gRPC's retry throttling).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
MAX_RETRIES = 2
#: Seconds of the request's overall time that must be left for a retry to be worth starting.
MIN_TIME_LEFT = 0.05
#: Request bodies up to this size are kept in memory so they can be replayed.
REPLAYABLE_BODY_BYTES = 64 * 1024
BUDGET_RATIO = 0.2
#: Retries always allowed per window, so a quiet gateway can still retry around the five
#: failures that eject an instance.
BUDGET_MINIMUM = 5
BUDGET_WINDOW = 10.0


class RetryBudget:
    """Counts requests and retries per window (per process); says whether one more retry fits."""

    def __init__(self, ratio: float = BUDGET_RATIO, minimum: int = BUDGET_MINIMUM,
                 window: float = BUDGET_WINDOW) -> None:
        self._ratio = ratio
        self._minimum = minimum
        self._window = window
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._requests = 0
        self._retries = 0

    def _roll(self, now: float) -> None:
        if now - self._started >= self._window:
            self._started, self._requests, self._retries = now, 0, 0

    def request(self) -> None:
        with self._lock:
            self._roll(time.monotonic())
            self._requests += 1

    def try_retry(self) -> bool:
        with self._lock:
            self._roll(time.monotonic())
            if self._retries + 1 > max(self._minimum, self._ratio * self._requests):
                return False
            self._retries += 1
            return True


def is_idempotent(method: str, environ: Mapping[str, Any]) -> bool:
    """Whether a request may be sent twice: its method says so, or its ``Idempotency-Key``."""
    return method in IDEMPOTENT_METHODS or "HTTP_IDEMPOTENCY_KEY" in environ


def may_retry(safe_to_retry: bool, idempotent: bool, streamed: int | None, retries: int,
              time_left: float, budget: RetryBudget) -> bool:
    """Whether to try another instance after a failed attempt (and, if so, count the retry
    against ``budget``).

    ``safe_to_retry``: the failure says nothing of the request reached the upstream (the
    connection failed). ``streamed``: for a body streamed from the client, how many of its
    bytes were sent (a retry then needs none to have been); ``None`` for a body kept whole,
    or none, which can be sent again. ``retries``: how many were made already.
    """
    unsent = safe_to_retry and not streamed
    replayable = idempotent and streamed is None
    return (retries < MAX_RETRIES and (unsent or replayable) and time_left > MIN_TIME_LEFT
            and budget.try_retry())
