"""How a value must be sent over AGI so that Asterisk stores it byte for byte (ESCAPING.md).

A FastAGI server of the test's own sends hand-made command lines to the real Asterisk and reads
the variables back with GET VARIABLE in the same session, so nothing but Asterisk's own parsers
stands between the bytes sent and the bytes stored.
"""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio

from agi_bitrix.agi.quoting import mset_commands
from agi_bitrix.testing.ami_calls import CallDriver

from .fastagi_stub import AgiSession, FastAgiStub

# The first test also waits for provisioning (about a minute on a fresh machine).
pytestmark = [pytest.mark.asterisk, pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(300)]

NEWLINE, NUL = 0x0A, 0x00
# Everything except what the tests below show cannot be carried at all.
CARRIABLE_BYTES = [bytes([code]) for code in range(256) if code not in (NUL, NEWLINE)]
UTF8_VALUES = ["Иванов Иван", "Zoë «Müller», (ООО \"Ромашка\")", "東京 😀", "ü\\ü"]
MSET_SPECIAL = b'\\",()[]'
# The answer to EXEC: the application's return value, 0 for MSet.
MSET_DONE = b"200 result=0"

Script = Callable[[AgiSession], Awaitable[object]]


def agi_quoted(word: bytes) -> bytes:
    """One AGI argument: in double quotes, with backslash and quote escaped for parse_args."""
    return b'"' + word.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def mset_escaped(value: bytes) -> bytes:
    """A backslash before each character MSet's argument parser treats specially."""
    return b"".join(b"\\" + bytes([c]) if bytes([c]) in MSET_SPECIAL else bytes([c]) for c in value)


def mset_line(values: dict[str, bytes], escape: Callable[[bytes], bytes] = mset_escaped) -> bytes:
    pairs = b",".join(name.encode() + b"=" + escape(value) for name, value in values.items())
    return b"EXEC MSet " + agi_quoted(pairs) + b"\n"


async def stored(session: AgiSession, names) -> dict[str, bytes | None]:
    return {name: await session.get_variable(name) for name in names}


class ScriptedSessions:
    """Runs a script as the whole FastAGI session of one fresh call."""

    def __init__(self, calls: CallDriver):
        self.calls = calls
        self.scripts: dict[str, tuple[Script, asyncio.Future]] = {}
        self.stub = FastAgiStub(self._serve)
        # Calls at once: enough to be quick, few enough for a small CI machine.
        self.parallel = asyncio.Semaphore(20)

    async def _serve(self, session: AgiSession) -> None:
        script, outcome = self.scripts.pop(session.args[0])
        try:
            outcome.set_result(await script(session))
        except Exception as error:
            outcome.set_exception(error)

    async def run(self, script: Script) -> object:
        async with self.parallel:
            call = self.calls.originate("100", "79161234567", "agi-bitrix-test-scripted-agi",
                                        {"TEST_AGI_URL": self.stub.url("script")})
            outcome = asyncio.get_running_loop().create_future()
            self.scripts[call.call_id] = (script, outcome)
            try:
                return await asyncio.wait_for(outcome, 20)
            except TimeoutError:
                raise AssertionError(f"the script did not finish: {self.calls.describe(call)}; "
                                     f"stub errors {self.stub.errors}") from None

    async def run_all(self, scripts: list[Script]) -> list:
        return await asyncio.gather(*(self.run(script) for script in scripts))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def sessions(calls: CallDriver) -> AsyncIterator[ScriptedSessions]:
    runner = ScriptedSessions(calls)
    await runner.stub.start()
    yield runner
    await runner.stub.close()


def setting_with_mset(values: dict[str, bytes], escape=mset_escaped) -> Script:
    async def script(session: AgiSession):
        reply = await session.command(mset_line(values, escape))
        return reply, await stored(session, values)
    return script


def surroundings(char: bytes) -> dict[str, bytes]:
    """The character alone, inside, doubled before '=', and a neighbour that must stay intact."""
    return {"B24_ALONE": char, "B24_INSIDE": b"a" + char + b"z", "B24_TWICE": char + char + b"=",
            "B24_NEIGHBOUR": b"next"}


async def test_mset_with_both_escaping_layers_stores_every_byte_but_nul_and_newline(sessions):
    cases = [surroundings(char) for char in CARRIABLE_BYTES]
    cases += [{"B24_TEXT": text.encode(), "B24_NEIGHBOUR": b"next"} for text in UTF8_VALUES]
    cases.append({"B24_EMPTY": b"", "B24_NEIGHBOUR": b"next"})  # set, and empty (not unset)
    results = await sessions.run_all([setting_with_mset(values) for values in cases])
    wrong = {repr(next(iter(values.values()))): result
             for values, result in zip(cases, results, strict=True) if result != (MSET_DONE, values)}
    assert wrong == {}


async def test_mset_with_agi_quoting_alone_corrupts_exactly_these_characters(sessions):
    """Why the MSet layer is needed: without it these characters change or split the pairs."""
    results = await sessions.run_all(
        [setting_with_mset(surroundings(char), escape=lambda value: value) for char in CARRIABLE_BYTES])
    corrupted = {char for char, (_, values) in zip(CARRIABLE_BYTES, results, strict=True)
                 if values != surroundings(char)}
    assert corrupted == {b'"', b"(", b",", b"[", b"\\"}


async def test_set_variable_with_agi_quoting_stores_every_byte_but_nul_and_newline(sessions):
    def setting_with_set_variable(value: bytes) -> Script:
        async def script(session: AgiSession):
            reply = await session.command(b"SET VARIABLE B24_VALUE " + agi_quoted(value) + b"\n")
            return reply, await session.get_variable("B24_VALUE")
        return script

    values = [b"a" + char + b"z" for char in CARRIABLE_BYTES] + [text.encode() for text in UTF8_VALUES]
    results = await sessions.run_all([setting_with_set_variable(value) for value in values])
    wrong = {value: result for value, result in zip(values, results, strict=True)
             if result != (b"200 result=1", value)}
    assert wrong == {}


async def test_a_newline_in_a_value_ends_the_command_and_the_rest_runs_as_a_new_one(sessions):
    # What a server that kept the newline would send; written in two parts, because Asterisk
    # leaves a second line that came in the same read waiting (see the 8191-byte test).
    async def script(session: AgiSession):
        first = await session.command(b'SET VARIABLE B24_VALUE "x\n')
        second = await session.command(b'SET VARIABLE B24_INJECTED yes"\n')
        return first, second, await stored(session, ["B24_VALUE", "B24_INJECTED"])

    # The first command ended at the newline although its quote was still open.
    assert await sessions.run(script) == (
        b"200 result=1", b"200 result=1", {"B24_VALUE": b"x", "B24_INJECTED": b"yes"})


async def test_a_nul_in_a_value_makes_asterisk_swallow_the_next_command_into_it(sessions):
    async def script(session: AgiSession):
        await session.send(b'EXEC MSet "B24_VALUE=x\x00y,B24_NEIGHBOUR=next"\n')
        # No reply yet: Asterisk takes the line as unfinished and waits for more.
        await session.send(b"SET VARIABLE B24_SWALLOWED yes\n")
        reply = await session.reply()
        return reply, await stored(session, ["B24_VALUE", "B24_NEIGHBOUR", "B24_SWALLOWED"])

    assert await sessions.run(script) == (MSET_DONE, {
        "B24_VALUE": b"xSET VARIABLE B24_SWALLOWED yes", "B24_NEIGHBOUR": None, "B24_SWALLOWED": None})


async def test_command_lines_end_at_8191_bytes_and_the_rest_runs_as_a_new_command(sessions):
    prefix = b'EXEC MSet "B24_VALUE='

    async def longest_line(session: AgiSession):
        value = b"x" * (8191 - len(prefix) - len(b'"\n'))
        reply = await session.command(prefix + value + b'"\n')
        # GET VARIABLE shows at most 1023 bytes; the length tells that all arrived.
        length = await session.command(b"GET FULL VARIABLE ${LEN(${B24_VALUE})}\n")
        return reply, length == b"200 result=1 (%d)" % len(value)

    async def one_byte_too_long(session: AgiSession):
        # Asterisk runs the first 8191 bytes of a longer line without waiting for its newline,
        # then reads what follows as a command of its own. (Sent as one write, the rest would
        # wait in Asterisk's buffer until more bytes arrive: pipelined commands can stall.)
        first = await session.command(prefix + b"x" * (8191 - len(prefix)))
        tail = await session.command(b'SET VARIABLE B24_INJECTED yes"\n')
        return first, tail, await session.get_variable("B24_INJECTED")

    assert await sessions.run(longest_line) == (MSET_DONE, True)
    assert await sessions.run(one_byte_too_long) == (MSET_DONE, b"200 result=1", b"yes")


async def test_exec_evaluates_dollar_expressions_in_values_only_when_agiexecfull_is_set(sessions):
    """Why the sample dialplan never sets AGIEXECFULL: with it, a CRM value would be evaluated."""
    async def script(session: AgiSession):
        before = await session.command(mset_line({"B24_PLAIN": b"${EXTEN}"}))
        await session.command(b"SET VARIABLE AGIEXECFULL yes\n")
        after = await session.command(mset_line({"B24_EVALUATED": b"${EXTEN}"}))
        return before, after, await stored(session, ["B24_PLAIN", "B24_EVALUATED"])

    assert await sessions.run(script) == (
        MSET_DONE, MSET_DONE, {"B24_PLAIN": b"${EXTEN}", "B24_EVALUATED": b"100"})


async def test_mset_splits_98_pairs_and_leaves_the_rest_unsplit_in_the_99th(sessions):
    values = {f"B24_V{n}": str(n).encode() for n in range(1, 101)}
    reply, got = await sessions.run(setting_with_mset(values))
    assert reply == MSET_DONE
    assert got["B24_V98"] == b"98"
    assert got["B24_V99"] == b"99,B24_V100=100"
    assert got["B24_V100"] is None


async def test_the_products_mset_commands_store_every_value_as_the_product_cleaned_it(sessions):
    """agi_bitrix.agi.quoting against the real parsers: each value arrives exactly, minus the
    control characters the product removes on purpose."""
    texts = [chr(code) for code in range(0x20, 0x7F)] + UTF8_VALUES + [
        "\\" * 5 + '"' * 3, ")]:(,[=,", "${CALLERID(num)}", "a\tb\rc\nd\x00e\x7f"]
    cases = [{"B24_ALONE": text, "B24_INSIDE": f"a{text}z", "B24_NEIGHBOUR": "next"} for text in texts]

    def expected(text: str) -> bytes:
        return "".join(ch for ch in text if ch >= " " and ch != "\x7f").encode()

    def setting(values: dict[str, str]) -> Script:
        async def script(session: AgiSession):
            replies = [await session.command(line) for line in mset_commands(values)]
            return replies, await stored(session, values)
        return script

    results = await sessions.run_all([setting(values) for values in cases])
    wrong = {values["B24_ALONE"]: result for values, result in zip(cases, results, strict=True)
             if result != ([MSET_DONE], {name: expected(text) for name, text in values.items()})}
    assert wrong == {}
