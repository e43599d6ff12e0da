"""Benchmark of click-to-call through a real Asterisk 22: from the portal's event to the agent's
phone ringing, many clicks at once, none lost or doubled.

The setup is the end-to-end test's (tests/asterisk/click_setup.py): the portal emulator with an
OAuth application, `agi-bitrix serve` configured as an admin does (installed through its install
callback, subscribed with `agi-bitrix events bind`, `ami`, `events`, `clicktocall`, `callcard`,
`users`), and a fresh Asterisk 22 from the test harness with the shipped sample and stand-in
phones. Each click is a genuine ONEXTERNALCALLSTART from a different user: in handler mode the
emulator POSTs it to the server; in offline mode it is queued in the emulator's offline queue,
which the server polls. A click is timed from the POST (or the moment it is queued) to the
agent's phone ringing: the time Asterisk stamps on the UserEvent the agent's stand-in sends as
its channel enters the dialplan (with the click's CALL_ID; read over an AMI connection of the
bench's own). Then each agent answers, the client is dialled, talks one second and hangs up, and
the call is finished.

    .venv/bin/python bench/click_bench.py [--clicks 50] [--poll-interval 1.0] [--round-trip 0.05] [--shipped-budget]
                                                                                # ~30 s; 60 s with --shipped-budget

Needs root and the provisioned Asterisk root (scripts/provision-asterisk.sh). Prints, per mode:
clicks, rung once / not rung / rung more than once (an agent's phone rings once per Originate),
calls finished once with 200, and the click-to-ring times; then a verdict against issue 23's
target: ringing within 0.5 s with the handler and within the poll interval + 0.5 s offline, for
every click, none lost or doubled.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import aiohttp

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from agi_bitrix.testing.pbx_harness import ASTERISK_22, AsteriskUnavailable, provision_root  # noqa: E402
from tests.asterisk.click_setup import (  # noqa: E402
    ANSWERING_AGENTS,
    CALL_START,
    FINISH,
    Click,
    PhoneWatch,
    click_to_call_setup,
    fresh_client,
    running_emulator,
    switch_mode,
)
from tests.conftest import until  # noqa: E402

HANDLER_TARGET = 0.5  # seconds from the event to the agent's phone ringing (issue 23)
SETTLE = 3.0  # seconds after the last finish in which a doubled ring or finish would show
WAIT = 60.0


@dataclass
class Round:
    mode: str
    target: float
    posted: dict[str, float]  # CALL_ID -> when the event was POSTed (or queued)
    rings: Counter[str]  # CALL_ID -> times the agent's phone rang for it
    ring_delays: list[float]
    finished_200: int
    finished_twice: int
    statuses: Counter[str]  # STATUS_CODE of each click's finish, "None": not finished

    @property
    def lost(self) -> int:
        return sum(1 for call_id in self.posted if self.rings[call_id] == 0)

    @property
    def doubled(self) -> int:
        return sum(1 for call_id in self.posted if self.rings[call_id] > 1)

    @property
    def passed(self) -> bool:
        return (not self.lost and not self.doubled and not self.finished_twice
                and self.finished_200 == len(self.posted) and max(self.ring_delays) <= self.target)

    def report(self) -> str:
        delays = sorted(self.ring_delays)
        p95 = delays[max(0, round(0.95 * len(delays)) - 1)]
        rung_once = len(self.posted) - self.lost - self.doubled
        return (f"{self.mode:8} {len(self.posted):2} click(s) at once: rung once {rung_once}, not rung {self.lost},"
                f" rung twice {self.doubled}; finished once with 200: {self.finished_200}, finished twice:"
                f" {self.finished_twice}; click to ring: median {statistics.median(delays) * 1000:.0f} ms,"
                f" p95 {p95 * 1000:.0f} ms, max {delays[-1] * 1000:.0f} ms (target <= {self.target * 1000:.0f} ms)"
                f" -> {'ok' if self.passed else 'FAILED'}"
                + ("" if self.passed else f"; finishes by STATUS_CODE: {dict(self.statuses)}"))


async def click_round(mode: str, target: float, count: int, clicks: Click, phones: PhoneWatch) -> Round:
    users = list(ANSWERING_AGENTS)[:count]
    opened = {user: (clicks.open_call(user, client), client) for user, client in
              ((user, fresh_client()) for user in users)}
    posted: dict[str, float] = {}

    async def send(user: str) -> None:
        call_id, client = opened[user]
        posted[call_id] = time.time()
        await clicks.portal.events.trigger(CALL_START, clicks.data(call_id, user, client), clicks.http)

    await asyncio.gather(*(send(user) for user in users))
    calls = clicks.portal.calls
    with contextlib.suppress(AssertionError):  # a call never finished is counted below, not raised
        await until(lambda: all(calls[call_id].finish_params for call_id in posted), WAIT, interval=0.1)
    await asyncio.sleep(SETTLE)
    rings: Counter[str] = Counter()
    first_ring: dict[str, float] = {}
    for _, fields in phones.agent_rings:
        call_id = fields.get("CallId", "")
        if call_id in posted:
            rings[call_id] += 1
            # Asterisk's own clock as the channel entered the dialplan (this host's clock), so the
            # time this process takes to read the AMI events of 50 calls is not counted.
            first_ring.setdefault(call_id, float(fields["At"]))
    finishes = Counter(request.params["CALL_ID"] for request in clicks.portal.requests_for(FINISH))
    statuses = [str((calls[call_id].finish_params or {}).get("STATUS_CODE")) for call_id in posted]
    return Round(mode, target, posted, rings, [first_ring[call_id] - posted[call_id] for call_id in first_ring],
                 finished_200=statuses.count("200"),
                 finished_twice=sum(1 for call_id in posted if finishes[call_id] > 1), statuses=Counter(statuses))


async def bench(count: int, poll_interval: float, round_trip: float, shipped_budget: bool) -> bool:
    root = provision_root()
    with tempfile.TemporaryDirectory(prefix="click-bench-") as workdir:
        async with running_emulator(round_trip=round_trip) as (portal, oauth), \
                click_to_call_setup(root, ASTERISK_22, Path(workdir), portal, oauth) as (server, pbx), \
                aiohttp.ClientSession() as http:
            if shipped_budget:
                # The request budget's defaults (2/s, bursts of 40), not the tests' unlimited one,
                # and the user directory's default refresh (the tests' 0.5 s would spend it).
                del server.config["bitrix"]["rate_limit"]
                server.config["users"] = {}
                await switch_mode(server, "handler")
            phones = PhoneWatch()
            await phones.connect(pbx)
            try:
                clicks = Click(portal, http)
                # One click alone first: the time without contention.
                rounds = [await click_round("handler", HANDLER_TARGET, 1, clicks, phones),
                          await click_round("handler", HANDLER_TARGET, count, clicks, phones)]
                await switch_mode(server, "offline", poll_interval)
                rounds.append(await click_round("offline", poll_interval + HANDLER_TARGET, count, clicks, phones))
            finally:
                phones.close()
    for measured in rounds:
        print(measured.report())
    return all(measured.passed for measured in rounds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clicks", type=int, default=50, help="clicks at once, each from its own user (<= 60)")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="events.offline.poll_interval, seconds")
    parser.add_argument("--round-trip", type=float, default=0.0,
                        help="seconds the network to the portal adds to each request (Bitrix24's cloud: about 0.05)")
    parser.add_argument("--shipped-budget", action="store_true",
                        help="the portal request budget's defaults (bitrix.rate_limit 2/s, burst 40), not unlimited")
    args = parser.parse_args()
    if not 1 <= args.clicks <= len(ANSWERING_AGENTS):
        parser.error(f"--clicks must be from 1 to {len(ANSWERING_AGENTS)}")
    try:
        return 0 if asyncio.run(bench(args.clicks, args.poll_interval, args.round_trip, args.shipped_budget)) else 1
    except AsteriskUnavailable as error:
        print(f"Asterisk not available: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
