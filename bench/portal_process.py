"""The portal emulator in a process of its own, for the benchmark (so its CPU is not the load
generator's). Prints its webhook URL, then on SIGTERM the number of requests it answered."""

import argparse
import asyncio
import signal

from agi_bitrix.testing.portal import PortalEmulator
from agi_bitrix.testing.sample_data import SAMPLE_CRM


async def serve(port: int, fault: str, delay: float) -> None:
    emulator = PortalEmulator(SAMPLE_CRM)
    if fault == "slow":
        emulator.fail("slow", delay=delay)
    elif fault == "hang":
        emulator.fail("hang")
    url = await emulator.start("127.0.0.1", port)
    print(url, flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    print(len(emulator.requests), flush=True)  # HTTP requests: single lookups and batches
    await emulator.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fault", choices=["none", "slow", "hang"], default="none")
    parser.add_argument("--delay", type=float, default=1.0)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.fault, args.delay))
