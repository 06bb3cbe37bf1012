"""gunicorn settings for the gateway, from GATEWAY_* environment variables.

Run with ``gunicorn -c gunicorn.conf.py wsgi:app``. Settings are validated here, in the
master, before any worker forks, so a bad value stops the start with a message naming it.
"""

import collections
import errno
import gc
import glob
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import sys
import tempfile


def _metrics_dir() -> str:
    """The directory of the workers' metric files (prometheus_client's multiprocess mode, which
    it chooses when it is imported: so this runs before anything of the gateway is imported).

    One per master, ``<data dir>/metrics-<master pid>-*``: a reload (HUP) reads this file again
    and keeps it; one inherited from another gateway is not used. Not under the temp dir, whose
    cleaners remove files that look old, and these are written only through their mappings.
    Removed when the master exits; those of masters that died without exiting are removed
    here."""
    current = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    if os.environ.get("_GATEWAY_METRICS_PID") == str(os.getpid()) and os.path.isdir(current):
        return current
    data_dir = os.path.abspath((os.environ.get("GATEWAY_DATA_DIR") or "").strip() or "var")
    try:
        os.makedirs(data_dir, exist_ok=True)
        for stale in glob.glob(os.path.join(data_dir, "metrics-*-*")):
            pid = os.path.basename(stale).split("-")[1]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        directory = tempfile.mkdtemp(prefix=f"metrics-{os.getpid()}-", dir=data_dir)
    except OSError as exc:
        sys.stderr.write(f"gateway: configuration error: GATEWAY_DATA_DIR: cannot make the "
                         f"metrics directory in {data_dir}: {exc.strerror}\n")
        sys.exit(2)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    os.environ["_GATEWAY_METRICS_PID"] = str(os.getpid())
    return directory


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_METRICS_DIR = _metrics_dir()

from gunicorn.util import is_ipv6, parse_address  # noqa: E402

from gateway_app import metrics  # noqa: E402
from gateway_app.config import (  # noqa: E402
    ConfigError,
    load_settings,
    read_or_create_registration_key,
    read_or_create_secret,
)
from gateway_app.jwks import check_provider  # noqa: E402
from gateway_app.ratelimit import SharedBuckets  # noqa: E402
from gateway_app.stores import StoreError, healthboard  # noqa: E402
from gateway_app.stores import sqlite as sqlite_store  # noqa: E402
from gateway_app.worker_balance import FREE, ConnectionBoard  # noqa: E402

# One name for this gateway in the Via header it adds, shared by all its workers (they inherit
# the environment), so a request that comes back to any of them is seen as a loop.
os.environ.setdefault("GATEWAY_NODE_ID", secrets.token_hex(6))

try:
    _settings = load_settings()
except ConfigError as exc:
    sys.stderr.write(f"gateway: configuration error: {exc}\n")
    sys.exit(2)

# -- server ----------------------------------------------------------------------------------
bind = _settings.bind
# Each worker listens on a TCP socket of its own (SO_REUSEPORT) and the kernel spreads new
# connections over them by a hash of the client's address and port. On one shared socket,
# whichever worker wakes first accepts, so a client's keep-alive connections pile onto one
# worker while the other idles (seen: 15 of 16 connections on one worker of two). Not for unix
# sockets or sockets handed over by systemd.
reuse_port = (hasattr(socket, "SO_REUSEPORT") and not bind.startswith(("unix:", "fd://"))
              and "LISTEN_FDS" not in os.environ)
# gunicorn's gthread worker, made the front door: its event loop reads request heads (and small
# bodies) within the client timeouts before a thread takes them, and closes connections
# without blocking; it sheds connections while it holds more than its share, so the kernel's
# hash does not leave one worker with most of a client's keep-alive connections (see
# gateway_app/workers.py and gateway_app/worker_balance.py).
worker_class = "gateway_app.workers.BalancedThreadWorker"
workers = _settings.workers
threads = _settings.threads
# Client connections one worker holds at most; past it, its oldest idle ones are closed.
worker_connections = _settings.max_connections
# The workers' connection counts, made here in the master so that every worker shares it (a
# reload makes a new one for the new workers). Room for workers added with TTIN.
_BOARD = ConnectionBoard(2 * workers + 2)
# A client's idle keep-alive connection is held this long between requests.
keepalive = 5
# Seconds a worker may be silent before the master restarts it; gthread workers heartbeat
# from their main loop, so long streamed responses do not trip it.
timeout = 60
graceful_timeout = 30


def _worker_cpus():
    """The CPUs to give one worker each, or ``None`` to leave workers to the scheduler.

    With one worker per CPU the gateway has the machine to itself, and a worker kept on one CPU
    hands the GIL between its threads on that CPU: no wake-up across CPUs (an inter-processor
    interrupt, costly under a hypervisor) and warm caches. On the 2-core bench this took about
    10% more requests per second and p99 from about 38 ms to 31 ms (median of 10 runs each).
    With fewer or more workers than CPUs, the scheduler knows better."""
    if _settings.cpu_affinity == "off" or not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    return cpus if len(cpus) == _settings.workers else None


_CPUS = _worker_cpus()

# gunicorn's control socket is one per user by default: several gateways would fight over it.
control_socket_disable = True
# The gateway reads its client's address, scheme and host from the raw request and believes
# forwarding headers only from GATEWAY_TRUSTED_PROXIES (gateway_app/front.py). gunicorn's own
# handling trusts loopback by default: a client there could set SCRIPT_NAME or PATH_INFO (and
# so what gets routed) or X-Forwarded-Proto with a header. None of it is trusted here.
forwarded_allow_ips = ""
forwarder_headers = ""
secure_scheme_headers = {}
# Bounds on the request line and headers (gunicorn's defaults, stated).
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190

# -- logging -----------------------------------------------------------------------------------
# The gateway writes its own access log line per request; gunicorn's would double it.
accesslog = None
errorlog = "-"
loglevel = "info"


# -- hooks -------------------------------------------------------------------------------------
def _check_bind_free(server):
    """With ``reuse_port`` the workers bind, not the master: make sure the address is free
    first. A plain bind fails when anything listens there, SO_REUSEPORT or not; without this
    check, a second gateway on a taken port would share the port with the first one."""
    host, port = parse_address(bind)
    family = socket.AF_INET6 if is_ipv6(host) else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        why = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        server.log.error("GATEWAY_BIND: cannot listen on %s: %s", bind, why)
        sys.exit(2)


def _raise_open_files(server):
    """Let each worker open its connections: the soft limit on open files up to what
    ``GATEWAY_MAX_CONNECTIONS`` needs (with room for upstream connections and files), within
    the hard limit. The workers inherit it."""
    need = _settings.max_connections + 4 * _settings.threads + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    new = need if hard == resource.RLIM_INFINITY else min(need, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    if new < need:
        server.log.warning("gateway: GATEWAY_MAX_CONNECTIONS=%d needs about %d open files per"
                           " worker, but the limit is %d (ulimit -n)", _settings.max_connections,
                           need, new)


def on_starting(server):
    """Create what all workers share once, before they fork: the generated JWT secret and
    registration key, an empty rate-limit table, and the SQLite store's files (the registry's
    and the health board's: schema, WAL mode)."""
    if server.cfg.reuse_port:
        _check_bind_free(server)
    _raise_open_files(server)
    try:
        if _settings.uses_hmac:
            read_or_create_secret(_settings)
        read_or_create_registration_key(_settings)
    except ConfigError as exc:
        server.log.error("configuration error: %s", exc)
        sys.exit(2)
    if _settings.uses_provider:
        # The provider's keys, once, before any worker forks: an issuer that does not match
        # its discovery document, a document that is not JSON, a key set with no usable key
        # stop the start here; a provider that cannot be reached does not (workers retry).
        try:
            warning = check_provider(_settings)
        except ConfigError as exc:
            server.log.error("configuration error: %s", exc)
            sys.exit(2)
        if warning:
            server.log.warning("gateway: %s", warning)
    if _settings.store.startswith("sqlite:///"):
        try:
            sqlite_store.prepare(_settings.store[len("sqlite:///"):])
            healthboard.prepare(healthboard.health_path(_settings.store[len("sqlite:///"):]))
        except StoreError as exc:
            server.log.error("GATEWAY_STORE: cannot prepare the registry: %s", exc)
            sys.exit(2)
    SharedBuckets.reset(_settings.data_dir / "ratelimit.buckets")
    store = re.sub(r"//[^/@]*@", "//***@", _settings.store)  # no password in the log
    # (with reuse_port, gunicorn's own "Listening at" line has no address: the workers bind)
    server.log.info("gateway: listening on %s, store %s, %d workers x %d threads%s", bind,
                    store, _settings.workers, _settings.threads,
                    f", one per CPU ({','.join(map(str, _CPUS))})" if _CPUS else "")


def pre_fork(server, worker):
    """Give the worker about to start its slot on the connection board, its client timeouts,
    and its CPU: the one its siblings use least (a worker that replaces a dead one takes the
    CPU it left)."""
    siblings = list(server.WORKERS.values())
    slot = _BOARD.free_slot(
        w.gateway_slot for w in siblings if getattr(w, "gateway_board", None) is _BOARD)
    if slot is None:
        server.log.warning("gateway: no room on the connection board for another worker; it "
                           "runs without connection balancing until a restart")
    else:
        _BOARD.counts[slot] = FREE  # whatever a vanished predecessor left, until it publishes
    worker.gateway_board, worker.gateway_slot = _BOARD, slot
    worker.gateway_header_timeout = _settings.client_header_timeout
    worker.gateway_body_timeout = _settings.client_body_timeout
    if _CPUS:
        used = collections.Counter(getattr(w, "gateway_cpu", None) for w in siblings)
        worker.gateway_cpu = min(_CPUS, key=lambda cpu: (used[cpu], cpu))


def post_fork(server, worker):
    cpu = getattr(worker, "gateway_cpu", None)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def child_exit(server, worker):
    """A worker that died (or was stopped) no longer counts in the others' shares, and its
    metric files are folded into the archive (their sums kept, the files gone: otherwise every
    replaced worker leaves files that every scrape reads)."""
    if getattr(worker, "gateway_slot", None) is not None:
        worker.gateway_board.counts[worker.gateway_slot] = FREE
    pid = getattr(worker, "pid", None)
    if pid is None:
        return
    try:
        metrics.retire_worker(_METRICS_DIR, pid)
    except OSError as exc:
        server.log.warning("gateway: could not archive the metrics of worker %d: %s", pid, exc)


def on_exit(server):
    """The metric files go with the gateway."""
    if os.environ.get("_GATEWAY_METRICS_PID") == str(os.getpid()):
        shutil.rmtree(_METRICS_DIR, ignore_errors=True)


def _gateway_state(worker):
    app = getattr(worker, "wsgi", None)
    return getattr(app, "extensions", {}).get("gateway")


def post_worker_init(worker):
    """Readiness turns 503 the moment the worker is told to stop gracefully (SIGTERM), before
    gunicorn's own handler stops it taking connections; then the objects made while loading
    the app, which live as long as the worker, are moved out of the garbage collector's sight,
    so a full collection stops the worker's threads for well under a millisecond instead of
    about 20 (measured in process)."""
    state = _gateway_state(worker)
    previous = signal.getsignal(signal.SIGTERM)
    if state is not None and callable(previous):
        def stopping(signum, frame):
            state.begin_shutdown()
            previous(signum, frame)

        signal.signal(signal.SIGTERM, stopping)
        signal.siginterrupt(signal.SIGTERM, False)  # as gunicorn set it
    gc.freeze()


def worker_exit(server, worker):
    """Stop a worker's background threads (registry watcher, health checker) cleanly; it
    says "not ready" first."""
    state = _gateway_state(worker)
    if state is not None:
        state.close()
