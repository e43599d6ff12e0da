"""The `agi-bitrix` command as an admin runs it: real processes, real config files."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from agi_bitrix.testing.fake_asterisk import fake_call

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "config" / "agi-bitrix.yaml"


def agi_bitrix(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "agi_bitrix", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=ROOT, check=False)


def test_check_accepts_the_shipped_config():
    result = agi_bitrix("check", "-c", str(SHIPPED), env={"AGI_BITRIX_WEBHOOK_URL": ""})
    assert result.returncode == 0, result.stderr
    assert "OK (3 rules, fallback queue support, listen 127.0.0.1:4573)" in result.stdout
    assert "still the shipped example" in result.stderr


def test_check_lists_every_problem_and_fails(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("""\
        bitrix:
          webhook_url: https://portal.example/rest/1/s3cr3tc0de/
          dedline: 2
        routing:
          fallback_queue: support
          rules:
            - name: x
              match: {timeman: [OPEND]}
              route: [mobil]
        """))
    result = agi_bitrix("check", "-c", str(bad))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{bad}:3: bitrix.dedline: unknown key; did you mean 'deadline'?",
        (f"{bad}:8: routing.rules[x].match.timeman[0]: 'OPEND' is not one of:"
         " OPENED, PAUSED, CLOSED, EXPIRED, UNAVAILABLE, NOT_INSTALLED, \"\""),
        (f"{bad}:9: routing.rules[x].route[0]: 'mobil': expected extension, mobile, work_phone, personal_phone,"
         " queue, {queue: NAME}, {extension: NUMBER} or {number: PHONE}"),
        f"{bad}: 3 problem(s); nothing was started",
    ]


def test_serve_refuses_an_invalid_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("routing: {}\n")
    result = agi_bitrix("serve", "-c", str(bad))
    assert result.returncode == 2
    assert "routing.fallback_queue: missing" in result.stderr


async def agi_bitrix_async(*args, env=None):
    """Like agi_bitrix(), without blocking the event loop the in-process portal emulator runs on."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agi_bitrix", *args, cwd=ROOT, env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    return subprocess.CompletedProcess(args, process.returncode, stdout.decode(), stderr.decode())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_serve_routes_a_call_and_never_logs_the_webhook_code(portal):
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agi_bitrix", "serve", "-c", str(SHIPPED), "--listen", f"127.0.0.1:{port}",
        env={**os.environ, "AGI_BITRIX_WEBHOOK_URL": portal.webhook_url}, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        result = await fake_call("127.0.0.1", port, callerid="89161234567")
        assert result.variables["B24_TARGET"] == "101"
        portal.fail("error", status=401, code="INVALID_CREDENTIALS", description="Invalid request credentials")
        result = await fake_call("127.0.0.1", port, callerid="89262345678")  # not cached yet
        assert result.variables["B24_ERROR"] == "INVALID_CREDENTIALS"
    finally:
        process.send_signal(signal.SIGTERM)
        output = (await asyncio.wait_for(process.communicate(), 10))[0].decode()
    assert process.returncode == 0, output
    assert "listening on 127.0.0.1" in output and "/rest/1/***/" in output
    assert "status=FOUND route=extension target=101 rule=owner-at-work" in output
    assert "emulator-secret" not in output


async def test_route_explains_a_real_lookup(portal, tmp_path):
    result = await agi_bitrix_async("route", "-c", str(SHIPPED), "+7 916 123-45-67",
                        env={"AGI_BITRIX_WEBHOOK_URL": portal.webhook_url})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "number:   79161234567" in out
    assert "answer:   FOUND, 2 CRM object(s)" in out
    assert "1. CONTACT 12, owner 1 TIMEMAN_STATUS=OPENED inner='101'" in out
    assert "owner-on-break: CONTACT 12: TIMEMAN_STATUS OPENED not in ['PAUSED']" in out
    assert "=> owner-at-work: matched CONTACT 12; dials owner's extension" in out
    assert "B24_TARGET         = 101" in out
    assert "emulator-secret" not in out


async def test_route_explains_a_portal_failure(portal):
    portal.fail("html", status=502)
    result = await agi_bitrix_async("route", "-c", str(SHIPPED), "89161234567",
                                    env={"AGI_BITRIX_WEBHOOK_URL": portal.webhook_url})
    assert "answer:   ERROR http_502" in result.stdout
    assert "=> fallback: no rule decided; fallback queue" in result.stdout


def test_demo_once_shows_every_sample_call():
    result = agi_bitrix("demo", "--once", "--listen", f"127.0.0.1:{free_port()}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "15 of 15 calls went where the default policy says." in result.stdout
    assert "NO_CALLERID" in result.stdout


async def test_sighup_reloads_and_sigterm_finishes_calls_in_flight(portal, tmp_path):
    path = tmp_path / "agi-bitrix.yaml"
    base = "bitrix: {deadline: 1.5}\nrouting:\n  fallback_queue: support\n  rules:\n"
    path.write_text(base + "    - {name: to-sales, route: {queue: sales}}\n")
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agi_bitrix", "serve", "-c", str(path), "--listen", f"127.0.0.1:{port}",
        env={**os.environ, "AGI_BITRIX_WEBHOOK_URL": portal.webhook_url}, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        for _ in range(100):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        assert (await fake_call("127.0.0.1", port, callerid="1")).variables["B24_TARGET"] == "sales"
        path.write_text(base + "    - {name: to-desk, route: {extension: '100'}}\n")
        process.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        assert (await fake_call("127.0.0.1", port, callerid="1")).variables["B24_TARGET"] == "100"
        path.write_text("routing: [broken\n")
        process.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        assert (await fake_call("127.0.0.1", port, callerid="1")).variables["B24_TARGET"] == "100"
        portal.fail("slow", delay=0.8)
        in_flight = asyncio.create_task(fake_call("127.0.0.1", port, callerid="89161234567"))
        await asyncio.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        assert (await in_flight).variables["B24_STATUS"] == "FOUND"
    except BaseException:
        process.kill()
        raise
    finally:
        output = (await asyncio.wait_for(process.communicate(), 10))[0].decode()
    assert process.returncode == 0, output
    assert "config reloaded from" in output
    assert "reload refused: " in output and "still serving with sha256" in output
    assert "finishing the calls in flight" in output
