# ruff: noqa: E501 -- a dialplan line cannot be wrapped
"""Fixtures for the tests against a real Asterisk (marker `asterisk`: `pytest -m asterisk`).

- `asterisk_build`: each Asterisk the tests run on, in turn: 20 LTS and 22 (test ids end in
  [asterisk20] / [asterisk22]). Every test that uses an Asterisk runs on both.
- `pbx`: the session's Asterisk (agi_bitrix.testing.pbx_harness.AsteriskPbx) in the provisioned chroot, with
  TEST_DIALPLAN below: the plain-Asterisk sample #included unchanged, plus test contexts.
  `running_pbx()` starts further ones (test_freepbx_sample.py does).
- `calls`: an AMI connection (agi_bitrix.testing.ami_calls.CallDriver) that originates calls and collects the AMI
  events of each.
- `portal`: the Bitrix24 emulator; `server` / `start_server()`: `agi-bitrix serve` processes
  (product_server.ProductServer) with the shipped config, against the emulator.
- `router`: a call through the server's AGI step alone, and the channel variables it left,
  read back byte for byte by a FastAGI reader (`variable_reader`) the dialplan runs next.

When Asterisk cannot be provisioned or started, the tests fail under CI=true and are skipped
otherwise, with the reason printed at the end of the run.
"""

import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from agi_bitrix.routing.variables import NAMES
from agi_bitrix.testing.ami_calls import CallDriver, PlacedCall
from agi_bitrix.testing.pbx_harness import (
    BUILDS,
    AsteriskBuild,
    AsteriskPbx,
    AsteriskUnavailable,
    check_build,
    provision_root,
)
from agi_bitrix.testing.portal import PortalEmulator

from .fastagi_stub import VariableReader
from .product_server import ProductServer

B24_VARIABLES = tuple(f"B24_{name}" for name in NAMES)
# The lookup deadline of the servers under test, and what the tests allow on top of it for
# Asterisk, the network and a busy CI machine.
DEADLINE = 1.5
DEADLINE_MARGIN = 1.5
# The dialled number (DID) of test calls, unless a test needs another.
DID = "74951230000"

# Contexts every test Asterisk has. A call starts in agi-bitrix-test-caller (ami_calls.py).
STAND_IN_CONTEXTS = r"""
; Dialled numbers: digits, +digits, and s (a request without a user part).
[agi-bitrix-test-caller]
exten => _X.,1,Gosub(agi-bitrix-test-caller-setup,s,1)
 same => n,Goto(${TEST_ENTRY_CONTEXT},${EXTEN},1)
exten => _+X.,1,Gosub(agi-bitrix-test-caller-setup,s,1)
 same => n,Goto(${TEST_ENTRY_CONTEXT},${EXTEN},1)
exten => s,1,Gosub(agi-bitrix-test-caller-setup,s,1)
 same => n,Goto(${TEST_ENTRY_CONTEXT},${EXTEN},1)

[agi-bitrix-test-caller-setup]
exten => s,1,Set(TIMEOUT(absolute)=90)        ; no test call outlives a broken test for long
 same => n,Set(CALLERID(num)=${TEST_CALLERID})
 same => n,ExecIf($["${TEST_CALLERNAME}" != ""]?Set(CALLERID(name)=${TEST_CALLERNAME}))
 same => n,Return()

; Stand-ins for the phones and the trunk: they report each ring (with the caller ID and name they see),
; and answer only when the test named the number in TEST_ANSWERING; a number in TEST_BUSY is
; busy, one in TEST_UNAVAILABLE unreachable (Dial: BUSY, CHANUNAVAIL); otherwise they ring
; until the caller gives up. Tests set these as __TEST_..., inherited by every dialled channel.
[agi-bitrix-test-phones]
exten => _X.,1,UserEvent(AgiBitrixTestRing,Kind: extension,Number: ${EXTEN},CallerID: ${CALLERID(num)},CallerName: ${CALLERID(name)})
 same => n,Goto(agi-bitrix-test-answer,${EXTEN},1)

[agi-bitrix-test-outbound]
exten => _X.,1,UserEvent(AgiBitrixTestRing,Kind: outbound,Number: ${EXTEN},CallerID: ${CALLERID(num)},CallerName: ${CALLERID(name)})
 same => n,Goto(agi-bitrix-test-answer,${EXTEN},1)

[agi-bitrix-test-answer]
exten => _X.,1,GotoIf($["${TEST_ANSWERING}" = "${EXTEN}"]?answer)
 same => n,GotoIf($["${TEST_BUSY}" = "${EXTEN}"]?busy)
 same => n,GotoIf($["${TEST_UNAVAILABLE}" = "${EXTEN}"]?unavailable)
 same => n,Wait(120)
 same => n(answer),Answer()
 same => n,UserEvent(AgiBitrixTestAnswered,Number: ${EXTEN})
 same => n,Wait(1)
 same => n,Hangup()
 same => n(busy),Busy(10)
 same => n(unavailable),Hangup(20)

; A voicemail box: answers, as VoiceMail() does.
[agi-bitrix-test-voicemail]
exten => _X.,1,Answer()
 same => n,UserEvent(AgiBitrixTestVoicemail,Mailbox: ${EXTEN})
 same => n,Wait(10)
 same => n,Hangup()
"""

# The session's Asterisk: the plain-Asterisk sample as shipped, and the test contexts.
TEST_DIALPLAN = r"""
[general]
autofallthrough = yes

#include "asterisk-samples/extensions.conf"

[globals](+)
; The sample's dial steps lead to the stand-ins instead of real phones and trunks.
AGI_BITRIX_EXTENSION_CONTEXT=agi-bitrix-test-phones
AGI_BITRIX_OUTBOUND_CONTEXT=agi-bitrix-test-outbound

; A FastAGI server of the test's own drives the whole session (AGI argument: the call id).
[agi-bitrix-test-scripted-agi]
exten => _X.,1,AGI(${TEST_AGI_URL},${TEST_CALL_ID})
 same => n,Hangup()

; The product's AGI step alone; then the reader reports the channel variables it left.
[agi-bitrix-test-route]
exten => _X.,1,AGI(${TEST_AGI_URL})
 same => n,AGI(${TEST_READER_URL},${TEST_CALL_ID})
 same => n,Hangup()

; The same, with the AGI arguments the server takes: the number to look up, the DID.
[agi-bitrix-test-route-with-arguments]
exten => _X.,1,AGI(${TEST_AGI_URL},${TEST_AGI_NUMBER},${TEST_AGI_DID})
 same => n,AGI(${TEST_READER_URL},${TEST_CALL_ID})
 same => n,Hangup()
""" + STAND_IN_CONTEXTS

# No members: a call that reaches Queue() waits there (QueueCallerJoin) until the test hangs up.
TEST_QUEUES = """
[general]
[support]
[sales]
"""

_unavailable_reasons: list[str] = []
_versions_run: dict[str, str] = {}  # build name -> what its `asterisk -V` printed


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "asterisk: runs against a real Asterisk 20 and 22 (scripts/provision-asterisk*.sh)")


def pytest_terminal_summary(terminalreporter) -> None:
    # Which Asterisk each [asteriskNN] test ran on, and how those tests ended.
    for build in BUILDS:
        outcomes = {outcome: sum(1 for report in terminalreporter.stats.get(outcome, [])
                                 if getattr(report, "when", "call") == "call" and _ran_on(report.nodeid, build))
                    for outcome in ("passed", "failed", "skipped")}
        if any(outcomes.values()):
            ran_on = _versions_run.get(build.name, "not available")
            terminalreporter.write_line(f"[{build.name}] {ran_on}: " + ", ".join(
                f"{count} {outcome}" for outcome, count in outcomes.items() if count))
    for reason in dict.fromkeys(_unavailable_reasons):
        terminalreporter.write_line(f"Asterisk tests skipped: {reason}", yellow=True)


def _ran_on(nodeid: str, build: AsteriskBuild) -> bool:
    parameters = nodeid.rpartition("[")[2].rstrip("]")
    return build.name in parameters.split("-")


def asterisk_unavailable(reason: str) -> None:
    """Fails (CI) or skips (elsewhere) the requesting test, saying why."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"the Asterisk tests must run under CI=true, but: {reason}", pytrace=False)
    _unavailable_reasons.append(reason)
    pytest.skip(f"Asterisk not available: {reason}")


@pytest.fixture(scope="session")
def asterisk_root() -> Path:
    try:
        return provision_root()
    except AsteriskUnavailable as error:
        asterisk_unavailable(str(error))


@pytest.fixture(scope="session", params=BUILDS, ids=[build.name for build in BUILDS])
def asterisk_build(request, asterisk_root: Path) -> AsteriskBuild:
    build: AsteriskBuild = request.param
    try:
        _versions_run[build.name] = check_build(asterisk_root, build)
    except AsteriskUnavailable as error:
        asterisk_unavailable(str(error))
    return build


def running_pbx(root: Path, build: AsteriskBuild, name: str, extensions: str, queues: str,
                resolv_conf: str | None = None, *,
                prepare: Callable[[AsteriskPbx], None] | None = None) -> Iterator[AsteriskPbx]:
    """An Asterisk with this configuration (and this /etc/resolv.conf) for as long as the generator
    runs; `prepare` may change its configuration files before it starts."""
    pbx = AsteriskPbx(root, name, build, resolv_conf)
    pbx.write_config(extensions, queues)
    if prepare is not None:
        prepare(pbx)
    try:
        pbx.start()
    except AsteriskUnavailable as error:
        pbx.stop()
        asterisk_unavailable(str(error))
    yield pbx
    pbx.stop()


@pytest.fixture(scope="session")
def pbx(asterisk_root: Path, asterisk_build: AsteriskBuild) -> Iterator[AsteriskPbx]:
    yield from running_pbx(asterisk_root, asterisk_build, "main", TEST_DIALPLAN, TEST_QUEUES)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def calls(pbx: AsteriskPbx) -> AsyncIterator[CallDriver]:
    driver = await CallDriver.connect(pbx.ami_port, pbx.ami_username, pbx.ami_secret)
    yield driver
    driver.close()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def variable_reader() -> AsyncIterator[VariableReader]:
    reader = VariableReader((*B24_VARIABLES, "AGISTATUS"))
    await reader.stub.start()
    yield reader
    await reader.stub.close()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def portal() -> AsyncIterator[PortalEmulator]:
    """The Bitrix24 portal emulator; tests add clients under numbers of their own."""
    emulator = PortalEmulator()
    await emulator.start()
    yield emulator
    await emulator.stop()


@pytest.fixture(scope="session")
def start_server(portal: PortalEmulator, tmp_path_factory) -> Iterator[Callable[..., ProductServer]]:
    """Starts agi-bitrix servers against the emulator; all are stopped after the session."""
    workdir = tmp_path_factory.mktemp("agi-bitrix")
    started: list[ProductServer] = []

    def start(fallback_queue: str | None = None, first_rules: Sequence[dict] = (),
              deadline: float = DEADLINE) -> ProductServer:
        server = ProductServer(portal.webhook_url, workdir, deadline, fallback_queue, first_rules)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server) -> ProductServer:
    """The agi-bitrix server most tests share."""
    return start_server()


@dataclass
class RoutedCall:
    call: PlacedCall
    variables: dict[str, str | None]  # after the AGI step; None: not set
    seconds: float  # from the Originate to the variables being read back

    def __getitem__(self, name: str) -> str | None:
        return self.variables[name]

    async def agi_commands(self, calls: CallDriver) -> list[str]:
        """The AGI commands the server under test made Asterisk run for this call."""
        # AMI events come in order: once the reader's first command is seen, all are here.
        await calls.wait_for(self.call, "AGIExecStart", timeout=10, where=_is_reader_command)
        return [event["Command"] for event in self.call.events
                if event.event == "AGIExecStart" and not _is_reader_command(event)]


def _is_reader_command(event) -> bool:
    return event["Command"].startswith("GET VARIABLE")


class CallRouter:
    """Places calls through the product's AGI step alone (context agi-bitrix-test-route)."""

    def __init__(self, calls: CallDriver, reader: VariableReader, server: ProductServer):
        self.calls = calls
        self.reader = reader
        self.server = server

    def place(self, callerid: str, dialled: str = DID, agi_url: str | None = None,
              arguments: tuple[str, str] | None = None) -> PlacedCall:
        """Starts the call; `arguments` (number to look up, DID) are passed to the AGI step."""
        variables = {"TEST_AGI_URL": agi_url or self.server.url, "TEST_READER_URL": self.reader.url}
        if arguments is not None:
            variables.update(TEST_AGI_NUMBER=arguments[0], TEST_AGI_DID=arguments[1])
        context = "agi-bitrix-test-route" if arguments is None else "agi-bitrix-test-route-with-arguments"
        return self.calls.originate(dialled, callerid, context, variables)

    async def route(self, callerid: str, dialled: str = DID, agi_url: str | None = None,
                    arguments: tuple[str, str] | None = None) -> RoutedCall:
        """Places the call and waits for the variables the server left on it."""
        call = self.place(callerid, dialled, agi_url, arguments)
        try:
            values = await self.reader.result(call.call_id, timeout=30)
        except TimeoutError:
            raise AssertionError(f"the reader was not called: {self.calls.describe(call)}\n"
                                 f"server log:\n{self.server.log()}") from None
        seconds = time.monotonic() - call.originated_at
        return RoutedCall(call, {name: None if value is None else value.decode(errors="replace")
                                 for name, value in values.items()}, seconds)


@pytest.fixture(scope="session")
def router(calls: CallDriver, variable_reader: VariableReader, server: ProductServer) -> CallRouter:
    return CallRouter(calls, variable_reader, server)
