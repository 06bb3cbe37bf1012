"""The Redis store's change notifications: a pub/sub subscription per process to the channel
every write publishes its new version on, so a worker's watcher wakes as soon as something
changed instead of at its next poll."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import redis

from ..throttle import Throttled
from .redis_client import REDIS_ERRORS

log = logging.getLogger("gateway.store")

#: Seconds between two pub/sub subscription attempts after one failed.
RESUBSCRIBE_SECONDS = 1.0


class ChangeSubscription:
    """The subscription to one change channel, made when first waited on, remade (at most
    every :data:`RESUBSCRIBE_SECONDS`) after it broke, and never shared across a fork."""

    def __init__(self, client: redis.Redis, channel: str, description: str) -> None:
        self._client = client
        self.channel = channel
        self.description = description
        self._lock = threading.Lock()
        self._pubsub: Any = None
        self._pid = 0
        self._resubscribe_at = 0.0
        self._warning = Throttled(log)

    def _subscription(self) -> Any:
        """The subscription, (re)made when due; ``None`` while Redis cannot be reached."""
        with self._lock:
            if self._pubsub is not None and self._pid == os.getpid():
                return self._pubsub
            self._pubsub = None  # inherited over fork: the parent's, leave it alone
            if time.monotonic() < self._resubscribe_at:
                return None
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.channel)
            except REDIS_ERRORS as exc:
                self._resubscribe_at = time.monotonic() + RESUBSCRIBE_SECONDS
                _close_quietly(pubsub)
                self._warning.warning("%s: cannot subscribe to %s (%s); polling the version "
                                      "until it can", self.description, self.channel, exc)
                return None
            self._pubsub, self._pid = pubsub, os.getpid()
            return pubsub

    def drop(self) -> None:
        """Close the subscription (it is remade a second later, when waited on)."""
        with self._lock:
            pubsub, self._pubsub = self._pubsub, None
            self._resubscribe_at = time.monotonic() + RESUBSCRIBE_SECONDS
        if pubsub is not None and self._pid == os.getpid():
            _close_quietly(pubsub)

    def wait(self, timeout: float, stop: threading.Event) -> None:
        """Block on the channel until a notification, ``timeout`` or ``stop``.

        Never raises: a broken subscription is dropped (and remade a second later) and the
        rest of ``timeout`` is waited out; the version check that follows catches up.
        """
        deadline = time.monotonic() + timeout
        try:
            pubsub = self._subscription()
            while pubsub is not None and not stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                message = pubsub.get_message(ignore_subscribe_messages=True,
                                             timeout=min(remaining, 0.5))
                if message is not None:
                    for _ in range(100):  # a burst of writes: one version check for all
                        if pubsub.get_message(ignore_subscribe_messages=True) is None:
                            break
                    return
        except Exception as exc:  # noqa: BLE001 (the watcher must survive anything)
            if not stop.is_set():
                self._warning.warning("%s: change subscription lost (%s); polling the "
                                      "version until it is back", self.description, exc)
            self.drop()
        remaining = deadline - time.monotonic()
        if remaining > 0:
            stop.wait(remaining)


def _close_quietly(pubsub: Any) -> None:
    try:
        pubsub.close()
    except Exception:  # noqa: BLE001, S110 (closing a broken connection may fail too)
        pass
