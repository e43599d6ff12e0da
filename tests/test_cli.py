"""The `agi-bitrix` command as an admin runs it: real processes, real config files."""

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agi_bitrix.testing.fake_asterisk import fake_call
from tests.conftest import oauth_section
from tests.network import free_port
from tests.serve_process import start_serve, stop_serve

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


async def test_serve_routes_a_call_and_never_logs_the_webhook_code(portal):
    process, port = await start_serve(SHIPPED, {"AGI_BITRIX_WEBHOOK_URL": portal.webhook_url})
    try:
        result = await fake_call("127.0.0.1", port, callerid="89161234567")
        assert result.variables["B24_TARGET"] == "101"
        portal.fail("error", status=401, code="INVALID_CREDENTIALS", description="Invalid request credentials")
        result = await fake_call("127.0.0.1", port, callerid="89262345678")  # not cached yet
        assert result.variables["B24_ERROR"] == "INVALID_CREDENTIALS"
    finally:
        output = await stop_serve(process)
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
    process, port = await start_serve(path, {"AGI_BITRIX_WEBHOOK_URL": portal.webhook_url})
    try:
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


# -- oauth login and the auth mode in check ---------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["demo", "--once", "--listen", "foo"], "agi-bitrix demo: argument --listen: expected HOST:PORT, got 'foo'"),
    (["demo", "--once", "--listen", "127.0.0.1:0"], "agi-bitrix demo: argument --listen: expected HOST:PORT"),
    (["demo", "--once", "--listen", "127.0.0.1:99999"], "agi-bitrix demo: argument --listen: expected HOST:PORT"),
    (["serve", "-c", str(SHIPPED), "--listen", "foo"], "agi-bitrix serve: argument --listen: expected HOST:PORT"),
    (["oauth", "login", "-c", str(SHIPPED), "--listen", "99999"],
     "agi-bitrix oauth login: argument --listen: expected a port from 1 to 65535, got '99999'"),
    (["oauth", "login", "-c", str(SHIPPED), "--wait", "nan"],
     "agi-bitrix oauth login: argument --wait: expected a number of seconds above 0, got 'nan'"),
    (["oauth", "login", "-c", str(SHIPPED), "--wait", "-1"], "agi-bitrix oauth login: argument --wait: expected"),
    (["oauth"], "agi-bitrix oauth: the following arguments are required: ACTION"),
    (["route", "-c", str(SHIPPED)], "agi-bitrix route: the following arguments are required: PHONE"),
    (["test", "-c", str(SHIPPED)], "agi-bitrix test: the following arguments are required: CASES.yaml"),
    (["check"], "agi-bitrix check: the following arguments are required: -c/--config"),
    (["route", "-c", str(SHIPPED), "1", "--record", "/nonexistent/x.json"],
     "agi-bitrix route: argument --record: '/nonexistent/x.json': there is no folder '/nonexistent'"),
    (["route", "-c", str(SHIPPED), "1", "--record", "/"], "agi-bitrix route: argument --record: '/' is a folder"),
    (["serve", "-c", str(SHIPPED), "--log-level", "loud"], "agi-bitrix serve: argument --log-level: invalid choice"),
    (["bogus"], "agi-bitrix: argument COMMAND: invalid choice: 'bogus'"),
    ([], "agi-bitrix: the following arguments are required: COMMAND"),
])
def test_every_command_answers_bad_arguments_with_one_line_and_exit_2(args, message):
    result = agi_bitrix(*args, timeout=30)
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(message), result.stderr
    assert result.stderr.rstrip().endswith("--help)")


async def test_route_says_in_one_line_when_its_record_cannot_be_written(portal):
    # /proc takes no new file: the write fails after the lookup, not in the argument check.
    result = await agi_bitrix_async("route", "-c", str(SHIPPED), "89161234567", "--record", "/proc/answer.json",
                                    env={"AGI_BITRIX_WEBHOOK_URL": portal.webhook_url})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == "agi-bitrix route: --record: cannot write /proc/answer.json: No such file or directory\n"


def test_demo_on_an_address_it_cannot_listen_on_says_so_in_one_line():
    # 192.0.2.0/24 is TEST-NET-1 (RFC 5737): never an address of this machine.
    result = agi_bitrix("demo", "--once", "--listen", "192.0.2.1:4573", timeout=30)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("cannot listen on 192.0.2.1:4573: ") and len(result.stderr.splitlines()) == 1


OAUTH_CLIENT_ID, OAUTH_SECRET = "local.5f1a2b3c4d5e6f.12345678", "client-secret-x9y8z7"


def application_section(tmp_path, server):
    """The `bitrix:` section for the local application `server` knows, its tokens in tmp_path."""
    return oauth_section(server.client_endpoint, OAUTH_CLIENT_ID, tmp_path / "oauth.json",
                         f"{server.url}/oauth/token/", OAUTH_SECRET)


def oauth_config_file(tmp_path, server, callcard=False):
    path = tmp_path / "oauth.yaml"
    path.write_text(application_section(tmp_path, server) + textwrap.dedent("""\
        users: {refresh: 600}
        routing: {fallback_queue: support}
        """) + (f"callcard: {{outbox: {tmp_path / 'outbox.sqlite3'}}}\n" if callcard else ""))
    return path


async def oauth_server(portal, **options):
    from agi_bitrix.testing.portal_oauth import OAuthServer

    return await OAuthServer(portal, client_id=OAUTH_CLIENT_ID, client_secret=OAUTH_SECRET, **options).start()


async def start_login(config, *extra):
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agi_bitrix", "oauth", "login", "-c", str(config), *extra, cwd=ROOT,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    lines = []
    while not any("/oauth/authorize/?" in line for line in lines):
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        assert line, f"the login printed no authorize URL: {lines}"
        lines.append(line)
    while "2." not in lines[-1]:  # the second step: it is ready for the redirect
        lines.append((await asyncio.wait_for(process.stdout.readline(), 30)).decode())
    url = next(line.strip() for line in lines if "/oauth/authorize/?" in line)
    return process, url, "".join(lines)


async def finished(process, stdin=b""):
    stdout, stderr = await asyncio.wait_for(process.communicate(stdin), 30)
    return process.returncode, stdout.decode(), stderr.decode()


async def browser(url, follow):
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(url, allow_redirects=follow) as answer:
            return answer.headers.get("Location", ""), await answer.text()


async def test_oauth_login_with_the_redirect_pasted(portal, tmp_path):
    server = await oauth_server(portal, redirect_uri="https://pbx.example/agi-bitrix/oauth")
    try:
        config = oauth_config_file(tmp_path, server)
        process, url, printed = await start_login(config)
        assert url.startswith(f"{server.url}/oauth/authorize/?client_id={OAUTH_CLIENT_ID}&state=")
        location, _ = await browser(url, follow=False)
        assert location.startswith("https://pbx.example/agi-bitrix/oauth?code=")
        code, stdout, stderr = await finished(process, (location + "\n").encode())
    finally:
        await server.stop()
    assert code == 0, stderr
    saved = json.loads((tmp_path / "oauth.json").read_text())
    assert stat.S_IMODE(os.stat(tmp_path / "oauth.json").st_mode) == 0o600
    assert saved["refresh_token"] == server.refresh_token and saved["client_endpoint"] == server.client_endpoint
    assert (f"Tokens for portal {server.domain} (member_id {server.member_id}, scopes telephony,user) saved in"
            f" {tmp_path / 'oauth.json'} (mode 0600).") in stdout
    assert server.codes_exchanged == 1 and stderr == ""
    for secret in (OAUTH_SECRET, saved["access_token"], saved["refresh_token"], "secret"):
        assert secret not in printed + stdout + stderr


async def test_oauth_login_on_its_local_listener(portal, tmp_path):
    port = free_port()
    server = await oauth_server(portal, redirect_uri=f"http://127.0.0.1:{port}/agi-bitrix", scope="telephony")
    try:
        config = oauth_config_file(tmp_path, server)
        process, url, printed = await start_login(config, "--listen", str(port))
        assert f"http://127.0.0.1:{port}/" in printed
        _, page = await browser(url, follow=True)  # the browser follows the portal's redirect to the listener
        code, stdout, stderr = await finished(process)
    finally:
        await server.stop()
    assert code == 0, stderr
    assert "you can close this tab" in page
    assert json.loads((tmp_path / "oauth.json").read_text())["refresh_token"] == server.refresh_token
    assert f"member_id {server.member_id}, scopes telephony)" in stdout
    # The config has a users section: without the user scope the directory cannot load.
    assert "warning: the application lacks the scope(s) user" in stderr
    assert OAUTH_SECRET not in stdout + stderr and "secret" not in stdout + stderr


async def test_oauth_login_refuses_another_attempts_state_and_a_stale_code(portal, tmp_path):
    server = await oauth_server(portal, redirect_uri="https://pbx.example/cb")
    try:
        config = oauth_config_file(tmp_path, server)
        process, url, _ = await start_login(config)
        location, _ = await browser(url.replace("state=", "state=other"), follow=False)
        refused_state = await finished(process, (location + "\n").encode())
        server.code_lifetime = 0.0  # the 30 s have passed by the time it is pasted
        process, url, _ = await start_login(config)
        location, _ = await browser(url, follow=False)
        refused_code = await finished(process, (location + "\n").encode())
    finally:
        await server.stop()
    assert refused_state[0] == 1 and "state= is not this login's" in refused_state[2]
    assert refused_code[0] == 1 and "a code works once and for 30 seconds" in refused_code[2]
    assert "nothing was stored" in refused_code[2] and not (tmp_path / "oauth.json").exists()
    assert server.codes_exchanged == 0


def test_check_names_the_auth_mode_and_warns_about_the_call_card_through_a_webhook(tmp_path):
    config = tmp_path / "webhook.yaml"
    config.write_text(textwrap.dedent(f"""\
        bitrix: {{webhook_url: "https://portal.example/rest/1/s3cr3tc0de/"}}
        routing: {{fallback_queue: support}}
        callcard: {{outbox: {tmp_path / 'outbox.sqlite3'}}}
        """))
    result = agi_bitrix("check", "-c", str(config))
    assert result.returncode == 0 and f"{config}: auth: inbound webhook" in result.stdout
    assert ("register and .finish, which Bitrix24's REST docs say work only in the context of an application"
            in result.stderr) and 'docs/call-card.md, section "OAuth applications"' in result.stderr
    assert "s3cr3tc0de" not in result.stdout + result.stderr
    without_card = tmp_path / "plain.yaml"
    without_card.write_text('bitrix: {webhook_url: "https://portal.example/rest/1/code/"}\n'
                            "routing: {fallback_queue: support}\n")
    assert "context of an application" not in agi_bitrix("check", "-c", str(without_card)).stderr


async def test_check_says_whether_the_oauth_token_file_is_there(portal, tmp_path):
    server = await oauth_server(portal)
    try:
        config = oauth_config_file(tmp_path, server, callcard=True)
        missing = await agi_bitrix_async("check", "-c", str(config))
        (tmp_path / "oauth.json").write_text(json.dumps({"refresh_token": "r"}))
        present = await agi_bitrix_async("check", "-c", str(config))
    finally:
        await server.stop()
    token_file = tmp_path / "oauth.json"
    assert f"auth: OAuth application {OAUTH_CLIENT_ID}, token file {token_file} missing" in missing.stdout
    assert f"run `agi-bitrix oauth login -c {config}`" in missing.stderr
    assert f"token file {token_file} present" in present.stdout
    assert "context of an application" not in missing.stderr + present.stderr and OAUTH_SECRET not in missing.stdout


async def test_a_newcomer_goes_from_no_token_to_a_finished_call_with_its_recording(tmp_path):
    """The documented path, on a portal that takes register and finish only from an application:
    oauth login, serve, then a call routed, registered, finished and its recording attached."""
    from agi_bitrix.testing.portal import PortalEmulator
    from agi_bitrix.testing.sample_data import SAMPLE_CRM, SAMPLE_USERS

    portal = PortalEmulator(SAMPLE_CRM, users=SAMPLE_USERS, application_only=True)
    await portal.start()
    server = await oauth_server(portal, redirect_uri="https://pbx.example/agi-bitrix/oauth")
    monitor = tmp_path / "monitor"
    monitor.mkdir()
    config = tmp_path / "agi-bitrix.yaml"
    config.write_text(application_section(tmp_path, server) + textwrap.dedent(f"""\
        metrics: {{listen: off}}
        routing:
          fallback_queue: support
          rules:
            - name: owner-at-work
              route: [extension, queue]
        callcard:
          outbox: {tmp_path / 'outbox.sqlite3'}
          finish:
            retry: {{first: 0.1, max: 0.5}}
            recording: {{file: "{monitor}/{{uniqueid}}.wav", settle: 0.2}}
        users: {{refresh: 600}}
        """))
    port = free_port()
    process = None
    try:
        login, url, _ = await start_login(config)
        location, _ = await browser(url, follow=False)
        code, stdout, stderr = await finished(login, (location + "\n").encode())
        assert code == 0, stderr
        assert "saved in" in stdout and "warning" not in stderr  # the scopes the config needs are there

        process, _ = await start_serve(config, port=port)
        routed = (await fake_call("127.0.0.1", port, callerid="89161234567", uniqueid="1700000000.5")).variables
        assert (routed["B24_STATUS"], routed["B24_TARGET"], routed["B24_USER_ID"]) == ("FOUND", "101", "1")
        registered = (await fake_call("127.0.0.1", port, script="register", uniqueid="1700000000.5", args=(
            routed["B24_PHONE"], routed["B24_USER_ID"], "1700000000.5", "74950000000", routed["B24_ENTITY_TYPE"],
            routed["B24_ENTITY_ID"]))).variables
        call_id = registered["B24_CALL_ID"]
        assert call_id and registered["B24_REGISTER_ERROR"] == ""
        (monitor / "1700000000.5.wav").write_bytes(b"RIFF....WAVEfmt recorded talk")  # MixMonitor's file
        await fake_call("127.0.0.1", port, script="finish", uniqueid="1700000000.5", args=(
            call_id, "1", "ANSWER", "1700000010.0", "101@internal", "1700000040.0", str(monitor / "1700000000.5.wav")))
        for _ in range(100):
            if portal.calls[call_id].record is not None:
                break
            await asyncio.sleep(0.1)
    finally:
        if process is not None:
            output = await stop_serve(process)
        await server.stop()
        await portal.stop()
    call = portal.calls[call_id]
    assert call.finish_params["DURATION"] == "30" and call.finish_params["STATUS_CODE"] == "200"
    assert (call.record.filename, call.record.content) == ("1700000000.5.wav", b"RIFF....WAVEfmt recorded talk")
    assert process.returncode == 0, output
    assert "recording 1700000000.5.wav attached to" in output
    assert "WRONG_AUTH_TYPE" not in output and "secret" not in output
