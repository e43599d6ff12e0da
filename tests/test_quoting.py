import string

import pytest

from agi_bitrix.agi.quoting import MAX_COMMAND_BYTES, MAX_VALUE_CHARS, agi_command, clean_value, mset_commands
from agi_bitrix.testing.fake_asterisk import command_words, mset_pairs

PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F))


def read_back(lines: list[bytes]) -> dict[str, str]:
    """What Asterisk's two parsers make of our lines (modelled; proven on a real Asterisk too)."""
    variables = {}
    for line in lines:
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        words = command_words(line.decode()[:-1])
        assert words[:2] == ["EXEC", "MSet"] and len(words) == 3
        variables.update(mset_pairs(words[2]))
    return variables


@pytest.mark.parametrize("value", [
    PRINTABLE,
    "a,b=c", '"quoted"', "back\\slash\\", "(paren", "]bracket[", "${EXTEN}", "$[1+1]",
    "Иванов Пётр", "trailing space ", " ", "", "x" * MAX_VALUE_CHARS,
])
def test_every_printable_character_round_trips(value):
    variables = {"B24_A": value, "B24_B": "after"}
    assert read_back(mset_commands(variables)) == variables


def test_each_character_alone():
    for ch in PRINTABLE:
        assert read_back(mset_commands({"V": ch, "W": ch + ch})) == {"V": ch, "W": ch + ch}


def test_control_characters_are_removed_not_passed():
    lines = mset_commands({"B24_A": "79160000000\nEXEC Dial SIP/evil\r\x00\t!"})
    assert read_back(lines) == {"B24_A": "79160000000EXEC Dial SIP/evil!"}


def test_values_are_capped():
    assert read_back(mset_commands({"A": "9" * 5000})) == {"A": "9" * MAX_VALUE_CHARS}


def test_many_long_values_split_into_several_commands_under_the_limit():
    variables = {f"B24_V{i}": string.punctuation * 8 for i in range(30)}
    lines = mset_commands(variables)
    assert len(lines) > 1
    assert all(len(line) <= MAX_COMMAND_BYTES for line in lines)
    assert read_back(lines) == {k: v[:MAX_VALUE_CHARS] for k, v in variables.items()}


def test_normal_call_is_one_command():
    variables = {f"B24_{name}": "79161234567" for name in "ABCDEFGHIJKLMNO"}
    assert len(mset_commands(variables)) == 1


@pytest.mark.parametrize("name", ["", "1A", "A B", "A=B", "A,B", "A\nB", "B24_X\n", "\nB24_X", "B24_Ä"])
def test_bad_variable_names_are_refused(name):
    with pytest.raises(ValueError, match="not a channel variable name"):
        mset_commands({name: "x"})


def test_agi_command_quotes_every_argument():
    line = agi_command("VERBOSE", 'say "hi" \\ there\nNOOP', "1")
    assert line == b'VERBOSE "say \\"hi\\" \\\\ thereNOOP" "1"\n'
    assert command_words(line.decode()[:-1]) == ["VERBOSE", 'say "hi" \\ thereNOOP', "1"]
    with pytest.raises(ValueError, match="exceeds"):
        agi_command("VERBOSE", "x" * MAX_COMMAND_BYTES)


# The bytes on the wire, literally: each MSet-special character gets a backslash for MSet, then
# every backslash and quote gets one for res_agi (tests/asterisk/ESCAPING.md, proven on Asterisk 22).
@pytest.mark.parametrize("value, line", [
    ('a"b\\c,d(', rb'EXEC MSet "B24_X=a\\\"b\\\\c\\,d\\("' + b"\n"),  # ESCAPING.md's example
    ("79161234567", b'EXEC MSet "B24_X=79161234567"\n'),
    ("", b'EXEC MSet "B24_X="\n'),
    ("\\", rb'EXEC MSet "B24_X=\\\\"' + b"\n"),
    ('"', rb'EXEC MSet "B24_X=\\\""' + b"\n"),
    (",", rb'EXEC MSet "B24_X=\\,"' + b"\n"),
    ("(", rb'EXEC MSet "B24_X=\\("' + b"\n"),
    (")", rb'EXEC MSet "B24_X=\\)"' + b"\n"),
    ("[", rb'EXEC MSet "B24_X=\\["' + b"\n"),
    ("]", rb'EXEC MSet "B24_X=\\]"' + b"\n"),
    ("=", rb'EXEC MSet "B24_X=\\="' + b"\n"),
    ("'", b'EXEC MSet "B24_X=\\\\\'"\n'),
    ("{", rb'EXEC MSet "B24_X=\\{"' + b"\n"),
    ("}", rb'EXEC MSet "B24_X=\\}"' + b"\n"),
    ("$", rb'EXEC MSet "B24_X=\\$"' + b"\n"),
    # Everything else passes as it is, UTF-8 included; control characters are dropped.
    ("a;b:c|d&e@f/g#h", b'EXEC MSet "B24_X=a;b:c|d&e@f/g#h"\n'),
    ("Пётр", 'EXEC MSet "B24_X=Пётр"\n'.encode()),
    ("1\t2\r3\x004\x7f5\n6", b'EXEC MSet "B24_X=123456"\n'),
])
def test_mset_line_byte_for_byte(value, line):
    assert mset_commands({"B24_X": value}) == [line]


def test_mset_pairs_in_order_in_one_line():
    assert mset_commands({"A": "1", "B": "", "C": "x,y"}) == [rb'EXEC MSet "A=1,B=,C=x\\,y"' + b"\n"]
    assert mset_commands([("A", "1"), ("A", "2")]) == [b'EXEC MSet "A=1,A=2"\n']
    assert mset_commands({}) == []


def test_value_cap_is_256_characters():
    assert clean_value("9" * 256) == "9" * 256
    assert clean_value("9" * 257) == "9" * 256
    assert clean_value("\n" * 300 + "9" * 300) == "9" * 256  # removed first, then cut


def sized(*lengths: int) -> dict[str, str]:
    """Variables V0___, V1___, ... set to "9", whose NAME=9 pairs are exactly `lengths` bytes long."""
    return {f"V{i}".ljust(length - 2, "_"): "9" for i, length in enumerate(lengths)}


def line_of(*pairs: str) -> bytes:
    return b'EXEC MSet "' + ",".join(pairs).encode() + b'"\n'


def pairs_of(variables: dict[str, str]) -> list[str]:
    return [f"{name}={value}" for name, value in variables.items()]


# MAX_COMMAND_BYTES (2000) at its edge: 11 bytes of `EXEC MSet "`, the pairs, a comma between
# each two, 2 bytes of `"\n`. Seven pairs of 248 bytes and one of 244 are exactly 2000.
@pytest.mark.parametrize("lengths, split", [
    ((248,) * 7 + (244,), [8]),  # exactly 2000 bytes: one line
    ((248,) * 7 + (245,), [7, 1]),  # 2001: the last pair moves to a second line
    ((248,) * 7 + (244, 10), [8, 1]),  # the first line filled to exactly 2000, then the rest
    ((248,) * 7 + (245, 10), [7, 2]),  # one byte more: the 8th pair starts the second line
    ((248,) * 7 + (244,) + (248,) * 7 + (244, 10), [8, 8, 1]),  # a second line filled exactly too
    ((248,) * 7 + (244,) + (248,) * 7 + (245, 10), [8, 7, 2]),
    ((1987, 10), [1, 1]),  # a pair that fills a line alone (13 + 1987 = 2000)
])
def test_lines_are_split_at_exactly_2000_bytes(lengths, split):
    variables = sized(*lengths)
    pairs = pairs_of(variables)
    lines = mset_commands(variables)
    expected, start = [], 0
    for count in split:
        expected.append(line_of(*pairs[start:start + count]))
        start += count
    assert lines == expected
    assert max(len(line) for line in lines) <= 2000


def test_a_variable_that_cannot_fit_a_line_is_refused():
    with pytest.raises(ValueError, match=r"variable 'VVVVV.*' does not fit a command of 2000 bytes"):
        mset_commands({"V" * 1987: "", "A": "1"})
    assert len(mset_commands({"V" * 1986: "", "A": "1"})[0]) == 2000


# MSet splits at most 98 pairs (the 99th would take the rest as its value): more go to more lines.
@pytest.mark.parametrize("count, split", [(98, [98]), (99, [98, 1]), (197, [98, 98, 1])])
def test_at_most_98_pairs_per_line(count, split):
    variables = {f"V{i}": "1" for i in range(count)}
    lines = mset_commands(variables)
    assert [line.count(b"=") for line in lines] == split
    assert read_back(lines) == variables


# agi_command at MAX_COMMAND_BYTES: `VERBOSE "` + the text + `"\n` is 11 bytes besides the text.
def test_agi_command_limit_and_empty_command():
    assert len(agi_command("VERBOSE", "x" * 1989)) == 2000
    with pytest.raises(ValueError, match="AGI command of 2001 bytes exceeds 2000"):
        agi_command("VERBOSE", "x" * 1990)
    with pytest.raises(ValueError, match=r"^empty command$"):
        agi_command()
    assert agi_command("NOOP") == b"NOOP\n"
    assert agi_command("GET VARIABLE", "Пётр\n") == 'GET VARIABLE "Пётр"\n'.encode()
