"""What a reload applies and what it only announces: the settings declared `restart=True` are found
by walking the schema's declarations of the old and the new config (agi_bitrix.schema), logged once
each, and shown in docs/settings.md; the long-lived parts take their new settings themselves."""

import dataclasses
import logging
import textwrap

from agi_bitrix import schema
from agi_bitrix.app import Application
from agi_bitrix.config import Config, parse_config
from tests.conftest import make_config

# Every setting a reload cannot apply, and why: the part that uses it is made once at start.
RESTART_ONLY = {
    "server.listen": "the AGI listener",
    "bitrix.pool_size": "the HTTP session's connection pool",
    "bitrix.oauth.install_path": "the HTTP listener's routes",
    "http.listen": "the HTTP listener",
    "http.token_file": "the admin page's access policy, read at start",
    "http.idle_timeout": "the HTTP listener",
    "http.request_timeout": "the HTTP listener",
    "http.max_connections": "the HTTP listener",
    "callcard": "the outbox, made only when the section is there",
    "callcard.outbox": "the outbox",
    "callcard.outbox_claim_after": "the Redis outbox",
    "callcard.finish.retry.first": "the outbox's retry policy",
    "callcard.finish.retry.max": "the outbox's retry policy",
    "callcard.finish.retry.give_up_after": "the outbox's retry policy",
    "users": "the user directory: with the section always, without it only with the user scope",
    "users.refresh": "the user directory, made only when refresh is over 0",
    "clicktocall": "click-to-call's flow (ClickToCallService)",
    **{f"clicktocall.{key}": "click-to-call's flow" for key in (
        "channel", "context", "ring", "rate.per_second", "rate.burst", "dial_policy.countries",
        "dial_policy.number_types", "show_name")},
    "callback": "the callback requests' flow (ClickToCallService), with its own Router",
    **{f"callback.{key}": "the callback requests' flow" for key in (
        "queue_channel", "owner_channel", "context", "line_queues", "queue", "announcement", "ring", "attempts",
        "interval", "min_talk", "max_call")},
    "redis": "the Redis link and the shared state",
    **{f"redis.{key}": "the Redis link and the shared state" for key in (
        "url", "key_prefix", "timeout", "retry_every", "servers", "source_address", "near_cache", "sync_every")},
    **{f"events.{key}": "the events' handler or poller (ClickToCallService)" for key in (
        "mode", "handler.path", "handler.public_url", "offline.poll_interval", "replay_window")},
    "ami": "the AMI client (ClickToCallService)",
    **{f"ami.{key}": "the AMI client" for key in (
        "username", "secret_file", "host", "port", "connect_timeout", "action_timeout", "ping_interval",
        "reconnect.first", "reconnect.max", "event_queue")},
}

# A file with every section, so every declared key has a value to change.
EVERY_SECTION = """\
server: {listen: "127.0.0.1:4573"}
bitrix:
  oauth: {portal_url: "https://portal.example/rest/", client_id: app.1, client_secret: s, token_file: /t.json,
          install_path: /install}
http: {listen: "127.0.0.1:9573", token_file: /etc/agi-bitrix/token}
callcard: {outbox: /var/lib/agi-bitrix/o.sqlite3}
users: {refresh: 600}
redis: {url: "redis://127.0.0.1:6379/0"}
ami: {username: agi-bitrix, secret_file: /etc/agi-bitrix/ami-secret}
clicktocall: {}
callback: {}
routing: {fallback_queue: support}
"""


def leaves(settings=Config, under="", path=()):
    """(key, field path, declaration) of every declared value that is not a section."""
    for name, setting in schema.declared(settings):
        key = f"{under}{setting.key}"
        if setting.kind == schema.SECTION:
            yield from leaves(setting.settings, f"{key}.", (*path, name))
        elif setting.kind != schema.OWN and not (settings is Config and name == "default_country"):
            yield key, (*path, name), setting


def changed(settings, path):
    """`settings` with the value at `path` (field names) changed to another of its type."""
    name, rest = path[0], path[1:]
    value = getattr(settings, name)
    if rest:
        new = changed(value, rest)
    elif isinstance(value, bool):
        new = not value
    elif isinstance(value, (int, float)):
        new = value + 1
    elif isinstance(value, tuple):
        new = value[:-1] if value else ("another",)
    else:
        new = f"{value}x"
    return dataclasses.replace(settings, **{name: new})


def test_each_restart_key_changed_alone_is_named_alone_and_no_other_key_is():
    base = parse_config(EVERY_SECTION, "every.yaml", {"AGI_BITRIX_AMI_SECRET": "a-secret-of-sixteen+"})
    for key, path, setting in leaves():
        expected = [key] if setting.restart else []
        assert schema.restart_changes(Config, base, changed(base, path)) == expected, key


def test_a_section_added_or_removed_is_named_once_without_its_keys():
    bare = "bitrix: {webhook_url: 'https://p.example/rest/1/c/'}\nrouting: {fallback_queue: support}\n"
    sections = "callcard: {outbox: /o.sqlite3}\nusers: {}\nredis: {url: 'redis://127.0.0.1:6379/0'}\n"
    without, with_them = parse_config(bare), parse_config(bare + sections)
    assert schema.restart_changes(Config, without, with_them) == ["callcard", "users", "redis"]
    assert schema.restart_changes(Config, with_them, without) == ["callcard", "users", "redis"]
    assert schema.restart_changes(Config, without, without) == []



def test_a_section_added_with_a_restart_key_at_its_default_changes_nothing_that_waits():
    webhook = parse_config("bitrix: {webhook_url: 'https://p.example/rest/1/c/'}\nrouting: {fallback_queue: support}")
    application = parse_config("bitrix: {oauth: {portal_url: 'https://p.example/rest/', client_id: a, client_secret: s,"
                               " token_file: /t.json}}\nrouting: {fallback_queue: support}")
    assert schema.restart_changes(Config, webhook, application) == []  # no install_path: none to serve
    with_install = dataclasses.replace(application, bitrix=dataclasses.replace(
        application.bitrix, oauth=dataclasses.replace(application.bitrix.oauth, install_path="/install")))
    assert schema.restart_changes(Config, webhook, with_install) == ["bitrix.oauth.install_path"]


def test_the_declarations_mark_exactly_the_settings_a_reload_cannot_apply():
    assert schema.restart_keys(Config) == list(RESTART_ONLY)


def test_the_settings_table_marks_exactly_the_declared_keys():
    from tests.test_docs import settings_reference

    reference = settings_reference()
    document = reference.SETTINGS_DOC.read_text(encoding="utf-8")
    marked = [line.split("`")[1] for line in document.splitlines()
              if line.startswith("| `") and line.endswith(f"| {reference.AFTER_RESTART} |")]
    assert marked == list(RESTART_ONLY)


def write(path, text):
    path.write_text(textwrap.dedent(text))


async def test_a_reload_applies_what_it_can_and_names_each_restart_key_once(portal, tmp_path, caplog):
    file = tmp_path / "agi-bitrix.yaml"
    config = """\
        server: {{listen: "127.0.0.1:{port}"}}
        bitrix: {{webhook_url: "{url}", pool_size: {pool}, breaker: {{failures: {failures}, cool_down: 3}}}}
        cache: {{found_ttl: {ttl}}}
        http: {{listen: "off"}}
        routing: {{fallback_queue: support}}
        """
    write(file, config.format(port=4573, url=portal.webhook_url, pool=10, failures=5, ttl=60))
    app = Application(parse_config(file.read_text(), str(file)))
    try:
        write(file, config.format(port=4574, url=portal.webhook_url, pool=20, failures=2, ttl=7))
        caplog.set_level(logging.WARNING, logger="agi_bitrix")
        assert await app.reload()
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings == ["server.listen changed; it takes effect after a restart",
                            "bitrix.pool_size changed; it takes effect after a restart"]
        assert app.memory.cache.settings.found_ttl == 7
        assert (app.memory.breaker.threshold, app.memory.breaker.cool_down) == (2, 3)
        assert app.runtime.config.bitrix.pool_size == 20  # in the config; the pool keeps its size
    finally:
        await app.stop()


async def test_a_reload_keeps_the_cache_unless_the_portal_changed(portal, tmp_path):
    app = Application(make_config(portal.webhook_url))
    try:
        await app.lookup.lookup("74951112233")  # the answer is kept in the cache
        assert len(app.memory.cache) == 1
        same = tmp_path / "same.yaml"
        write(same, f"""\
            bitrix: {{webhook_url: "{portal.webhook_url}"}}
            http: {{listen: "off"}}
            routing: {{fallback_queue: support}}
            """)
        assert await app.reload(same) and len(app.memory.cache) == 1
        other = tmp_path / "other.yaml"
        write(other, """\
            bitrix: {webhook_url: "https://other.example/rest/1/code/"}
            http: {listen: "off"}
            routing: {fallback_queue: support}
            """)
        assert await app.reload(other) and len(app.memory.cache) == 0
    finally:
        await app.stop()


async def test_with_redis_a_changed_portal_is_announced_for_the_shared_state(tmp_path, caplog):
    # Never started: the link to Redis is made, not connected, so no Redis is needed here.
    file = tmp_path / "agi-bitrix.yaml"
    config = """\
        bitrix: {{webhook_url: "https://{host}/rest/1/code/"}}
        http: {{listen: "off"}}
        redis: {{url: "redis://127.0.0.1:1/0"}}
        routing: {{fallback_queue: support}}
        """
    write(file, config.format(host="one.example"))
    app = Application(parse_config(file.read_text(), str(file)))
    try:
        write(file, config.format(host="two.example"))
        caplog.set_level(logging.WARNING, logger="agi_bitrix")
        assert await app.reload()
        assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
            "the portal changed; the state shared through Redis follows it after a restart"]
    finally:
        await app.stop()
