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
    loggable,
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



# -- every named limit at its edge, and what Asterisk may send besides plain LF lines ------------


def first_event(data: bytes, trickle: bool, conn: ServerConnection | None = None):
    """The first event from `data`: given at once, or (trickle) all but its last 4 bytes at once and
    those one by one, asking for an event after each; a limit must hold both ways."""
    conn = conn or ServerConnection()
    split = len(data) - 4 if trickle else len(data)
    conn.receive_data(data[:split])
    for i in range(split, len(data)):
        assert conn.next_event() is NEED_DATA
        conn.receive_data(data[i:i + 1])
    return conn.next_event()


def header_of(size: int, newline: bytes = b"\n") -> bytes:
    """A header block of exactly `size` bytes, its empty line included."""
    head = b"agi_network_script: route" + newline + b"agi_padding: "
    return head + b"x" * (size - len(head) - 2 * len(newline)) + newline + newline


# MAX_HEADER_BYTES (16 KiB) is the whole block with its empty line, LF or CRLF, whole or trickled.
@pytest.mark.parametrize("newline", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
@pytest.mark.parametrize("trickle", [False, True], ids=["whole", "trickled"])
def test_header_limit_is_16_kib(newline, trickle):
    request = first_event(header_of(16 * 1024, newline), trickle)
    assert request.script == "route" and len(request.env["agi_padding"]) > 16000
    with pytest.raises(PeerError, match=r"^header block longer than 16384 bytes$"):
        first_event(header_of(16 * 1024 + 1, newline), trickle)


def test_a_header_is_cut_off_as_soon_as_it_can_no_longer_fit():
    conn = feed_whole(b"agi_network_script: route\nagi_padding: " + b"x" * (16 * 1024 - 1 - 39))
    assert conn.next_event() is NEED_DATA  # 16383 bytes: an empty line could still end it in time
    conn.receive_data(b"\n")
    with pytest.raises(PeerError, match=r"^header block longer than 16384 bytes$"):
        conn.next_event()


def reply_of(size: int) -> bytes:
    """A `200 result=1 (...)` reply line of exactly `size` bytes before its newline."""
    return b"200 result=1 (" + b"v" * (size - 15) + b")\n"


# MAX_REPLY_LINE_BYTES (8 KiB): a longer line without a newline would grow the buffer forever.
@pytest.mark.parametrize("trickle", [False, True], ids=["whole", "trickled"])
def test_reply_line_limit_is_8_kib(trickle):
    for size, fits in ((8 * 1024, True), (8 * 1024 + 1, False)):
        conn = started()
        conn.send(b"GET VARIABLE X\n")
        if fits:
            assert len(first_event(reply_of(size), trickle, conn).data) == 8 * 1024 - 15
        else:
            with pytest.raises(PeerError, match=r"^reply line longer than 8192 bytes$"):
                first_event(reply_of(size), trickle, conn)


# MAX_USAGE_LINES (200) between "520-" and "520 ".
def test_usage_text_limit_is_200_lines():
    for lines, fits in ((200, True), (201, False)):
        conn = started()
        conn.send(b"SET VARIABLE\n")
        conn.receive_data(b"520-Invalid command syntax.  Proper usage follows:\n"
                          + b"".join(b" usage %d\n" % n for n in range(lines)) + b"520 End of proper usage.\n")
        if fits:
            reply = conn.next_event()
            assert (reply.code, reply.text, len(reply.usage), reply.usage[-1]) == (
                520, "End of proper usage.", 200, " usage 199")
        else:
            with pytest.raises(PeerError, match=r"^520 usage text is too long$"):
                conn.next_event()


# MAX_ARG_NUMBER_DIGITS (4): agi_arg_0128 is an argument, agi_arg_00001 is not Asterisk.
@pytest.mark.parametrize("number, args", [(b"1", ("x",)), (b"0128", ("x",)), (b"00001", None)])
def test_argument_number_digits(number, args):
    conn = feed_whole(b"agi_network_script: route\nagi_arg_" + number + b": x\n\n")
    if args is None:
        with pytest.raises(PeerError, match=r"^argument number too long: agi_arg_00001\.\.\.$"):
            conn.next_event()
    else:
        assert conn.next_event().args == args


def test_crlf_header_values_are_exact_and_the_rest_of_the_read_is_kept():
    conn = feed_whole(b"agi_network_script: route\r\nagi_callerid: 79161234567\r\nagi_arg_1: a\r\n"
                      b"agi_arg_2: b\r\n\r\nHANGUP\r\n\n\n")
    request = conn.next_event()
    assert request.env == {"agi_network_script": "route", "agi_callerid": "79161234567",
                           "agi_arg_1": "a", "agi_arg_2": "b"}
    assert request.args == ("a", "b")
    assert conn.next_event() == HangUp()


@pytest.mark.parametrize("rest", [b"HANGUP\n", b"HANGUP\r\n"])
def test_the_bytes_after_the_empty_line_are_the_first_reply(rest):
    for header in (b"agi_network_script: route\n\n", b"agi_network_script: route\r\n\r\n"):
        conn = feed_whole(header + rest)
        assert conn.next_event().script == "route"
        assert conn.next_event() == HangUp()
        assert conn.next_event() is NEED_DATA


def test_an_argument_line_inside_a_value_is_not_an_argument():
    request = feed_whole(b"agi_network_script: route\nagi_calleridname: xagi_arg_1: evil\n\n").next_event()
    assert request.args == ()


@pytest.mark.parametrize("data", [b"\r\n", b"\n\n", b"\r\nagi_network_script: route\n\n",
                                  b"\nagi_network_script: route\n\n"])
def test_empty_header_block_with_either_line_end(data):
    with pytest.raises(PeerError, match=r"^empty AGI header block$"):
        feed_whole(data).next_event()


def test_crlf_replies():
    conn = started()
    conn.send(b"GET VARIABLE X\n")
    conn.send(b"SET VARIABLE\n")
    conn.receive_data(b"200 result=1 (value)\r\n520-Invalid command syntax.\r\n usage\r\n520 End of proper usage.\r\n")
    assert conn.next_event() == CommandReply(200, "1", "value", "result=1 (value)")
    assert conn.next_event() == CommandReply(520, text="End of proper usage.", usage=(" usage",))


# How a reply line is read: code, result=, (data), whatever follows.
@pytest.mark.parametrize("line, reply", [
    (b"200 result=0", CommandReply(200, "0", None, "result=0")),
    (b"200 result=1 (timeout) endpos=1234", CommandReply(200, "1", "timeout", "result=1 (timeout) endpos=1234")),
    (b"200 result=0 endpos=1234", CommandReply(200, "0", None, "result=0 endpos=1234")),
    (b"200 result=", CommandReply(200, "", None, "result=")),
    (b"510 Invalid or unknown command", CommandReply(510, text="Invalid or unknown command")),
    (b"510 see result=1", CommandReply(510, text="see result=1")),  # result= counts only first
    (b"200 ", CommandReply(200, text="")),
])
def test_reply_lines(line, reply):
    conn = started()
    conn.send(b"NOOP\n")
    conn.receive_data(line + b"\n")
    assert conn.next_event() == reply


@pytest.mark.parametrize("result, ok", [("1", True), ("0", True), ("-1", False), (None, False)])
def test_reply_ok(result, ok):
    assert CommandReply(200, result).ok is ok
    assert CommandReply(510, result).ok is False


def test_a_reply_with_only_a_code():
    assert CommandReply(510) == CommandReply(510, None, None, "", ())


# What breaks the protocol, after the header: each a PeerError naming it, and the end of the connection.
@pytest.mark.parametrize("sent, data, message", [
    (1, b"200-result=0\n", r"^unexpected multi-line reply: '200-result=0'$"),
    (0, b"520-Invalid command syntax.\n", r"^reply without a command: '520-Invalid command syntax.'$"),
    (0, b"200 result=0\n", r"^reply without a command: '200 result=0'$"),
    (1, b"2000 result=0\n", r"^not an AGI reply: '2000 result=0'$"),
    (1, b"x200 result=0\n", r"^not an AGI reply: 'x200 result=0'$"),
    (1, b"20 result=0\n", r"^not an AGI reply: '20 result=0'$"),
    (1, b"200result=0\n", r"^not an AGI reply: '200result=0'$"),
    (1, b"\n200 result=0\n", r"^not an AGI reply: ''$"),
])
def test_broken_replies(sent, data, message):
    conn = started()
    for _ in range(sent):
        conn.send(b"NOOP\n")
    conn.receive_data(data)
    with pytest.raises(PeerError, match=message):
        conn.next_event()
    with pytest.raises(RuntimeError, match=r"^connection already failed$"):
        conn.next_event()
    with pytest.raises(RuntimeError, match=r"^connection already failed$"):
        conn.send(b"NOOP\n")


def test_usage_text_ends_only_at_520_and_a_space():
    conn = started()
    conn.send(b"SET VARIABLE\n")
    conn.receive_data(b"520-Proper usage follows:\n520\n5200 x\n520-x\n520 End of proper usage.\n")
    assert conn.next_event().usage == ("520", "5200 x", "520-x")


def test_end_of_input_in_the_middle_of_a_line():
    conn = started()
    conn.send(b"NOOP\n")
    conn.receive_data(b"200 result=0\n200 res")
    assert conn.next_event().code == 200
    conn.receive_data(b"")
    with pytest.raises(PeerError, match=r"^connection closed in the middle of a line$"):
        conn.next_event()
    conn = started()
    conn.receive_data(b"HANGUP")
    conn.receive_data(b"")
    with pytest.raises(PeerError, match=r"^connection closed in the middle of a line$"):
        conn.next_event()


def test_eof_messages_name_what_was_missing():
    conn = started()
    conn.send(b"NOOP\n")
    conn.receive_data(b"")
    with pytest.raises(PeerError, match=r"^connection closed while a command was waiting for its reply$"):
        conn.next_event()
    conn = feed_whole(b"agi_network_script: route\n")
    conn.receive_data(b"")
    with pytest.raises(PeerError, match=r"^connection closed before the end of the AGI header block$"):
        conn.next_event()


def test_commands_are_counted_until_their_replies():
    conn = started()
    assert not conn.awaiting_reply
    conn.send(b"NOOP\n")
    conn.send(b"NOOP\n")
    assert conn.awaiting_reply
    conn.receive_data(b"200 result=0\n")
    conn.next_event()
    assert conn.awaiting_reply
    conn.receive_data(b"200 result=0\n")
    conn.next_event()
    assert not conn.awaiting_reply
    conn.receive_data(b"200 result=0\n")
    with pytest.raises(PeerError, match="without a command"):
        conn.next_event()


@pytest.mark.parametrize("line", [b"NOOP\n\n", b"\nNOOP\n", b"NOOP", b"NO\nOP\n"])
def test_send_takes_exactly_one_line(line):
    with pytest.raises(ValueError, match=r"^a command is exactly one line ending in a newline$"):
        started().send(line)


def test_misuse_by_our_own_code_is_a_runtime_error():
    with pytest.raises(RuntimeError, match=r"^cannot send a command before the AGI header block is complete$"):
        ServerConnection().send(b"NOOP\n")
    conn = started()
    conn.receive_data(b"")
    with pytest.raises(RuntimeError, match=r"^data received after EOF$"):
        conn.receive_data(b"x")
    conn.receive_data(b"")  # a second EOF is harmless


def test_need_data_reads_as_its_name():
    assert repr(NEED_DATA) == str(NEED_DATA) == "NEED_DATA"


# The script name and its query, from agi_network_script; Asterisk's "unknown" reads as empty.
@pytest.mark.parametrize("env, script, query", [
    ({}, "", {}),
    ({"agi_network_script": "route"}, "route", {}),
    ({"agi_network_script": "route?x=y&z=1"}, "route", {"x": "y", "z": "1"}),
    ({"agi_network_script": "//route/"}, "route", {}),
    ({"agi_network_script": "a:b"}, "a:b", {}),  # a path, not a URL scheme
    ({"agi_network_script": "register"}, "register", {}),
])
def test_script_and_query(env, script, query):
    request = AgiRequest(env)
    assert (request.script, request.query) == (script, query)


def test_missing_and_unknown_header_values_read_as_empty():
    request = AgiRequest({"agi_dnid": "unknown", "agi_callerid": "101"})
    assert (request.get("agi_dnid"), request.get("agi_rdnis"), request.get("agi_callerid")) == ("", "", "101")


# loggable: control characters become "?", at most 120 characters and "..." when cut.
@pytest.mark.parametrize("value, logged", [
    ("1700000000.1", "1700000000.1"),
    ("", ""),
    ("a\r\nb\x1b[31mc\x00", "a??b?[31mc?"),
    ("Пётр", "Пётр"),
    ("x" * 120, "x" * 120),
    ("x" * 121, "x" * 120 + "..."),
    ("\n" * 121, "?" * 120 + "..."),
])
def test_loggable(value, logged):
    assert loggable(value) == logged


def test_loggable_with_a_limit():
    assert loggable("abcdef", 3) == "abc..."
    assert loggable("abc", 3) == "abc"
