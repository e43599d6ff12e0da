"""The one Redis link (agi_bitrix/redis_link.py): a URL is read once, by the same parser in `check`
and `serve`; a password shows nowhere, wherever it was written (userinfo or ?password=), and
whatever it holds; the client built from the parts reaches a real redis-server that asks for it."""

import subprocess
import sys
from pathlib import Path

import pytest

from agi_bitrix.config import parse_config
from agi_bitrix.redis_link import RedisUrl, RedisUrlError, parse_redis_url, redacted_redis_url
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]
SECRET = "Zq9/x+Kp"  # a generated password: it holds "/", as they often do
ENCODED = "Zq9%2Fx%2BKp"


@pytest.mark.parametrize("url, shown", [
    ("redis://:s3cret@10.0.0.5:6379/0", "redis://:***@10.0.0.5:6379/0"),
    ("rediss://agi:s3cret@redis.example.com/2", "rediss://agi:***@redis.example.com:6379/2"),
    ("redis://10.0.0.5:6379/0", "redis://10.0.0.5:6379/0"),
    # The form redis-py documents for unix sockets, and accepts on TCP URLs too.
    ("unix:///run/redis/redis.sock?db=1&password=s3cret", "unix://:***@/run/redis/redis.sock?db=1"),
    ("redis://10.0.0.5:6379/0?password=s3cret", "redis://:***@10.0.0.5:6379/0"),
    ("redis://10.0.0.5/0?username=agi&password=s3cret", "redis://agi:***@10.0.0.5:6379/0"),
    (f"redis://:{ENCODED}@10.0.0.5:6379/3", "redis://:***@10.0.0.5:6379/3"),
])
def test_the_password_never_shows(url, shown):
    parsed = parse_redis_url(url)
    assert parsed.redacted == shown
    assert "s3cret" not in repr(parsed) and "Zq9" not in repr(parsed)


def test_the_parts_are_read_as_redis_py_documents_them():
    assert parse_redis_url(f"redis://agi:{ENCODED}@[::1]:6380/2") == RedisUrl(
        "redis", host="::1", port=6380, db=2, username="agi", password=SECRET)
    assert parse_redis_url("unix:///run/redis.sock?password=p&db=4") == RedisUrl(
        "unix", socket="/run/redis.sock", db=4, password="p")
    assert parse_redis_url("rediss://h/0?ssl_cert_reqs=none").tls == (("ssl_cert_reqs", "none"),)


@pytest.mark.parametrize("url, problem", [
    (f"redis://:{SECRET}@10.0.0.5:6379/0", r"or user\) holds a '/' or '\?': percent-encode it"),
    ("redis://:pa?ss@10.0.0.5:6379/0", r"or user\) holds a '/' or '\?': percent-encode it"),
    ("redis://10.0.0.5:63x9/0", "port is not a number"),
    ("redis://10.0.0.5:0/0", "port is not a number"),
    ("redis://:6379/0", "needs a host"),
    ("redis://10.0.0.5/zero", "database is a number"),
    ("redis://10.0.0.5/0?db=1", "names two databases"),
    ("redis://10.0.0.5/0?socket_timeout=9", "option 'socket_timeout' is not known here"),
    ("redis://10.0.0.5/0?ssl_cert_reqs=none", "option 'ssl_cert_reqs' is not known here"),
    ("rediss://10.0.0.5/0?ssl_cert_reqs=maybe", "ssl_cert_reqs in the Redis URL is one of"),
    ("redis://:s3cret@10.0.0.5/0?password=s3cret", "gives its password twice"),
    ("redis://10.0.0.5/0?password=a&password=b", "gives the option 'password' twice"),
    ("redis://10.0.0.5/0?s3cret", "are not NAME=VALUE pairs"),
    ("redis://:s3cret#@10.0.0.5/0", "no #fragment"),
    ("unix://run/redis.sock", "absolute path"),
    ("http://10.0.0.5/0", "expected a URL like"),
])
def test_a_url_that_cannot_be_used_is_refused_without_its_password(url, problem):
    with pytest.raises(RedisUrlError, match=problem) as refused:
        parse_redis_url(url)
    assert "s3cret" not in str(refused.value) and "Zq9" not in str(refused.value)
    assert redacted_redis_url(url) == "(a Redis URL that cannot be read)"


def test_an_error_from_the_client_has_the_password_hidden_in_every_form():
    parsed = parse_redis_url(f"redis://:{ENCODED}@10.0.0.5/0")
    assert parsed.hide(f"AUTH {SECRET} failed; url had {ENCODED}") == "AUTH *** failed; url had ***"


@pytest.mark.parametrize("section", ["redis", "outbox"])
def test_check_refuses_a_password_with_a_slash_as_serve_would_and_never_quotes_it(section, tmp_path):
    """`check` said OK and `serve` died with a traceback printing the password: now both refuse it
    in one line, through the same parser."""
    url = f"redis://:{SECRET}@127.0.0.1:6379/0"
    where = (f'redis: {{url: "{url}"}}\n' if section == "redis"
             else f'callcard: {{outbox: "{url}"}}\n')
    config = tmp_path / "c.yaml"
    config.write_text('bitrix: {webhook_url: "https://portal.example.com/rest/1/abc/"}\n'
                      f"routing: {{fallback_queue: support}}\n{where}")
    for command in ("check", "serve"):
        result = subprocess.run([sys.executable, "-m", "agi_bitrix", command, "-c", str(config)],
                                check=False, capture_output=True, text=True, timeout=60, cwd=ROOT)
        output = result.stdout + result.stderr
        assert result.returncode != 0, output
        assert "percent-encode it" in output
        assert "Traceback" not in output and "Zq9" not in output


@pytest.mark.parametrize("outbox", ["REDIS://:s3cret@/0", "Redis://:s3cret@h:1/0?db=x", "http://u:s3cret@h/"])
def test_an_outbox_url_check_cannot_use_is_never_quoted(outbox):
    """A scheme in capitals (or not Redis's) was taken for a file name and quoted whole."""
    text = ('bitrix: {webhook_url: "https://portal.example.com/rest/1/abc/"}\n'
            f"routing: {{fallback_queue: support}}\ncallcard: {{outbox: '{outbox}'}}\n")
    with pytest.raises(Exception, match=r"callcard\.outbox") as refused:
        parse_config(text, "c.yaml")
    assert "s3cret" not in str(refused.value)


def test_check_refuses_unknown_options_and_a_port_that_is_not_a_number():
    for url, problem in (("redis://127.0.0.1:6379/0?timeout=5", "option 'timeout' is not known here"),
                         ("redis://127.0.0.1:63a9/0", "port is not a number")):
        text = ('bitrix: {webhook_url: "https://portal.example.com/rest/1/abc/"}\n'
                f'routing: {{fallback_queue: support}}\nredis: {{url: "{url}"}}\n')
        with pytest.raises(Exception, match=problem):
            parse_config(text, "c.yaml")


@pytest.fixture
def redis_with_password(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.mark.parametrize("written", [
    "redis://:{encoded}@127.0.0.1:{port}/0",
    "redis://127.0.0.1:{port}/0?password={encoded}",
    "redis://default:{encoded}@127.0.0.1:{port}/0",
])
async def test_the_client_reaches_a_redis_that_asks_for_a_password_with_a_slash(redis_with_password, written):
    import redis.asyncio as aioredis

    port = redis_with_password.port
    admin = aioredis.Redis(host="127.0.0.1", port=port)
    await admin.config_set("requirepass", SECRET)
    await admin.aclose()
    client = parse_redis_url(written.format(encoded=ENCODED, port=port)).client(timeout=1.0, max_connections=2)
    try:
        assert await client.ping()
    finally:
        await client.aclose()
