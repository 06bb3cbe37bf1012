"""The registry at scale: what a registration costs with 10,000 services, what a flood of
registrations does to proxied requests, and what the listing weighs.

Run from the repository root (so this checkout's ``gateway_app`` is the one measured)::

    python -m bench.registry_scale                       # SQLite, then Redis
    python -m bench.registry_scale --store sqlite --services 10000

For each store it fills the registry with ``--services`` services directly through the store
(one instance each; fast, not what is measured), starts the gateway under gunicorn (2 workers,
16 threads, as ``make bench``) in front of nginx, and measures, all on 127.0.0.1:

- ``register``: ``--registrations`` new services registered one after another over HTTP
  (keep-alive): median, p90 and max ms per registration;
- ``get one``: ``GET /_gateway/services/NAME``, median ms;
- ``listing``: the bytes and ms of ``GET /_gateway/services`` as a client gets it by default,
  and of walking the whole listing page by page when the answer has a ``next`` cursor;
- ``proxy``: wrk (2 threads, 16 connections) on a proxied service for ``--duration`` seconds,
  quiet, then during a flood of ``--flood`` new registrations per second (sent on a schedule by
  a few threads; the rate reached is reported); p50 and p99 of each and the flood/quiet ratio.

Figures for a person to compare before and after a change; nothing asserts on time. On a
shared machine run it more than once: a single run can be off by a third. Redis: the shared
server on 127.0.0.1:6379, database 14, a key prefix of the run's own (deleted afterwards).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jwt
import requests

from gateway_app.stores import InstanceRecord, open_store
from gateway_app.validation import instance_id

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-secret-that-is-long-enough-0123456789"
REDIS_URL = "redis://127.0.0.1:6379/14"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise SystemExit(f"registry_scale: timed out waiting for {what}")


def fill(url: str, count: int) -> None:
    """``count`` services of one instance each, written through the store itself."""
    store = open_store(url)
    conn = getattr(store, "_connection", None)
    if conn is not None:  # SQLite: no fsync per row for the fill (not what is measured)
        conn().execute("PRAGMA synchronous = OFF")
    started = time.monotonic()
    for n in range(count):
        address = f"http://10.{n // 62500 % 250}.{n // 250 % 250}.{n % 250 + 1}:8080"
        store.register(InstanceRecord(service=f"svc-{n:06d}", id=instance_id(address),
                                      address=address, metadata={"zone": f"z{n % 3}"}))
    store.close()
    print(f"  filled {count} services in {time.monotonic() - started:.1f} s", flush=True)


class Processes:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], log: Path, **kwargs) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        self.procs.clear()


def start_nginx(procs: Processes, work: Path) -> int:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    port = free_port()
    prefix = work / "nginx"
    (prefix / "logs").mkdir(parents=True)
    temp = " ".join(f"{k}_temp_path {prefix}/{k};" for k in
                    ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (prefix / "nginx.conf").write_text(
        f"worker_processes 1; pid {prefix}/nginx.pid; error_log {prefix}/logs/error.log warn;\n"
        "events { worker_connections 1024; }\n"
        f"http {{ access_log off; keepalive_requests 1000000; {temp}\n"
        f"  server {{ listen 127.0.0.1:{port}; default_type application/json;\n"
        "    location / { return 200 '{\"message\": \"hello\"}'; } } }\n")
    procs.start([nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g",
                 "daemon off;"], prefix / "logs" / "stderr.log")
    wait_for(lambda: requests.get(f"http://127.0.0.1:{port}/", timeout=1).ok, 15, "nginx")
    return port


def start_gateway(procs: Processes, work: Path, store: str) -> str:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(GATEWAY_BIND=f"127.0.0.1:{port}", GATEWAY_DATA_DIR=str(work / "data"),
               GATEWAY_STORE=store, GATEWAY_JWT_SECRET=SECRET, GATEWAY_WORKERS="2",
               GATEWAY_THREADS="16")
    procs.start([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
                work / "gateway.log", cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: requests.get(url + "/_gateway/health", timeout=2).ok, 60, "the gateway")
    return url


def ms(values: list[float]) -> str:
    values = sorted(values)
    p90 = values[min(len(values) - 1, int(len(values) * 0.9))]
    return (f"median {statistics.median(values) * 1000:.1f} ms, p90 {p90 * 1000:.1f} ms, "
            f"max {values[-1] * 1000:.1f} ms")


def measure_registrations(url: str, count: int) -> None:
    session = requests.Session()
    times = []
    for n in range(count):
        started = time.perf_counter()
        response = session.post(url + "/register_service",
                                data=f"new-{n:05d},http://10.251.{n // 250}.{n % 250 + 1}:80",
                                timeout=60)
        times.append(time.perf_counter() - started)
        response.raise_for_status()
    session.close()
    print(f"  register ({count}, one after another): {ms(times)}", flush=True)


def measure_reads(url: str) -> None:
    session = requests.Session()
    times = []
    for n in range(50):
        started = time.perf_counter()
        session.get(f"{url}/_gateway/services/svc-{n * 97:06d}", timeout=30).raise_for_status()
        times.append(time.perf_counter() - started)
    print(f"  get one service: {ms(times)}", flush=True)
    started = time.perf_counter()
    response = session.get(url + "/_gateway/services", timeout=120)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    doc = response.json()
    print(f"  listing, default answer: {len(response.content) / 1e6:.2f} MB, "
          f"{len(doc['services'])} services, {elapsed * 1000:.0f} ms", flush=True)
    if doc.get("next"):
        pages, total, size, cursor = 0, 0, 0, None
        started = time.perf_counter()
        while True:
            page = session.get(url + "/_gateway/services", timeout=60,
                               params={"limit": 500, **({"after": cursor} if cursor else {})})
            page.raise_for_status()
            body = page.json()
            pages, total, size = pages + 1, total + len(body["services"]), size + len(
                page.content)
            cursor = body.get("next")
            if not cursor:
                break
        print(f"  listing, walked with limit=500: {pages} pages, {total} services, "
              f"{size / 1e6:.2f} MB, {(time.perf_counter() - started) * 1000:.0f} ms",
              flush=True)
    session.close()


def wrk(url: str, token: str, seconds: int) -> tuple[float, float, float]:
    out = subprocess.run(
        ["wrk", "-t2", "-c16", f"-d{seconds}s", "--timeout", "10s", "--latency",
         "-s", str(ROOT / "bench" / "report.lua"), "-H", f"Authorization: Bearer {token}",
         url], capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("BENCH "))
    fields = dict(part.split("=") for part in line.split()[1:])
    return float(fields["rps"]), int(fields["p50_us"]) / 1000, int(fields["p99_us"]) / 1000


def measure_proxy(url: str, token: str, seconds: int, rate: int) -> None:
    wrk(url + "/bench/", token, 2)  # warm-up
    rps, p50, p99 = wrk(url + "/bench/", token, seconds)
    print(f"  proxy, quiet: {rps:.0f} req/s, p50 {p50:.1f} ms, p99 {p99:.1f} ms", flush=True)
    stop = threading.Event()
    took: list[tuple[float, float]] = []  # (finished, seconds) of each registration

    def register(n: int) -> None:
        started = time.perf_counter()
        requests.post(url + "/register_service", timeout=60,
                      data=f"flood-{n:05d},http://10.252.{n // 250}.{n % 250 + 1}:80")
        took.append((time.monotonic(), time.perf_counter() - started))

    def flood() -> None:
        pool = ThreadPoolExecutor(max_workers=4)
        n, begun = 0, time.monotonic()
        while not stop.is_set():
            pool.submit(register, n)
            n += 1
            time.sleep(max(0.0, begun + n / rate - time.monotonic()))
        pool.shutdown(wait=True, cancel_futures=True)  # what could not be sent in time is not

    thread = threading.Thread(target=flood)
    thread.start()
    try:
        time.sleep(1)
        window = time.monotonic()
        frps, fp50, fp99 = wrk(url + "/bench/", token, seconds)
        window = (window, time.monotonic())
    finally:
        stop.set()
        thread.join()
    during = [t for done, t in took if window[0] <= done <= window[1]]
    print(f"  proxy, during a flood of {rate} registrations/s "
          f"({len(during) / (window[1] - window[0]):.0f}/s done, {ms(during or [0.0])}): "
          f"{frps:.0f} req/s, p50 {fp50:.1f} ms, p99 {fp99:.1f} ms; "
          f"p99 flood/quiet {fp99 / p99:.2f}", flush=True)


def run(kind: str, args: argparse.Namespace) -> None:
    print(f"{kind}, {args.services} services:", flush=True)
    work = Path(tempfile.mkdtemp(prefix="registry-scale-"))
    procs = Processes()
    prefix = f"bench-scale-{uuid.uuid4().hex[:8]}:"
    store = (f"sqlite:///{work}/data/registry.db" if kind == "sqlite"
             else f"{REDIS_URL}?prefix={prefix}")
    try:
        (work / "data").mkdir()
        fill(store, args.services)
        nginx_port = start_nginx(procs, work)
        url = start_gateway(procs, work, store)
        requests.post(url + "/register_service", data=f"bench,http://127.0.0.1:{nginx_port}",
                      timeout=60).raise_for_status()
        token = jwt.encode({"sub": "bench", "exp": int(time.time()) + 3600}, SECRET,
                           algorithm="HS256")
        wait_for(lambda: requests.get(url + "/bench/", timeout=5, headers={
            "Authorization": f"Bearer {token}"}).ok, 10, "the bench service to route")
        measure_registrations(url, args.registrations)
        measure_reads(url)
        measure_proxy(url, token, args.duration, args.flood)
    finally:
        procs.stop_all()
        log = (work / "gateway.log").read_text(errors="replace") if (
            work / "gateway.log").exists() else ""
        errors = [line for line in log.splitlines() if re.search(r"Traceback|ERROR", line)]
        if errors:
            print("  gateway log:\n    " + "\n    ".join(errors[:10]))
        if args.keep:
            print(f"  kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        if kind == "redis":
            import redis

            client = redis.Redis.from_url(REDIS_URL)
            keys = list(client.scan_iter(match=prefix + "*", count=1000))
            for start in range(0, len(keys), 1000):
                client.delete(*keys[start:start + 1000])
            client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=("sqlite", "redis", "both"), default="both")
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--registrations", type=int, default=100)
    parser.add_argument("--flood", type=int, default=50, help="registrations per second")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--keep", action="store_true", help="keep the gateway's log and data")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("registry_scale: needs wrk (apt-get install wrk)")
    for kind in ("sqlite", "redis") if args.store == "both" else (args.store,):
        run(kind, args)


if __name__ == "__main__":
    main()
