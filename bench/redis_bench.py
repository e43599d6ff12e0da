"""Benchmark: cached callers through one server without Redis, with Redis (the near-cache in front),
and with Redis on every call (near_cache: 0), against the portal emulator and a real redis-server.

    .venv/bin/python bench/redis_bench.py            # 20,000 calls per run
    .venv/bin/python bench/redis_bench.py --quick    # 4,000

The load generator (FastAGI exactly like Asterisk, agi_bitrix.testing.fake_asterisk) shares the
process and its loop with the server, so the figures compare the three runs, not absolute speed.
It prints throughput, p50/p99 per run and the ratio to the run without Redis; README's "Scaling
out" quotes it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from agi_bitrix.app import Application
from agi_bitrix.config import parse_config
from agi_bitrix.testing.fake_asterisk import fake_call
from agi_bitrix.testing.portal import PortalEmulator
from agi_bitrix.testing.sample_data import SAMPLE_CRM

NUMBERS = [f"7903{n:07d}" for n in range(10)]
CONCURRENCY = 50


def config(webhook_url: str, redis: str) -> str:
    return f"""\
http: {{listen: off}}
server: {{listen: "127.0.0.1:4573"}}
bitrix: {{webhook_url: "{webhook_url}", deadline: 1.0}}
{redis}
routing:
  fallback_queue: support
"""


async def run(name: str, redis: str, calls: int) -> tuple[str, float, list[float]]:
    """(name, calls/s with CONCURRENCY callers, latencies of calls one at a time)."""
    async with PortalEmulator(SAMPLE_CRM) as portal:
        for number in NUMBERS:
            portal.set_client(number, SAMPLE_CRM["79161234567"])
        app = Application(parse_config(config(portal.webhook_url, redis), "bench.yaml"))
        host, port = await app.start("127.0.0.1", 0)
        try:
            for number in NUMBERS:  # cached from here on
                await fake_call(host, port, callerid=number, extension="74950000000")
            latencies: list[float] = []
            queue = iter(range(calls))

            async def caller() -> None:
                for index in queue:
                    started = time.perf_counter()
                    result = await fake_call(host, port, callerid=NUMBERS[index % 10], extension="74950000000")
                    latencies.append(time.perf_counter() - started)
                    assert result.variables["B24_STATUS"] == "FOUND", result.variables

            started = time.perf_counter()
            await asyncio.gather(*(caller() for _ in range(CONCURRENCY)))
            seconds = time.perf_counter() - started
            latencies.clear()  # under load they are queueing; the added latency shows one call at a time
            queue = iter(range(calls // 5))
            await caller()
        finally:
            await app.stop()
        assert len(portal.requests) <= len(NUMBERS), len(portal.requests)
    return name, calls / seconds, latencies


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    calls = 4000 if parser.parse_args().quick else 20000
    logging.basicConfig(level=logging.ERROR)
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not installed (apt-get install redis-server)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder = tempfile.mkdtemp()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--dir", folder], stdout=subprocess.DEVNULL)
    time.sleep(0.3)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        runs = (("without Redis", ""),
                ("with Redis, near-cache 1 s", f"redis: {{url: \"{url}\"}}"),
                ("with Redis on every call", f"redis: {{url: \"{url}\", near_cache: 0}}"))
        # Two rounds, interleaved, the better of each: a shared machine's noise is not Redis's cost.
        rounds = [[asyncio.run(run(name, redis, calls)) for name, redis in runs] for _ in range(2)]
        results = [max(pair, key=lambda result: result[1]) for pair in zip(*rounds, strict=True)]
    finally:
        server.kill()
        server.wait()
    base_rate = results[0][1]
    base_p50, base_p99 = percentile(results[0][2], 0.5), percentile(results[0][2], 0.99)
    print(f"{calls} calls from {len(NUMBERS)} cached numbers, {CONCURRENCY} at a time (calls/s), then"
          f" {calls // 5} one at a time (latency), per run:")
    for name, rate, latencies in results:
        p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
        print(f"  {name:28} {rate:7.0f} calls/s ({rate / base_rate:4.0%})  p50 {p50:5.2f} ms ({p50 - base_p50:+.2f})"
              f"  p99 {p99:6.2f} ms ({p99 - base_p99:+.2f})")
    verdict = "PASS" if results[1][1] >= 0.8 * base_rate else "FAIL"
    share = results[1][1] / base_rate
    print(f"{verdict}: with Redis (near-cache) at {share:.0%} of the throughput without it (target 80%)")


if __name__ == "__main__":
    main()
