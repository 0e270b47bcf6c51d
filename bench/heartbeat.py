"""Heartbeat (and claim) throughput and latency under gunicorn, against PostgreSQL and Redis.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/agora REDIS_URL=redis://127.0.0.1:6379/0 \\
        python -m bench.heartbeat

Creates its own throwaway database (``test_<name>``), migrates it, enrolls ``--workers`` simulated workers
through ``marketplace.services.worker_enroll``, starts gunicorn on 127.0.0.1 and drives it from a separate
load-generator process (asyncio + httpx, keep-alive connections, 127.0.0.1 only, bounded in requests and
time). Endpoints: the trivial Django view ``/ping`` (the baseline, measured in the same run), the heartbeat,
and ``POST /api/v1/tasks/claim`` when the training app provides it (with no run active it answers 204 after
its own checks). Each is run closed-loop at ``--concurrency`` to find its throughput; the heartbeat is also
run open-loop at the rate ``--agents`` agents polling every ``--interval`` seconds would send (latency
measured from each request's scheduled time, so queueing is counted). The worker-token cache is filled for
every agent first, as it is in the steady state (agents beat every 30 s, entries live 120 s). The load generator shares the
machine's cores with the server, so the figures are a lower bound for a server with the cores to itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


# --- load generator (runs in its own process) ------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _request_factory(endpoint: str, tokens: list[str]):
    counter = {"n": 0}

    def make():
        counter["n"] += 1
        if endpoint == "ping":
            return "GET", "/ping", None, {}
        token = tokens[counter["n"] % len(tokens)]
        headers = {"Authorization": f"Bearer {token}"}
        if endpoint == "heartbeat":
            return "POST", "/api/v1/workers/heartbeat", {"state": "idle", "task_id": None, "progress": None}, headers
        return "POST", "/api/v1/tasks/claim", None, headers

    return make


async def _closed_loop(client, make, *, requests: int, seconds: float, concurrency: int):
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    remaining = {"n": requests}
    deadline = time.perf_counter() + seconds

    async def agent():
        while remaining["n"] > 0 and time.perf_counter() < deadline:
            remaining["n"] -= 1
            method, path, body, headers = make()
            started = time.perf_counter()
            response = await client.request(method, path, json=body, headers=headers)
            latencies.append(time.perf_counter() - started)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    started = time.perf_counter()
    await asyncio.gather(*(agent() for _ in range(concurrency)))
    return latencies, statuses, time.perf_counter() - started


async def _open_loop(client, make, *, rate: float, seconds: float):
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    total = int(rate * seconds)
    start = time.perf_counter()

    async def one(scheduled: float):
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        method, path, body, headers = make()
        try:
            response = await client.request(method, path, json=body, headers=headers)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        except Exception:  # noqa: BLE001  (a timeout counts as an error, not a crash of the bench)
            statuses[0] = statuses.get(0, 0) + 1
        latencies.append(time.perf_counter() - scheduled)

    await asyncio.gather(*(one(start + i / rate) for i in range(total)))
    return latencies, statuses, time.perf_counter() - start


def _server_cpu(pid: int | None) -> float:
    """CPU seconds used so far by gunicorn (master and workers): a cost per request that does not depend on
    how busy the rest of the machine is."""
    if not pid:
        return 0.0
    import psutil

    master = psutil.Process(pid)
    total = 0.0
    for proc in [master, *master.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


async def _drive(args) -> list[dict]:
    import httpx

    tokens = json.loads(Path(args.tokens_file).read_text())
    limits = httpx.Limits(max_connections=max(args.concurrency, 256), max_keepalive_connections=max(args.concurrency, 256))
    results = []
    async with httpx.AsyncClient(base_url=args.url, limits=limits, timeout=30.0) as client:
        plan = [(name, "closed") for name in args.endpoints] + [("heartbeat", "open")]
        for endpoint, mode in plan:
            make = _request_factory(endpoint, tokens)
            # Warm-up: connections opened, token cache filled for a slice of the agents, code paths hot.
            await _closed_loop(client, make, requests=args.warmup, seconds=30, concurrency=args.concurrency)
            cpu_before = _server_cpu(args.server_pid)
            if mode == "closed":
                lat, statuses, elapsed = await _closed_loop(
                    client, make, requests=args.requests, seconds=args.seconds, concurrency=args.concurrency)
                label = f"{endpoint} (closed loop, {args.concurrency} in flight)"
            else:
                rate = args.agents / args.interval
                lat, statuses, elapsed = await _open_loop(client, make, rate=rate, seconds=args.open_seconds)
                label = f"heartbeat at {rate:.0f}/s ({args.agents} agents every {args.interval:.0f} s)"
            results.append({
                "endpoint": endpoint, "mode": mode, "label": label, "requests": len(lat),
                "rps": len(lat) / elapsed, "p50_ms": _percentile(lat, 0.5) * 1000,
                "p99_ms": _percentile(lat, 0.99) * 1000, "mean_ms": statistics.fmean(lat) * 1000 if lat else 0,
                "statuses": statuses,
                "server_cpu_us": (_server_cpu(args.server_pid) - cpu_before) / max(1, len(lat)) * 1e6,
            })
    return results


# --- orchestration ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _db_url(db: dict) -> str:
    user = db.get("USER") or "postgres"
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    return f"postgres://{user}{password}@{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}/{db['NAME']}"


def _enroll(count: int) -> list[str]:
    from django.contrib.auth import get_user_model
    from django.db import transaction

    from marketplace.services import enrollment_token_create, worker_enroll

    owners = [get_user_model().objects.create_user(username=f"bench-owner-{i}")  # no password: unusable
              for i in range(max(1, count // 100))]
    tokens = []
    hardware = {"gpus": [{"name": "NVIDIA GeForce RTX 3090", "memory_mb": 24576}], "cpu_count": 8,
                "memory_mb": 32768, "torch": "2.13.0", "cuda": "12.4"}
    with transaction.atomic():  # one commit for the lot; each enrollment is still the real service
        for i in range(count):
            secret = enrollment_token_create(owner=owners[i % len(owners)]).token
            tokens.append(worker_enroll(enrollment_token=secret, name=f"sim-{i}", hardware=hardware,
                                        benchmark={"tflops": 35.0, "mem_gbps": 900.0},
                                        agent_version="bench").token)
    return tokens


def _wait_http(url: str, timeout: float = 30.0):
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ping", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"gunicorn did not answer on {url}")


def _claim_available() -> bool:
    from django.urls import NoReverseMatch, reverse

    try:
        reverse("api-task-claim")
    except NoReverseMatch:
        return False
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=10_000, help="simulated workers enrolled (distinct tokens)")
    parser.add_argument("--agents", type=int, default=10_000, help="agents for the open-loop heartbeat rate")
    parser.add_argument("--interval", type=float, default=30.0, help="heartbeat interval of those agents (s)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight, closed loop")
    parser.add_argument("--requests", type=int, default=6000, help="requests per endpoint, closed loop (bound)")
    parser.add_argument("--seconds", type=float, default=15.0, help="time per endpoint, closed loop (bound)")
    parser.add_argument("--open-seconds", type=float, default=15.0, help="duration of the open-loop run")
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--gunicorn-workers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--drive", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--tokens-file", help=argparse.SUPPRESS)
    parser.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--endpoints", nargs="*", default=["ping", "heartbeat"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.drive:
        print(json.dumps(asyncio.run(_drive(args))))
        return

    if not os.environ.get("DATABASE_URL", "").startswith("postgres") or not os.environ.get("REDIS_URL"):
        raise SystemExit("set DATABASE_URL (PostgreSQL) and REDIS_URL: this bench measures the production setup")
    prefix = f"bench-hb-{os.getpid()}"
    os.environ["AGORA_CACHE_PREFIX"] = prefix
    os.environ.setdefault("DJANGO_LOG_LEVEL", "WARNING")

    from bench.django_env import throwaway_database

    with throwaway_database() as connection, tempfile.TemporaryDirectory() as tmp:
        from django.conf import settings
        from django.core.cache import cache

        started = time.perf_counter()
        tokens = _enroll(args.workers)
        print(f"enrolled {len(tokens)} workers through the service in {time.perf_counter() - started:.1f} s")
        # Steady state: each agent beats every 30 s and the token cache keeps an entry 120 s, so the cache is
        # warm for every agent. Fill it now, as a run of agents would have.
        from marketplace.auth import worker_for_token

        for token in tokens:
            worker_for_token(token)
        tokens_file = Path(tmp) / "tokens.json"
        tokens_file.write_text(json.dumps(tokens))
        endpoints = ["ping", "heartbeat"] + (["claim"] if _claim_available() else [])
        if "claim" not in endpoints:
            print("POST /api/v1/tasks/claim is not available in this checkout: skipped")

        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        env = dict(os.environ, DATABASE_URL=_db_url(connection.settings_dict), AGORA_CACHE_PREFIX=prefix,
                   DJANGO_SECRET_KEY=settings.SECRET_KEY, DJANGO_DEBUG="0",
                   AGORA_RATE_HEARTBEAT="100000000/min", DJANGO_LOG_LEVEL="WARNING",
                   AGORA_VAR_DIR=str(settings.VAR_DIR))
        connection.close()
        server = subprocess.Popen(
            [str(BIN / "gunicorn"), "agora.wsgi", "-b", f"127.0.0.1:{port}", "-k", "gthread",
             "-w", str(args.gunicorn_workers), "--threads", str(args.threads), "--keep-alive", "30",
             "--log-level", "warning", "--backlog", "2048"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=sys.stderr)
        try:
            _wait_http(url)
            driver = subprocess.run(
                [sys.executable, "-m", "bench.heartbeat", "--drive", "--url", url, "--tokens-file", str(tokens_file),
                 "--concurrency", str(args.concurrency), "--requests", str(args.requests),
                 "--seconds", str(args.seconds), "--open-seconds", str(args.open_seconds),
                 "--warmup", str(args.warmup), "--server-pid", str(server.pid), "--agents", str(args.agents), "--interval", str(args.interval),
                 "--endpoints", *endpoints],
                cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, check=True)
        finally:
            server.terminate()
            server.wait(20)
        results = json.loads(driver.stdout.strip().splitlines()[-1])

        from marketplace.services import worker_sweep_offline

        swept = worker_sweep_offline()
        client = cache._cache.get_client()
        for key in client.scan_iter(f"{prefix}:*"):
            client.delete(key)

    print(f"\ngunicorn gthread -w {args.gunicorn_workers} --threads {args.threads} on 127.0.0.1; load generator "
          f"in a separate process on the same {os.cpu_count()} cores; {len(tokens)} distinct worker tokens\n")
    print(f"{'endpoint':<52} {'requests':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'server CPU us/req':>17}"
          "  statuses")
    for r in results:
        print(f"{r['label']:<52} {r['requests']:>8} {r['rps']:>8.0f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
              f"{r['server_cpu_us']:>17.0f}  {r['statuses']}")
    closed = {r["endpoint"]: r for r in results if r["mode"] == "closed"}
    ratio = closed["heartbeat"]["rps"] / closed["ping"]["rps"]
    print(f"\nheartbeat / trivial view throughput: {ratio:.2f}")
    hb_cpu = closed["heartbeat"]["server_cpu_us"]
    if hb_cpu:
        print(f"server CPU per heartbeat {hb_cpu:.0f} us: {os.cpu_count()} cores given to the server alone would "
              f"sustain about {os.cpu_count() * 1e6 / hb_cpu:.0f} heartbeats/s")
    load = os.getloadavg()[0]
    print(f"load average at the end: {load:.1f} on {os.cpu_count()} cores (other work on the machine skews req/s)")
    print(f"sweep after the run: {swept['persisted']} workers' last_seen_at persisted in one bulk update")


if __name__ == "__main__":
    main()
