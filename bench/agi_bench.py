"""Benchmark: agi-bitrix against the no-logic floor, with a load generator that speaks FastAGI
exactly like Asterisk (full header block, `200 result=0` to every command).

Every server runs in a process of its own; the load generator is this process. Run:

    .venv/bin/python bench/agi_bench.py            # everything, ~3 minutes
    .venv/bin/python bench/agi_bench.py --quick    # smaller counts

It prints one line per scenario and a verdict against the targets of the issue; the figures in
README.md come from it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from agi_bitrix.testing.fake_asterisk import asterisk_header

BENCH = Path(__file__).resolve().parent
PYTHON = sys.executable


@dataclass
class Result:
    name: str
    sessions: int
    seconds: float
    latencies: list[float]
    failures: int
    portal_requests: int | None = None
    peak_rss_mib: float | None = None
    # CPU time (user+system) per session of the server, and of the portal emulator: on a 2-core
    # machine shared with the load generator, these say where the throughput goes.
    server_cpu_us: float | None = None
    portal_cpu_us: float | None = None

    @property
    def rate(self) -> float:
        return self.sessions / self.seconds

    def line(self) -> str:
        lat = sorted(self.latencies)
        p50 = statistics.median(lat) * 1000
        p99 = lat[int(len(lat) * 0.99) - 1] * 1000
        extra = ""
        if self.portal_requests is not None:
            extra += f"  portal req/call {self.portal_requests / self.sessions:.3f}"
        if self.peak_rss_mib is not None:
            extra += f"  peak RSS {self.peak_rss_mib:.1f} MiB"
        if self.server_cpu_us is not None:
            extra += f"  server CPU {self.server_cpu_us:.0f} us/session"
        if self.portal_cpu_us is not None:
            extra += f"  portal CPU {self.portal_cpu_us:.0f} us/session"
        return (f"{self.name:45} {self.rate:6.0f} sessions/s  p50 {p50:6.1f} ms  p99 {p99:7.1f} ms"
                f"  failures {self.failures}{extra}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


class Process:
    def __init__(self, *args: str, env: dict | None = None) -> None:
        self.popen = subprocess.Popen([PYTHON, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                      text=True, env={**os.environ, **(env or {})})

    def first_line(self) -> str:
        return self.popen.stdout.readline().strip()

    def stop(self) -> str:
        self.popen.send_signal(signal.SIGTERM)
        out, _ = self.popen.communicate(timeout=30)
        return out.strip()


def wait_for_port(port: int) -> None:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


async def one_session(port: int, callerid: str, index: int) -> float:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(asterisk_header(callerid=callerid, port=port, uniqueid=f"bench.{index}"))
    commands = 0
    while await reader.readline():
        commands += 1
        writer.write(b"200 result=0\n")
    writer.close()
    if commands != 1:
        raise RuntimeError(f"expected one command, got {commands}")
    return time.perf_counter() - started


async def load(port: int, sessions: int, concurrency: int, callerid) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    failures = 0
    counter = iter(range(sessions))

    async def worker() -> None:
        nonlocal failures
        for index in counter:
            try:
                latencies.append(await one_session(port, callerid(index), index))
            except (OSError, RuntimeError):
                failures += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies, failures


def bench_config(webhook_url: str, port: int, deadline: float = 2.0, ttl: float = 60.0,
                 metrics_port: int | None = None) -> Path:
    shipped = (BENCH.parent / "config" / "agi-bitrix.yaml").read_text(encoding="utf-8")
    routing = shipped[shipped.index("\nrouting:") + 1:]
    path = Path(tempfile.mkdtemp(prefix="agi-bench-")) / "bench.yaml"
    metrics = f"'127.0.0.1:{metrics_port}'" if metrics_port else "off"
    path.write_text(
        f"server: {{listen: '127.0.0.1:{port}', max_sessions: 5000, header_timeout: 10}}\n"
        f"http: {{listen: {metrics}}}\n"
        f"bitrix: {{webhook_url: '{webhook_url}', deadline: {deadline},"
        " rate_limit: {per_second: 10000, burst: 100000}, pool_size: 50}\n"
        f"cache: {{found_ttl: {ttl}, not_found_ttl: {ttl}}}\n" + routing, encoding="utf-8")
    return path


def start_agi_bitrix(webhook_url: str, **config) -> tuple[Process, int]:
    port = free_port()
    path = bench_config(webhook_url, port, **config)
    server = Process("-m", "agi_bitrix", "serve", "-c", str(path), "--log-level", "warning")
    wait_for_port(port)
    return server, port


def portal_requests_so_far(metrics_port: int) -> int:
    """Portal requests agi-bitrix has made, from its own /metrics (one request = one observation)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith("agi_bitrix_portal_request_seconds_count "):
                return int(float(line.split()[1]))
    raise RuntimeError("no agi_bitrix_portal_request_seconds_count in /metrics")


REPEATED = ["8916123456" + str(n) for n in range(10)]


def repeated(index: int) -> str:
    return REPEATED[index % 10]


def new_caller(index: int) -> str:
    return f"8926{index:07d}"


class Measured:
    """One server's share of interleaved rounds: sessions, time, latencies and CPU add up."""

    def __init__(self, name: str, process: Process, port: int, callerid, portal: Process | None = None,
                 metrics_port: int | None = None):
        self.name, self.process, self.port, self.callerid, self.portal = name, process, port, callerid, portal
        self.metrics_port = metrics_port
        self.portal_requests = 0
        self.sessions = self.failures = 0
        self.seconds = self.server_cpu = self.portal_cpu = 0.0
        self.latencies: list[float] = []
        self.offset = 0  # new callers stay new across rounds

    async def round(self, sessions: int, concurrency: int) -> None:
        cpu = cpu_seconds(self.process.popen.pid), cpu_seconds(self.portal.popen.pid) if self.portal else 0.0
        asked = portal_requests_so_far(self.metrics_port) if self.metrics_port else 0
        offset = self.offset
        seconds, lat, failures = await load(self.port, sessions, concurrency, lambda i: self.callerid(offset + i))
        self.offset += sessions
        if self.metrics_port:
            self.portal_requests += portal_requests_so_far(self.metrics_port) - asked
        self.server_cpu += cpu_seconds(self.process.popen.pid) - cpu[0]
        if self.portal:
            self.portal_cpu += cpu_seconds(self.portal.popen.pid) - cpu[1]
        self.sessions += sessions
        self.seconds += seconds
        self.latencies += lat
        self.failures += failures

    def result(self) -> Result:
        portal_requests = self.portal_requests if self.metrics_port else None
        return Result(self.name, self.sessions, self.seconds, self.latencies, self.failures, portal_requests,
                      peak_rss_mib(self.process.popen.pid), self.server_cpu / self.sessions * 1e6,
                      self.portal_cpu / self.sessions * 1e6 if self.portal else None)


async def scenario_throughput(sessions: int, concurrencies: tuple[int, ...], rounds: int = 4) -> list[Result]:
    """The floor and agi-bitrix take turns in rounds (floor, agi-bitrix, agi-bitrix, floor, ...):
    this machine's speed drifts by 10-20% from one minute to the next, which back-to-back runs
    would read as a difference between the servers. Each is measured at every concurrency, so
    that its throughput can be read where it is highest (see main)."""
    results = []
    for name, callerid in (("agi-bitrix, repeated callers", repeated),
                           ("agi-bitrix, new caller every call", new_caller)):
        floor_port = free_port()
        floor_process = Process(str(BENCH / "floor_server.py"), str(floor_port))
        portal = Process(str(BENCH / "portal_process.py"))
        metrics_port = free_port()
        server, port = start_agi_bitrix(portal.first_line(), metrics_port=metrics_port)
        wait_for_port(floor_port)
        await load(floor_port, 500, concurrencies[0], repeated)  # warm-up
        await load(port, 500, concurrencies[0], repeated)  # warm-up: the ten numbers, then from the cache
        pairs = []
        for index, concurrency in enumerate(concurrencies):
            ours = Measured(f"{name}, {concurrency} at once", server, port, callerid, portal, metrics_port)
            ours.offset = index * 1_000_000  # new callers stay new across rounds and concurrencies
            pairs.append((Measured(f"floor, {concurrency} at once", floor_process, floor_port, repeated), ours))
        per_round = sessions // rounds
        for index in range(rounds):
            for concurrency, (floor, ours) in zip(concurrencies, pairs, strict=True):
                for measured in (floor, ours) if index % 2 == 0 else (ours, floor):
                    await measured.round(per_round, concurrency)
        results += [measured.result() for pair in pairs for measured in pair]  # while the processes exist
        portal.stop()
        server.stop()
        floor_process.stop()
    return results


def best(results: list[Result], prefix: str) -> Result:
    """A server's throughput: its rate where it is highest, i.e. with enough sessions in flight
    to keep it busy."""
    return max((r for r in results if r.name.startswith(prefix)), key=lambda r: r.rate)


async def scenario_concurrent_sessions(count: int) -> Result:
    """`count` sessions open at once (the portal takes 2 s to answer): the server's memory."""
    portal = Process(str(BENCH / "portal_process.py"), "--fault", "slow", "--delay", "2")
    url = portal.first_line()
    server, port = start_agi_bitrix(url, deadline=5.0)
    seconds, lat, failures = await load(port, count, count, new_caller)
    rss = peak_rss_mib(server.popen.pid)
    server.stop()
    portal.stop()
    return Result(f"{count} concurrent sessions", count, seconds, lat, failures, peak_rss_mib=rss)


async def scenario_hung_portal(count: int, deadline: float) -> Result:
    portal = Process(str(BENCH / "portal_process.py"), "--fault", "hang")
    url = portal.first_line()
    server, port = start_agi_bitrix(url, deadline=deadline)
    seconds, lat, failures = await load(port, count, count, new_caller)
    server.stop()
    portal.stop()
    return Result(f"portal hung, {count} at once", count, seconds, lat, failures)


async def scenario_ten_numbers(count: int) -> Result:
    portal = Process(str(BENCH / "portal_process.py"), "--fault", "slow", "--delay", "0.3")
    url = portal.first_line()
    server, port = start_agi_bitrix(url)
    seconds, lat, failures = await load(port, count, 100, repeated)
    server.stop()
    requests = int(portal.stop().splitlines()[0])
    return Result(f"{count} calls from 10 numbers", count, seconds, lat, failures, requests)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts, for a smoke run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[20, 50],
                        help="sessions in flight; each server's throughput is its best of these")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sessions = 2000 if args.quick else 12000  # per server and concurrency

    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
          f"sessions in flight: {', '.join(map(str, args.concurrency))}")
    throughput = await scenario_throughput(sessions, tuple(args.concurrency))
    half = len(throughput) // 2
    for result in throughput:
        print(result.line(), flush=True)
    floor, repeated_result = best(throughput[:half], "floor"), best(throughput[:half], "agi-bitrix")
    floor_again, new_result = best(throughput[half:], "floor"), best(throughput[half:], "agi-bitrix")
    held = await scenario_concurrent_sessions(1000)
    print(held.line(), flush=True)
    hung = await scenario_hung_portal(500, deadline=2.0)
    print(hung.line(), flush=True)
    ten = await scenario_ten_numbers(1000)
    print(ten.line(), flush=True)

    checks = [
        ((f"repeated callers >= 75% of floor: {repeated_result.rate / floor.rate:.0%}"
          f" ({repeated_result.rate:.0f} / {floor.rate:.0f} sessions/s, each at its best)"),
         repeated_result.rate >= 0.75 * floor.rate),
        ((f"new caller every call >= 50% of floor: {new_result.rate / floor_again.rate:.0%}"
          f" ({new_result.rate:.0f} / {floor_again.rate:.0f} sessions/s, each at its best)"),
         new_result.rate >= 0.5 * floor_again.rate),
        (f"1000 concurrent sessions under 100 MiB: {held.peak_rss_mib:.1f} MiB",
         held.peak_rss_mib < 100 and held.failures == 0),
        (f"portal hung: 500 calls by fallback within deadline + 0.5 s: max {max(hung.latencies):.2f} s",
         max(hung.latencies) <= 2.5 and hung.failures == 0),
        (f"1000 calls from 10 numbers: {ten.portal_requests} portal request(s) (<= 10)",
         ten.portal_requests <= 10),
    ]
    print()
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
