"""Benchmark through a real Asterisk: agi-bitrix against the no-logic floor, measured in calls
that Asterisk completes.

Each call is a Local channel originated over AMI into a dialplan that runs
`AGI(agi://127.0.0.1:PORT/route)` and then reports the B24_ variables it got in a UserEvent;
the call counts as completed when that UserEvent arrives with the values the server must have
set, so a broken AGI path cannot look fast. A fixed number of calls are kept in flight: each
finished call starts the next. Asterisk is a fresh one from the test harness
(agi_bitrix/testing/pbx_harness.py), with a bench configuration; agi-bitrix runs the shipped
rules against the portal emulator, with ten repeated callers whose answers are already cached.

    .venv/bin/python bench/asterisk_bench.py [--calls N] [--in-flight 20]   # ~20 s by default

Needs root and the provisioned Asterisk root (scripts/provision-asterisk.sh). Prints one line
per server (calls/s = completed calls / wall time; latency from the Originate to the
UserEvent; the CPU that Asterisk, the server and this generator spent), then a verdict against
the issue's target: agi-bitrix >= 85% of the floor's calls/s, and no failed call.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from panoramisk import Manager
from panoramisk.message import Message

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))
from agi_bench import REPEATED, Process, bench_config, free_port, repeated, wait_for_port  # noqa: E402

from agi_bitrix.testing.ami_calls import CALLER_CONTEXT, CallDriver  # noqa: E402
from agi_bitrix.testing.pbx_harness import AsteriskPbx, AsteriskUnavailable, provision_root  # noqa: E402

TARGET_RATIO = 0.85
WARM_UP_CALLS = 300
# Calls per turn of a server; each turn ends by draining its calls in flight, alike for both.
ROUND_CALLS = 1000
CALL_TIMEOUT = 5.0
# A run whose path is broken stops early instead of waiting out every call.
MAX_FAILURES = 100
DID = "74951230000"
BENCH_CONTEXT = "agi-bitrix-bench"
DONE_EVENT = "AgiBitrixBenchDone"

# What the call reports once the AGI step is over: which call, and what the server set.
DONE_HEADERS = ("Call: ${TEST_CALL_ID},Status: ${B24_STATUS},Target: ${B24_TARGET},"
                "Cache: ${B24_CACHE},Agi: ${AGISTATUS}")

# The caller context is the one the harness's CallDriver originates into.
DIALPLAN = f"""
[{CALLER_CONTEXT}]
exten => _X.,1,Set(CALLERID(num)=${{TEST_CALLERID}})
 same => n,Goto(${{TEST_ENTRY_CONTEXT}},${{EXTEN}},1)

[{BENCH_CONTEXT}]
exten => _X.,1,AGI(${{BENCH_AGI_URL}})
 same => n,UserEvent({DONE_EVENT},{DONE_HEADERS})
 same => n,Hangup()
"""

# Only what the dialplan above needs (res_agi needs res_speech's symbols: it comes first).
MODULES = ("res_speech", "res_agi", "pbx_config", "app_userevent", "func_callerid")

# The floor sets these; agi-bitrix must set them per caller (shipped rules, sample CRM) and
# answer from its cache once warmed up.
FLOOR_VALUES = {"Status": "FOUND", "Target": "101"}
FOUND_CALLER = "89161234567"  # 79161234567 in the sample CRM: Anna, at work, extension 101


def agi_bitrix_values(caller: str) -> dict[str, str]:
    if caller == FOUND_CALLER:
        return {"Status": "FOUND", "Target": "101", "Cache": "hit"}
    return {"Status": "NOT_FOUND", "Target": "support", "Cache": "hit"}


@contextmanager
def bench_pbx() -> Iterator[AsteriskPbx]:
    """A fresh Asterisk from the test harness, reconfigured for load: minimal modules, no
    verbose log (it would write a line per dialplan step), and an AMI user that is sent
    only the bench's UserEvent. With every event (dozens a call) panoramisk was the
    bottleneck: ~250 calls/s with this process at 80% of a core, and some calls lost."""
    pbx = AsteriskPbx(provision_root(), "bench")
    pbx.write_config(DIALPLAN)
    etc = pbx.etc
    (etc / "modules.conf").write_text(
        "[modules]\nautoload = no\n" + "".join(f"load => {name}.so\n" for name in MODULES))
    (etc / "logger.conf").write_text("[general]\n[logfiles]\nmessages.log => notice,warning,error\n")
    with open(etc / "manager.conf", "a") as manager_conf:  # the AMI user's section is the last
        manager_conf.write(f"eventfilter(action(include),name(UserEvent),header(UserEvent),"
                           f"method(exact)) = {DONE_EVENT}\n")
    try:
        pbx.start()
        yield pbx
    finally:
        pbx.stop()


@contextmanager
def running(process: Process) -> Iterator[Process]:
    """Stops the process on the way out, unless the body already did."""
    try:
        yield process
    finally:
        if process.popen.poll() is None:
            process.stop()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Completions:
    """Hands each bench UserEvent to the call waiting for it. (CallDriver.wait_for wakes every
    waiter on every event: at a thousand calls a second that alone would load the generator.)"""

    def __init__(self, manager: Manager) -> None:
        self.waiting: dict[str, asyncio.Future] = {}
        manager.register_event("UserEvent", self._on_event)

    def expect(self, call_id: str) -> asyncio.Future:
        self.waiting[call_id] = asyncio.get_running_loop().create_future()
        return self.waiting[call_id]

    def forget(self, call_id: str) -> None:
        self.waiting.pop(call_id, None)

    def _on_event(self, manager: Manager, event: Message) -> None:
        future = self.waiting.pop(event.get("Call"), None)
        if future is not None:
            future.set_result((time.monotonic(), event))


@dataclass
class Target:
    """An AGI server under test and what its calls added up to over the rounds."""
    name: str
    process: Process
    agi_url: str
    expected: Callable[[str], dict[str, str]]  # caller -> the UserEvent headers its call must end with
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    failures: int = 0
    first_failure: str = ""
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    portal_requests: int | None = None

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def fail(self, why: str) -> None:
        self.failures += 1
        self.first_failure = self.first_failure or why

    def line(self) -> str:
        if len(self.latencies) < 2:
            return f"{self.name:28} no calls completed  failures {self.failures}: {self.first_failure}"
        lat = sorted(self.latencies)
        p50 = statistics.median(lat) * 1000
        p99 = statistics.quantiles(lat, n=100)[98] * 1000
        cpu = ", ".join(f"{who} {spent / self.seconds:.0%}" for who, spent in self.cpu_seconds.items())
        text = (f"{self.name:28} {self.rate:6.0f} calls/s  p50 {p50:5.1f} ms  p99 {p99:6.1f} ms"
                f"  calls {len(lat)}  failures {self.failures}  CPU (100% = a core): {cpu}")
        if self.portal_requests is not None:
            text += f"  portal requests {self.portal_requests}"
        if self.failures:
            text += f"\n    first failure: {self.first_failure}"
        return text


async def place_calls(driver: CallDriver, completions: Completions, target: Target, count: int,
                      in_flight: int, warm_up: bool = False) -> list[float]:
    """`count` calls to `target`, `in_flight` at a time; returns the latencies of those that
    completed with the expected values, the others count as the target's failures. (In the
    warm-up, agi-bitrix's cache is still filling: any B24_CACHE is right.)"""
    latencies: list[float] = []
    indexes = iter(range(count))

    async def caller_loop() -> None:
        for index in indexes:
            if target.failures >= MAX_FAILURES:
                return
            caller = repeated(index)
            call = driver.originate(DID, caller, BENCH_CONTEXT, {"BENCH_AGI_URL": target.agi_url})
            finished = completions.expect(call.call_id)
            await asyncio.wait((finished, call.originate_outcome), timeout=CALL_TIMEOUT,
                               return_when=asyncio.FIRST_COMPLETED)
            if not finished.done():
                # The event filter lets no OriginateResponse through: an outcome here is a refusal.
                completions.forget(call.call_id)
                outcome = call.originate_outcome.result() if call.originate_outcome.done() else "none"
                target.fail(f"call {call.call_id} from {caller}: no {DONE_EVENT} within "
                            f"{CALL_TIMEOUT} s; originate answer: {outcome}")
                continue
            done_at, event = finished.result()
            wanted = {name: value for name, value in target.expected(caller).items()
                      if not (warm_up and name == "Cache")}
            got = {name: event.get(name, "") for name in wanted}
            if got != wanted:
                target.fail(f"call {call.call_id} from {caller}: {got}, expected {wanted}, "
                            f"AGISTATUS {event.get('Agi')}")
                continue
            latencies.append(done_at - call.originated_at)

    await asyncio.gather(*(caller_loop() for _ in range(in_flight)))
    return latencies


async def measure_round(driver: CallDriver, completions: Completions, pbx: AsteriskPbx, target: Target,
                        count: int, in_flight: int) -> None:
    """One round of checked calls, added to the target with the CPU each process spent on it."""
    pids = {"asterisk": pbx.process.pid, "server": target.process.popen.pid}
    cpu_before = {who: cpu_seconds(pid) for who, pid in pids.items()}
    generator_before = time.process_time()
    started = time.monotonic()
    target.latencies += await place_calls(driver, completions, target, count, in_flight)
    target.seconds += time.monotonic() - started
    spent = {who: cpu_seconds(pid) - cpu_before[who] for who, pid in pids.items()}
    spent["generator"] = time.process_time() - generator_before
    for who, seconds in spent.items():
        target.cpu_seconds[who] = target.cpu_seconds.get(who, 0.0) + seconds


def start_agi_bitrix(webhook_url: str) -> tuple[Process, int]:
    """`agi-bitrix serve` with the shipped rules, the portal's rate limit lifted, metrics off
    and call logging (info) off, so that it does what production does per call, no more.
    The cache outlives any run: every measured call must be a hit."""
    port = free_port()
    # Without a metrics port, bench_config already turns metrics off.
    config = bench_config(webhook_url, port, ttl=3600)
    server = Process("-m", "agi_bitrix", "serve", "-c", str(config), "--log-level", "warning")
    wait_for_port(port)
    return server, port


async def bench(pbx: AsteriskPbx, calls: int, in_flight: int) -> tuple[Target, Target]:
    """Both servers run side by side and take rounds in turns (ABBA), so that drift in the
    machine's speed, which is large on a shared 2-core VM, weighs on both alike."""
    floor_port = free_port()
    with (running(Process(str(BENCH / "floor_server.py"), str(floor_port))) as floor_process,
          running(Process(str(BENCH / "portal_process.py"))) as portal):
        wait_for_port(floor_port)
        server, port = start_agi_bitrix(portal.first_line())
        floor = Target("floor (no-logic server)", floor_process, f"agi://127.0.0.1:{floor_port}/route",
                       lambda caller: FLOOR_VALUES)
        product = Target("agi-bitrix, repeated callers", server, f"agi://127.0.0.1:{port}/route",
                         agi_bitrix_values)
        with running(server):
            driver = await CallDriver.connect(pbx.ami_port, pbx.ami_username, pbx.ami_secret)
            try:
                completions = Completions(driver.manager)
                for target in (floor, product):  # fills agi-bitrix's cache, among others
                    await place_calls(driver, completions, target, WARM_UP_CALLS, in_flight, warm_up=True)
                rounds = [ROUND_CALLS] * (calls // ROUND_CALLS)
                if calls % ROUND_CALLS:
                    rounds.append(calls % ROUND_CALLS)
                for number, count in enumerate(rounds):
                    for target in (floor, product) if number % 2 == 0 else (product, floor):
                        await measure_round(driver, completions, pbx, target, count, in_flight)
            finally:
                driver.close()
        product.portal_requests = int(portal.stop().splitlines()[-1])
    # Only the warm-up may reach the portal: one request per caller fills the cache.
    if product.portal_requests > len(REPEATED):
        product.fail(f"{product.portal_requests} portal requests for {len(REPEATED)} callers: "
                     "the cache was not used")
    return floor, product


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000, help="measured calls per run")
    parser.add_argument("--in-flight", type=int, default=20, help="calls kept in flight")
    args = parser.parse_args()
    # Asterisk inherits it: every call in flight holds several descriptors there.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # A SIGTERM unwinds like an error, so Asterisk and the servers are stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
          f"{args.calls} calls per run, {args.in_flight} in flight", flush=True)
    try:
        with bench_pbx() as pbx:
            floor, product = asyncio.run(bench(pbx, args.calls, args.in_flight))
    except AsteriskUnavailable as error:
        print(f"FAIL  no Asterisk: {error}")
        return 1
    print(floor.line())
    print(product.line())
    ratio = product.rate / floor.rate if floor.rate else 0.0
    ok = ratio >= TARGET_RATIO and floor.failures == 0 and product.failures == 0
    print(f"{'PASS' if ok else 'FAIL'}  through a real Asterisk, repeated callers >= {TARGET_RATIO:.0%}"
          f" of floor: {ratio:.1%} ({product.rate:.0f} / {floor.rate:.0f} calls/s),"
          f" failures {floor.failures} + {product.failures}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
