"""`agi-bitrix demo`: the real server against a built-in Bitrix24 emulator, no account needed.

It starts the emulator with the sample CRM, starts the FastAGI server with the shipped default
config pointed at it, plays the sample callers through a FastAGI client that speaks exactly like
Asterisk, prints what each call would dial, then keeps serving so a real Asterisk can be
pointed at it.
"""

from __future__ import annotations

import errno
import logging
import sys
from importlib import resources

from agi_bitrix.app import Application, until_stopped
from agi_bitrix.config import Config, parse_config
from agi_bitrix.testing.fake_asterisk import fake_call
from agi_bitrix.testing.portal import PortalEmulator
from agi_bitrix.testing.sample_data import SAMPLE_CALLS, SAMPLE_CRM, SAMPLE_USERS


def default_config(webhook_url: str) -> Config:
    text = resources.files("agi_bitrix").joinpath("default-config.yaml").read_text(encoding="utf-8")
    return parse_config(text, "built-in default config", {"AGI_BITRIX_WEBHOOK_URL": webhook_url})


async def run_demo(host: str, port: int, *, once: bool = False) -> int:
    """`host`, `port`: where the FastAGI server listens (a checked --listen)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    emulator = PortalEmulator(SAMPLE_CRM, users=SAMPLE_USERS)
    webhook_url = await emulator.start()
    config = default_config(webhook_url)
    app = Application(config)
    try:
        try:
            host, port = await app.start(host, port)
        except OSError as error:
            if error.errno != errno.EADDRINUSE:  # an address not on this machine, a name not resolved
                # One line, as `serve` says it: a traceback would only hide what to change.
                print(f"cannot listen on {host}:{port}: {error.strerror or error}", file=sys.stderr)
                return 1
            print(f"{host}:{port} is taken; using a free port instead")
            host, port = await app.start(host, 0)
        if app.users is not None:
            # The directory the server loads by default (the webhook has the user scope), before
            # the first sample: Andrey, deactivated, must not get his calls.
            await app.users.refresh_once()
        print(f"Bitrix24 emulator: {app.portal.redacted_url} ({len(SAMPLE_CRM)} sample clients)")
        print(f"FastAGI server:    agi://{host}:{port}/route (shipped default rules)")
        if app.http_listener is not None and app.http_listener.address is not None:
            web_host, web_port = app.http_listener.address
            print(f"Admin page:        http://{web_host}:{web_port}/ (why each call went where; try a number)")
        print()
        matched = await _play_samples(host, port, config.variable_prefix)
        print(f"\n{matched} of {len(SAMPLE_CALLS)} calls went where the default policy says.")
        if once:
            return 0 if matched == len(SAMPLE_CALLS) else 1
        print(f"\nServing until Ctrl-C. In the dialplan: AGI(agi://{host}:{port}/route), e.g. caller"
              " ID 89161234567 reaches extension 101.")
        await until_stopped()
        return 0
    finally:
        await app.stop()
        await emulator.stop()


async def _play_samples(host: str, port: int, prefix: str) -> int:
    print(f"{'caller':18} {'status':12} {'route':10} {'target':12} {'rule':16} story")
    matched = 0
    for index, sample in enumerate(SAMPLE_CALLS, start=1):
        # Present the number as a PBX often does: national format with the trunk prefix 8.
        callerid = "8" + sample.phone[1:] if sample.phone.startswith("7") else sample.phone
        result = await fake_call(host, port, callerid=callerid, extension="74950000000",
                                 uniqueid=f"demo.{index}")
        v = result.variables
        route, target = v.get(prefix + "ROUTE", "?"), v.get(prefix + "TARGET", "?")
        ok = (route, target) == (sample.route, sample.target)
        matched += ok
        mark = "" if ok else f"  [expected {sample.route} {sample.target}]"
        print(f"{callerid:18} {v.get(prefix + 'STATUS', '?'):12} {route:10} {target:12}"
              f" {v.get(prefix + 'RULE', '?'):16} {sample.story}{mark}")
    anonymous = await fake_call(host, port, callerid="anonymous", uniqueid="demo.anon")
    v = anonymous.variables
    print(f"{'anonymous':18} {v.get(prefix + 'STATUS', '?'):12} {v.get(prefix + 'ROUTE', '?'):10}"
          f" {v.get(prefix + 'TARGET', '?'):12} {v.get(prefix + 'RULE', '?'):16}"
          " No caller ID: the portal is not asked.")
    return matched
