"""Keys renamed or narrowed keep working as before, with a note: `check` prints it, `serve` logs
it at WARNING when it starts. Real processes for both, as an admin runs them."""


from agi_bitrix.config import parse_config
from tests.serve_process import start_serve, stop_serve
from tests.test_cli import agi_bitrix
from tests.test_config import BASE

REGISTER_DEADLINE = BASE + """\
callcard:
  outbox: /var/lib/agi-bitrix/outbox.sqlite3
  register:
    deadline: 5
"""
NOTE = ("callcard.register.deadline: deprecated for the call cards: it bounds their show and hide too only while"
        " callcard.cards.deadline is not set; set callcard.cards.deadline for them")


def test_register_deadline_alone_still_bounds_the_cards_with_a_note():
    config = parse_config(REGISTER_DEADLINE, "a.yaml")
    assert (config.callcard.register.deadline, config.callcard.cards.deadline) == (5.0, 5.0)
    assert [str(note) for note in config.deprecated] == ["a.yaml:8: " + NOTE]


def test_the_cards_own_deadline_ends_the_old_meaning():
    config = parse_config(REGISTER_DEADLINE + "  cards: {deadline: 0.5}\n", "a.yaml")
    assert (config.callcard.register.deadline, config.callcard.cards.deadline) == (5.0, 0.5)
    assert config.deprecated == ()
    config = parse_config(BASE + "callcard:\n  cards: {deadline: 0.5}\n", "a.yaml")
    assert (config.callcard.register.deadline, config.callcard.cards.deadline) == (2.0, 0.5)
    assert config.deprecated == ()


def test_neither_key_gives_both_defaults_and_no_note():
    config = parse_config(BASE + "callcard:\n", "a.yaml")
    assert (config.callcard.register.deadline, config.callcard.cards.deadline) == (2.0, 2.0)
    assert config.deprecated == ()


def test_check_passes_and_prints_the_note(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text(REGISTER_DEADLINE)
    result = agi_bitrix("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert f"warning: {path}:8: {NOTE}" in result.stderr.splitlines()


async def test_serve_logs_the_note_at_warning_when_it_starts(portal, tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text(REGISTER_DEADLINE.replace("https://portal.example/rest/1/secretcode/", portal.webhook_url)
                    .replace("/var/lib/agi-bitrix/outbox.sqlite3", str(tmp_path / "outbox" / "o.sqlite3")))
    process, _ = await start_serve(path)
    output = await stop_serve(process)
    assert process.returncode == 0, output
    assert f"WARNING agi_bitrix: {path}:8: {NOTE}" in output
