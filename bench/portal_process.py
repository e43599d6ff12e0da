"""The portal emulator in a process of its own, for the benchmarks (so its CPU is not the load
generator's). Prints its webhook URL, then on SIGTERM the number of requests it answered and,
on a second line, the error codes it answered (JSON)."""

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's emulator
from agi_bitrix.testing.portal import PortalEmulator
from agi_bitrix.testing.sample_data import SAMPLE_CRM


def _pair(text: str) -> tuple[float, float]:
    first, _, second = text.partition(":")
    return float(first), float(second)


async def serve(args: argparse.Namespace) -> None:
    rate_limit = _pair(args.rate_limit) if args.rate_limit else None
    emulator = PortalEmulator(SAMPLE_CRM, search_time=args.search_time, round_trip=args.round_trip,
                              rate_limit=(rate_limit[0], int(rate_limit[1])) if rate_limit else None,
                              operating_limit=_pair(args.operating_limit) if args.operating_limit else None)
    owner = SAMPLE_CRM["79161234567"]
    for index in range(args.known):  # the callers bench/portal_bench.py sends: 8926NNNNNNN
        emulator.set_client(f"7926{index:07d}", owner)
    if args.fault == "slow":
        emulator.fail("slow", delay=args.delay)
    elif args.fault == "hang":
        emulator.fail("hang")
    url = await emulator.start("127.0.0.1", args.port)
    print(url, flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    print(len(emulator.requests), flush=True)  # HTTP requests: single lookups and batches
    print(json.dumps(dict(emulator.refusals)), flush=True)
    await emulator.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fault", choices=["none", "slow", "hang"], default="none")
    parser.add_argument("--delay", type=float, default=1.0)
    parser.add_argument("--search-time", type=float, default=0.0, help="seconds per searchCrmEntities")
    parser.add_argument("--round-trip", type=float, default=0.0, help="seconds the network adds per request")
    parser.add_argument("--rate-limit", metavar="RATE:BURST", help="the portal's request bucket, e.g. 2:50")
    parser.add_argument("--operating-limit", metavar="SECONDS:WINDOW", help="per-method execution time, e.g. 480:600")
    parser.add_argument("--known", type=int, default=0, help="how many 7926NNNNNNN numbers have an owner")
    asyncio.run(serve(parser.parse_args()))
