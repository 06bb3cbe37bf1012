"""Self-registration for Python services: join the gateway, stay joined, leave at exit.

    from gateway_app.registration import SelfRegistration

    registration = SelfRegistration("http://127.0.0.1:8080", "orders", "http://10.0.0.7:8000",
                                    ttl=30)
    registration.start()      # registers; heartbeats every ttl/3 from a daemon thread
    ...
    registration.stop()       # deregisters (also done at interpreter exit)

With a ``ttl`` the instance holds a lease: a daemon thread renews it every ``ttl / 3`` seconds,
and registers again when the gateway answers 404 (it restarted without the registration, or
the lease lapsed while the network was down). Without a ``ttl`` it registers once with the
seed's text body ``name,address`` and stays until deregistered.

From an address outside ``GATEWAY_ADMIN_ALLOW`` it needs a credential, sent as a bearer
token: a registration credential for its service (``registration_token=``, else
``GATEWAY_REGISTRATION_TOKEN`` in the environment; made with ``gateway token --register
NAME``), or the admin token (``admin_token=``, else ``GATEWAY_ADMIN_TOKEN``). The
registration credential is preferred: it can touch nothing but its own services.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Any

import requests

log = logging.getLogger("gateway.registration")


class RegistrationError(Exception):
    """The gateway refused the registration, or could not be reached."""


class SelfRegistration:
    def __init__(self, gateway_url: str, name: str, address: str, ttl: float | None = None,
                 weight: int | None = None, metadata: dict[str, str] | None = None,
                 admin_token: str | None = None, timeout: float = 5.0,
                 registration_token: str | None = None) -> None:
        self.gateway_url = gateway_url.rstrip("/")
        self.name = name
        self.address = address
        self.ttl = ttl
        self.weight = weight
        self.metadata = metadata
        self.timeout = timeout
        #: The instance as the gateway last described it (``id``, ``expires_at``...).
        self.instance: dict[str, Any] | None = None
        self._session = requests.Session()
        token = (registration_token or admin_token
                 or os.environ.get("GATEWAY_REGISTRATION_TOKEN")
                 or os.environ.get("GATEWAY_ADMIN_TOKEN"))
        if token:
            self._session.headers["Authorization"] = f"Bearer {token.strip()}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the calls ---------------------------------------------------------------------------

    def _call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        try:
            return self._session.request(method, self.gateway_url + path, timeout=self.timeout,
                                         **kwargs)
        except requests.RequestException as exc:
            raise RegistrationError(f"cannot reach the gateway at {self.gateway_url}: "
                                    f"{exc}") from None

    def register(self) -> dict[str, Any]:
        """Register (or renew) the instance; its description, or :class:`RegistrationError`."""
        if self.ttl is None and self.weight is None and self.metadata is None:
            response = self._call("POST", "/register_service",
                                  data=f"{self.name},{self.address}",
                                  headers={"Content-Type": "text/plain"})
        else:
            doc: dict[str, Any] = {"name": self.name, "address": self.address, "ttl": self.ttl}
            if self.weight is not None:
                doc["weight"] = self.weight
            if self.metadata is not None:
                doc["metadata"] = self.metadata
            response = self._call("POST", "/register_service", json=doc)
        if response.status_code not in (200, 201):
            raise RegistrationError(f"the gateway refused the registration "
                                    f"(HTTP {response.status_code}): {response.text.strip()}")
        self.instance = response.json()["instance"]
        return self.instance

    def heartbeat(self) -> None:
        """Renew the lease; registers again when the gateway no longer knows the instance."""
        assert self.instance is not None
        response = self._call(
            "PUT", f"/_gateway/services/{self.name}/instances/{self.instance['id']}/heartbeat")
        if response.status_code == 404:
            log.warning("the gateway lost %s at %s; registering again", self.name, self.address)
            self.register()
        elif response.status_code != 200:
            raise RegistrationError(f"heartbeat refused (HTTP {response.status_code}): "
                                    f"{response.text.strip()}")
        else:
            self.instance = response.json()

    def deregister(self) -> None:
        response = self._call("POST", "/deregister_service", data=f"{self.name},{self.address}",
                              headers={"Content-Type": "text/plain"})
        if response.status_code not in (200, 404):
            raise RegistrationError(f"deregistration refused (HTTP {response.status_code}): "
                                    f"{response.text.strip()}")

    # -- the lifecycle -------------------------------------------------------------------------

    def start(self) -> dict[str, Any]:
        """Register now (raising if that fails), then keep the lease alive in the background."""
        instance = self.register()
        atexit.register(self.stop)
        if self.ttl is not None:
            self._thread = threading.Thread(target=self._beat, name="gateway-heartbeat",
                                            daemon=True)
            self._thread.start()
        return instance

    def _beat(self) -> None:
        assert self.ttl is not None
        period = self.ttl / 3
        while not self._stop.wait(period):
            try:
                self.heartbeat()
            except RegistrationError as exc:
                # Keep trying: the next beat may find the gateway back, before the lease lapses.
                log.warning("heartbeat for %s failed: %s", self.name, exc)

    def stop(self) -> None:
        """Stop heartbeating and deregister. Safe to call more than once."""
        if self._stop.is_set():
            return
        self._stop.set()
        atexit.unregister(self.stop)
        if self._thread is not None:
            self._thread.join(self.timeout)
        try:
            self.deregister()
        except RegistrationError as exc:
            log.warning("could not deregister %s: %s", self.name, exc)
        self._session.close()

    def __enter__(self) -> SelfRegistration:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
