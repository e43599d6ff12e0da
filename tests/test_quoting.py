import string

import pytest

from agi_bitrix.agi.quoting import MAX_COMMAND_BYTES, MAX_VALUE_CHARS, agi_command, mset_commands
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


@pytest.mark.parametrize("name", ["", "1A", "A B", "A=B", "A,B", "A\nB"])
def test_bad_variable_names_are_refused(name):
    with pytest.raises(ValueError, match="not a channel variable name"):
        mset_commands({name: "x"})


def test_agi_command_quotes_every_argument():
    line = agi_command("VERBOSE", 'say "hi" \\ there\nNOOP', "1")
    assert line == b'VERBOSE "say \\"hi\\" \\\\ thereNOOP" "1"\n'
    assert command_words(line.decode()[:-1]) == ["VERBOSE", 'say "hi" \\ thereNOOP', "1"]
    with pytest.raises(ValueError, match="exceeds"):
        agi_command("VERBOSE", "x" * MAX_COMMAND_BYTES)
