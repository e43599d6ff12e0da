import random

import pytest

from agi_bitrix.agi.protocol import (
    MAX_HEADER_BYTES,
    NEED_DATA,
    AgiRequest,
    CommandReply,
    EndOfStream,
    HangUp,
    PeerError,
    ServerConnection,
)
from agi_bitrix.testing.fake_asterisk import asterisk_header

HEADER = asterisk_header(script="route?x=y&z=1", callerid="89161234567", extension="74951112233",
                         uniqueid="1700.42", args=("79160000000", "", "third"))


def events(conn):
    out = []
    while (event := conn.next_event()) is not NEED_DATA:
        out.append(event)
        if isinstance(event, EndOfStream):
            break
    return out


def feed_whole(data: bytes) -> ServerConnection:
    conn = ServerConnection()
    conn.receive_data(data)
    return conn


def test_header_whole():
    request = feed_whole(HEADER).next_event()
    assert isinstance(request, AgiRequest)
    assert request.script == "route"
    assert request.query == {"x": "y", "z": "1"}
    assert request.get("agi_callerid") == "89161234567"
    assert request.get("agi_uniqueid") == "1700.42"
    assert request.args == ("79160000000", "", "third")
    assert request.get("agi_dnid") == ""  # Asterisk's "unknown" reads as empty


def test_header_byte_by_byte():
    conn = ServerConnection()
    for i in range(len(HEADER) - 1):
        conn.receive_data(HEADER[i:i + 1])
        assert conn.next_event() is NEED_DATA
    conn.receive_data(HEADER[-1:])
    assert isinstance(conn.next_event(), AgiRequest)


def test_header_followed_by_data_keeps_the_rest():
    conn = feed_whole(HEADER + b"HANGUP\n")
    assert isinstance(conn.next_event(), AgiRequest)
    assert conn.next_event() == HangUp()


def test_arguments_are_ordered_numerically():
    header = b"agi_network_script: route\n" + b"".join(
        f"agi_arg_{n}: a{n}\n".encode() for n in (10, 2, 1, 9)) + b"\n"
    assert feed_whole(header).next_event().args == ("a1", "a2", "a9", "a10")


def test_crlf_and_leading_slash_tolerated():
    request = feed_whole(b"agi_network_script: /route/\r\nagi_callerid: 1\r\n\r\n").next_event()
    assert request.script == "route"
    assert request.get("agi_callerid") == "1"


def test_non_utf8_bytes_do_not_break_the_header():
    request = feed_whole(b"agi_network_script: route\nagi_calleridname: \xcf\xf0\xe8\xe2\xe5\xf2\n\n").next_event()
    assert request.script == "route"
    assert "\ufffd" in request.env["agi_calleridname"]


@pytest.mark.parametrize("data, message", [
    (b"GET / HTTP/1.0\r\nHost: x\r\n\r\n", "not an AGI header line"),
    # One bad line among good ones is named, whatever is wrong with it.
    (b"agi_network_script: route\nagi_callerid 1\nagi_uniqueid: 2\n\n", "not an AGI header line: 'agi_callerid 1'"),
    (b"agi_network_script: route\nagi_: 1\n\n", "not an AGI header line: 'agi_: 1'"),
    (b"agi_network_script: route\nagi___: 1\n\n", "not an AGI header line: 'agi___: 1'"),
    ("agi_network_script: route\nagi_calléd: 1\n\n".encode(), "not an AGI header line: 'agi_calléd: 1'"),
    (b"agi_network_script: route\n agi_callerid: 1\n\n", "not an AGI header line: ' agi_callerid: 1'"),
    (b"\n", "empty AGI header block"),
    (b"agi_network: yes\n" * 2000, "longer than"),
    (b"x" * (MAX_HEADER_BYTES + 10), "longer than"),
])
def test_hostile_headers_are_peer_errors(data, message):
    conn = feed_whole(data)
    with pytest.raises(PeerError, match=message):
        conn.next_event()
    with pytest.raises(RuntimeError):
        conn.next_event()  # refuses to go on after an error


def test_eof_before_end_of_header():
    conn = feed_whole(HEADER[:-1])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(PeerError, match="before the end"):
        conn.next_event()


def test_connect_and_close():
    conn = ServerConnection()
    conn.receive_data(b"")
    with pytest.raises(PeerError):
        conn.next_event()


def started() -> ServerConnection:
    conn = feed_whole(HEADER)
    assert isinstance(conn.next_event(), AgiRequest)
    return conn


def test_simple_reply():
    conn = started()
    assert conn.send(b"EXEC MSet \"A=1\"\n") == b"EXEC MSet \"A=1\"\n"
    conn.receive_data(b"200 result=0\n")
    reply = conn.next_event()
    assert reply == CommandReply(200, "0", None, "result=0")
    assert reply.ok
    assert not conn.awaiting_reply


def test_reply_with_data_and_failure_result():
    conn = started()
    conn.send(b"GET VARIABLE X\n")
    conn.send(b"EXEC Nope\n")
    conn.receive_data(b"200 result=1 (some value)\n200 result=-2\n")
    first, second = conn.next_event(), conn.next_event()
    assert (first.result, first.data) == ("1", "some value")
    assert second.result == "-2" and not second.ok


def test_trying_lines_are_skipped():
    conn = started()
    conn.send(b"EXEC Dial x\n")
    conn.receive_data(b"100 result=0 Trying...\n200 result=0\n")
    assert conn.next_event().code == 200


def test_hangup_lines_anywhere_do_not_desync_replies():
    conn = started()
    conn.send(b"EXEC MSet \"A=1\"\n")
    conn.send(b"EXEC MSet \"B=1\"\n")
    conn.receive_data(b"HANGUP\n200 result=0\nHANGUP\n511 Command Not Permitted on a dead channel\n")
    assert events(conn) == [HangUp(), CommandReply(200, "0", None, "result=0"), HangUp(),
                            CommandReply(511, text="Command Not Permitted on a dead channel")]


def test_multiline_520_is_one_reply():
    conn = started()
    conn.send(b"SET VARIABLE\n")
    conn.send(b"NOOP\n")
    conn.receive_data(
        b"520-Invalid command syntax.  Proper usage follows:\n"
        b" Usage: SET VARIABLE <variablename> <value>\n"
        b"200 result=1 looks like a reply but is usage text\n"
        b"520 End of proper usage.\n"
        b"200 result=0\n")
    usage, noop = conn.next_event(), conn.next_event()
    assert usage.code == 520 and len(usage.usage) == 2
    assert noop.code == 200


def test_single_line_520():
    conn = started()
    conn.send(b"X\n")
    conn.receive_data(b"520 Invalid command syntax.  Proper usage not available.\n")
    assert conn.next_event().code == 520


def test_unsolicited_reply_and_junk_are_peer_errors():
    conn = started()
    conn.receive_data(b"200 result=0\n")
    with pytest.raises(PeerError, match="without a command"):
        conn.next_event()
    conn = started()
    conn.send(b"NOOP\n")
    conn.receive_data(b"hello\n")
    with pytest.raises(PeerError, match="not an AGI reply"):
        conn.next_event()


def test_eof_while_waiting_for_reply():
    conn = started()
    conn.send(b"NOOP\n")
    conn.receive_data(b"")
    with pytest.raises(PeerError, match="waiting for its reply"):
        conn.next_event()


def test_clean_eof_after_replies():
    conn = started()
    conn.receive_data(b"")
    assert conn.next_event() == EndOfStream()


def test_send_rejects_bad_lines_and_early_commands():
    with pytest.raises(RuntimeError):
        ServerConnection().send(b"NOOP\n")
    conn = started()
    with pytest.raises(ValueError, match="exactly one line"):
        conn.send(b"NOOP\nEXEC Dial x\n")
    with pytest.raises(ValueError, match="exactly one line"):
        conn.send(b"NOOP")


def test_fuzz_any_input_gives_events_or_peer_error():
    rng = random.Random(4573)
    alphabet = [b"\n", b"\r", b":", b" ", b"agi_", b"200", b"result=", b"HANGUP", b"520-", b"520 ",
                b"\xff", b"x", b"-", b"100 "]
    for _ in range(3000):
        data = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        conn = ServerConnection()
        chunks = [data[i:i + rng.randint(1, 5)] for i in range(0, len(data), 5)] + [b""]
        try:
            for chunk in chunks:
                conn.receive_data(chunk)
                for event in events(conn):
                    assert isinstance(event, (AgiRequest, CommandReply, HangUp, EndOfStream))
                    if isinstance(event, AgiRequest):
                        conn.send(b"NOOP\n")
                    if isinstance(event, EndOfStream):
                        break
        except PeerError:
            pass


def test_an_absurd_argument_number_is_a_peer_error_whole_and_byte_by_byte():
    # int() refuses more than 4300 digits with a ValueError; it must not escape as a traceback.
    header = b"agi_network_script: route\nagi_arg_" + b"9" * 5000 + b": x\n\n"
    with pytest.raises(PeerError, match="argument number too long"):
        feed_whole(header).next_event()
    conn = ServerConnection()
    for i in range(len(header) - 1):
        conn.receive_data(header[i:i + 1])
        assert conn.next_event() is NEED_DATA
    conn.receive_data(header[-1:])
    with pytest.raises(PeerError, match="argument number too long"):
        conn.next_event()
    assert feed_whole(b"agi_network_script: route\nagi_arg_0128: x\n\n").next_event().args == ("x",)
