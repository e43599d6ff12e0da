"""`python -m agi_bitrix.testing.portal_cli`: the portal emulator with the sample CRM as a
webhook on a fixed port, for trying things by hand (curl, a real Asterisk, a server elsewhere).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from agi_bitrix.testing.portal import PORTAL_RATE_LIMIT, PortalEmulator
from agi_bitrix.testing.sample_data import SAMPLE_CALLS, SAMPLE_CRM, SAMPLE_USERS


def _parse_rate_limit(text: str) -> tuple[float, int]:
    rate, _, burst = text.partition(":")
    try:
        return float(rate), int(burst)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RATE:BURST such as 2:50, got {text!r}") from None


async def _serve(host: str, port: int, rate_limit: tuple[float, int] | None) -> None:
    emulator = PortalEmulator(SAMPLE_CRM, users=SAMPLE_USERS, rate_limit=rate_limit)
    url = await emulator.start(host, port)
    print(f"Bitrix24 portal emulator: webhook URL {url}", flush=True)
    example = f"{url}telephony.externalCall.searchCrmEntities.json?PHONE_NUMBER={SAMPLE_CALLS[0].phone}"
    print(f"Try: curl '{example}'", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await emulator.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m agi_bitrix.testing.portal_cli",
        description="Serve the sample CRM as a Bitrix24 inbound webhook, for manual testing.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--rate-limit",
        nargs="?",
        const=PORTAL_RATE_LIMIT,
        type=_parse_rate_limit,
        metavar="RATE:BURST",
        help="limit requests like the portal (default when given without a value: 2:50)",
    )
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port, args.rate_limit))


if __name__ == "__main__":
    main()
