"""agi_bitrix.ami.protocol: AMI as Asterisk 20 and 22 frame it (main/manager.c), fed whole, byte by
byte and split at seeded random places; hostile input bounded; injection refused when serializing."""

import itertools
import random

import pytest

from agi_bitrix.ami.errors import ProtocolViolation, UnsafeAction
from agi_bitrix.ami.protocol import (
    MAX_ACTION_LINE_BYTES,
    MAX_FIELDS,
    MAX_LINE_BYTES,
    MAX_MESSAGE_BYTES,
    NEED_DATA,
    AmiConnection,
    Banner,
    EndOfStream,
    Event,
    Response,
    serialize_action,
)

BANNER = b"Asterisk Call Manager/9.0.0\r\n"
# What Asterisk 22 sent in tests/asterisk/test_ami.py: a login answer, events, an Async Originate
# queued and its outcome (an Event that also carries Response), Command output as Output fields.
SESSION = (
    BANNER
    + b"Response: Success\r\nActionID: a-1\r\nMessage: Authentication accepted\r\n\r\n"
    + b"Event: FullyBooted\r\nPrivilege: system,all\r\nUptime: 3\r\nLastReload: 3\r\nStatus: Fully Booted\r\n\r\n"
    + b"Response: Success\r\nActionID: a-2\r\nMessage: Originate successfully queued\r\n\r\n"
    + b"Event: Newchannel\r\nPrivilege: call,all\r\nChannel: Local/s@ami-test-00000001;1\r\n"
      b"CallerIDName: \xd0\x98\xd0\xb2\xd0\xb0\xd0\xbd\r\nUniqueid: 1733.1\r\n\r\n"
    + b"Event: OriginateResponse\r\nPrivilege: call,all\r\nActionID: a-2\r\nResponse: Failure\r\n"
      b"Channel: Local/s@ami-rings\r\nContext: ami-then\r\nExten: s\r\nReason: 3\r\nUniqueid: <unknown>\r\n\r\n"
    + b"Response: Success\r\nActionID: a-3\r\nMessage: Command output follows\r\nOutput: Name/number\r\n"
      b"Output: 0 sip peers\r\n\r\n"
)


def messages(data: bytes, splits: list[int] | None = None) -> list:
    """Everything a connection yields for `data` cut at `splits`, then EOF."""
    connection = AmiConnection()
    out = []
    cuts = [0, *sorted(splits or []), len(data)]
    for start, end in itertools.pairwise(cuts):
        connection.receive_data(data[start:end])
        while (message := connection.next_event()) is not NEED_DATA:
            out.append(message)
    connection.receive_data(b"")
    out.append(connection.next_event())
    return out


EXPECTED = messages(SESSION)


def test_a_session_reads_as_banner_answers_and_events():
    banner, login, booted, queued, newchannel, outcome, command, end = EXPECTED
    assert banner == Banner("9.0.0")
    assert isinstance(login, Response) and (login.status, login.action_id) == ("Success", "a-1")
    assert isinstance(booted, Event) and booted.name == "FullyBooted" and booted.get("status") == "Fully Booted"
    assert isinstance(queued, Response) and queued.message == "Originate successfully queued"
    assert isinstance(newchannel, Event) and newchannel.get("CallerIDName") == "Иван"
    # Event first: an OriginateResponse carries Response too, and is no answer to an action.
    assert isinstance(outcome, Event) and (outcome.name, outcome.action_id, outcome.get("Reason")) == (
        "OriginateResponse", "a-2", "3")
    assert isinstance(command, Response) and command.get_all("Output") == ["Name/number", "0 sip peers"]
    assert end == EndOfStream()


def test_byte_by_byte_gives_the_same_messages():
    assert messages(SESSION, list(range(1, len(SESSION)))) == EXPECTED


@pytest.mark.parametrize("seed", range(200))
def test_any_split_gives_the_same_messages(seed):
    rng = random.Random(seed)
    splits = rng.sample(range(1, len(SESSION)), rng.randint(1, 40))
    assert messages(SESSION, splits) == EXPECTED


def test_bare_line_feeds_and_blank_lines_between_messages_are_taken():
    data = b"Asterisk Call Manager/7.0.3\n\r\n\r\nEvent: Hangup\nCause: 16\n\n"
    assert messages(data)[:2] == [Banner("7.0.3"), Event((("Event", "Hangup"), ("Cause", "16")))]


def test_a_follows_answer_keeps_its_free_text_up_to_end_command():
    data = (BANNER + b"Response: Follows\r\nActionID: c\r\nPrivilege: Command\r\nline one\r\n\r\nwith: colon\r\n"
            b"--END COMMAND--\r\n\r\nEvent: Next\r\n\r\n")
    _, follows, following, _ = messages(data)
    assert isinstance(follows, Response) and follows.status == "Follows" and follows.action_id == "c"
    assert follows.output == ("line one", "", "with: colon")
    assert isinstance(following, Event) and following.name == "Next"


@pytest.mark.parametrize(("data", "why"), [
    (b"SSH-2.0-OpenSSH_9.2\r\n", "not an AMI banner"),
    (b"x" * 300, "longer than 256"),
    (b"", "before the AMI banner"),
    (BANNER + b"Event: Hangup\r\nno colon here\r\n\r\n", "not `Name: value`"),
    (BANNER + b"Event: Hangup\r\nBad Name: x\r\n\r\n", "not `Name: value`"),
    (BANNER + b"Message: neither\r\n\r\n", "neither Event nor Response"),
    (BANNER + b"Event: Hangup\r\nCause: 16\r\n", "in the middle of a message"),
    (BANNER + b"Event: Big\r\nValue: " + b"A" * (MAX_LINE_BYTES + 10), f"longer than {MAX_LINE_BYTES}"),
    (BANNER + b"Event: Big\r\n" + b"".join(b"V%d: %s\r\n" % (i, b"A" * 8000) for i in range(40)),
     f"longer than {MAX_MESSAGE_BYTES}"),
    (BANNER + b"Event: Many\r\n" + b"A: 1\r\n" * (MAX_FIELDS + 1), f"more than {MAX_FIELDS} fields"),
])
def test_what_is_not_ami_is_a_violation_and_the_connection_stays_broken(data, why):
    connection = AmiConnection()
    connection.receive_data(data)
    with pytest.raises(ProtocolViolation, match=why):
        read_to_the_end(connection)
    with pytest.raises(ProtocolViolation):
        connection.next_event()


def read_to_the_end(connection: AmiConnection) -> None:
    for _ in range(MAX_FIELDS + 10):  # EOF once it needs more
        if connection.next_event() is NEED_DATA:
            connection.receive_data(b"")


def feed_forever(connection: AmiConnection, chunk: bytes) -> None:
    for _ in range(MAX_LINE_BYTES // len(chunk) + 2):
        connection.receive_data(chunk)
        assert connection.next_event() is NEED_DATA


def test_an_endless_line_is_cut_off_at_the_limit_however_it_arrives():
    connection = AmiConnection()
    connection.receive_data(BANNER + b"Event: Flood\r\nValue: ")
    assert connection.next_event() == Banner("9.0.0")
    with pytest.raises(ProtocolViolation, match="longer than"):
        feed_forever(connection, b"A" * 1000)


def test_a_flood_fed_a_byte_at_a_time_is_read_in_linear_time():
    # 20,000 one-byte feeds of one long (legal) line: quadratic rescanning would take seconds.
    connection = AmiConnection()
    connection.receive_data(BANNER + b"Event: Long\r\nValue: ")
    connection.next_event()
    for _ in range(MAX_LINE_BYTES - 100):
        connection.receive_data(b"A")
        assert connection.next_event() is NEED_DATA
    connection.receive_data(b"\r\n\r\n")
    event = connection.next_event()
    assert isinstance(event, Event) and len(event.get("Value")) == MAX_LINE_BYTES - 100


# -- serializing actions --------------------------------------------------------------------------

def test_an_action_is_action_actionid_then_its_fields_in_order():
    data = serialize_action("Originate", "id-7", [("Channel", "Local/101@from-internal"), ("Variable", "A=1"),
                                                  ("Variable", "B=2"), ("CallerID", '"Иван" <101>')])
    assert data == ('Action: Originate\r\nActionID: id-7\r\nChannel: Local/101@from-internal\r\nVariable: A=1\r\n'
                    'Variable: B=2\r\nCallerID: "Иван" <101>\r\n\r\n').encode()


@pytest.mark.parametrize("value", [
    "Ivan\r\nAction: Command\r\nCommand: core stop now",
    "Ivan\nAction: Hangup",
    "Ivan\r",
    "Ivan\x00",
    "tab\there",
    "del\x7f",
    "next\x85line",  # C1 NEL
    "line\u2028separator",
    "para\u2029graph",
    "lone\ud800surrogate",
])
def test_a_value_that_could_end_a_line_is_refused_and_not_quoted(value):
    with pytest.raises(UnsafeAction) as refused:
        serialize_action("Originate", "id", [("CallerID", value)])
    assert "CallerID" in str(refused.value) and value not in str(refused.value)


def test_the_secret_is_never_in_the_refusal():
    with pytest.raises(UnsafeAction) as refused:
        serialize_action("Login", "id", [("Username", "u"), ("Secret", "hunter2\r\n")])
    assert "hunter2" not in str(refused.value)


@pytest.mark.parametrize(("action", "fields"), [
    ("Originate\r\nAction: Command", []),
    ("Originate", [("Call erID", "x")]),
    ("Originate", [("CallerID:", "x")]),
    ("Originate", [("ActionID", "someone-elses")]),
    ("Originate", [("Action", "Command")]),
    ("Originate", [("Channel", "L" * MAX_ACTION_LINE_BYTES)]),
])
def test_names_and_overlong_lines_that_asterisk_would_misread_are_refused(action, fields):
    with pytest.raises(UnsafeAction):
        serialize_action(action, "id", fields)


@pytest.mark.parametrize("seed", range(50))
def test_any_serialized_action_reads_back_as_exactly_its_fields(seed):
    # Printable text of any script round-trips through the framing; nothing becomes a field of its own.
    rng = random.Random(seed)
    alphabet = "abcXYZ019 :;=,\"'\\<>()@/-_.Иван中文😀\u00a0"
    fields = [(f"Field{index}", "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))))
              for index in range(rng.randint(0, 12))]
    data = serialize_action("UserEvent", f"id-{seed}", fields)
    connection = AmiConnection()
    # Our own action framed as Asterisk frames a message (a Response line first, so it parses).
    connection.receive_data(BANNER + b"Response: Success\r\n" + data.replace(b"Action: ", b"X-Action: ", 1))
    connection.next_event()
    message = connection.next_event()
    assert isinstance(message, Response)
    assert list(message.fields[3:]) == fields
