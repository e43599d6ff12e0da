"""What an admin installs beside the server: the service files, the alert rules and the dashboard in
contrib/, and the release's one version."""

import asyncio
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from agi_bitrix import __version__
from agi_bitrix.ami.client import AmiClient
from agi_bitrix.ami.settings import AmiSettings
from agi_bitrix.app import Application
from agi_bitrix.config import parse_config
from agi_bitrix.monitoring import Metrics
from agi_bitrix.testing.fake_asterisk import fake_call
from tests.conftest import make_config
from tests.needs import required_binary
from tests.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "contrib" / "agi-bitrix.service"


def unit_options() -> dict[str, list[str]]:
    options: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            options.setdefault(key, []).append(value)
    return options


def test_unit_runs_a_dedicated_user_restarts_and_reloads_with_sighup():
    options = unit_options()
    assert options["User"] == ["agi-bitrix"] and options["Group"] == ["agi-bitrix"]
    assert options["Restart"] == ["always"]
    assert options["ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    assert options["ExecReload"][0].endswith("agi-bitrix check -c /etc/agi-bitrix/agi-bitrix.yaml")
    assert options["ExecStart"] == ["/usr/local/bin/agi-bitrix serve -c /etc/agi-bitrix/agi-bitrix.yaml"]
    # Calls in flight get server.session_timeout (30 s) to finish before systemd kills.
    assert int(options["TimeoutStopSec"][0]) > 30
    sysusers = (ROOT / "contrib" / "agi-bitrix.sysusers").read_text()
    assert "u agi-bitrix - " in sysusers


def test_unit_keeps_the_state_folder_and_every_file_the_server_makes_private():
    options = unit_options()
    assert options["StateDirectory"] == ["agi-bitrix"] and options["StateDirectoryMode"] == ["0700"]
    assert options["UMask"] == ["0077"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    # verify insists that the commands exist: point them at this environment's agi-bitrix.
    executable = Path(sys.executable).with_name("agi-bitrix")
    unit = tmp_path / "agi-bitrix.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/agi-bitrix", str(executable)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


# -- the Prometheus alert rules and the Grafana dashboard -------------------------------------------

PROMETHEUS = ROOT / "contrib" / "prometheus"
RULES = PROMETHEUS / "agi-bitrix-alerts.yml"
RULE_TESTS = PROMETHEUS / "agi-bitrix-alerts.test.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "agi-bitrix-dashboard.json"
ALERTS_DOC = ROOT / "docs" / "alerts.md"
METRIC_NAME = re.compile(r"\bagi_bitrix_[a-z_]+\b")
# Grafana's variables, as Prometheus would see them once Grafana has filled them in.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "1h", "$instance": ".*"}


def promtool() -> str:
    """Debian's promtool (the prometheus package; scripts/test installs it). Missing fails under CI."""
    return required_binary("promtool", "Debian's prometheus package")


def run_promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, check=False, cwd=cwd, timeout=60)


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    queries.extend(variable["query"]["query"] for variable in dashboard["templating"]["list"]
                   if variable["type"] == "query")
    return queries


def grafana_filled(query: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        query = query.replace(variable, value)
    return query


def test_promtool_accepts_the_alert_rules():
    result = run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_every_alert_fires_when_it_should_and_stays_silent_when_it_should_not():
    result = run_promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == {rule["alert"] for rule in alert_rules()}


# The tests have teeth: each rule broken as a careless edit would, and the rule tests catch it.
BROKEN_RULES = {
    "the call card alert upside down (alerting while the card works)":
        ("agi_bitrix_callcard_up == 0", "agi_bitrix_callcard_up == 1", "AgiBitrixCallCardDown"),
    "AMI down upside down": ("agi_bitrix_ami_up == 0", "agi_bitrix_ami_up == 1", "AgiBitrixAmiDown"),
    "repeated events counted as forged": ('{reason!="duplicate"}', "", "AgiBitrixForgedEvents"),
    "slow requests taken for the listener's cap":
        ('{reason=~"max_connections|descriptors"}', "", "AgiBitrixHttpListenerRefusing"),
    "a rolling upgrade's few minutes alerting": ("unreadable_total[10m])) > 0\n        for: 30m",
                                                 "unreadable_total[10m])) > 0\n        for: 5m",
                                                 "AgiBitrixSharedAnswersUnreadable"),
}


@pytest.mark.parametrize("old, new, alert", BROKEN_RULES.values(), ids=BROKEN_RULES.keys())
def test_a_broken_rule_fails_the_rule_tests(tmp_path, old, new, alert):
    assert RULES.read_text().count(old) == 1
    (tmp_path / RULES.name).write_text(RULES.read_text().replace(old, new))
    shutil.copy(RULE_TESTS, tmp_path)
    result = run_promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0
    assert alert in result.stdout + result.stderr


async def test_the_ami_down_alerts_series_exists_only_where_an_ami_client_runs():
    # AgiBitrixAmiDown is `agi_bitrix_ami_up == 0`: a server without an ami section must have no
    # sample (no alert), one whose Asterisk was never reached must have 0 (the alert), not nothing.
    without_ami = Metrics()
    assert without_ami.registry.get_sample_value("agi_bitrix_ami_up") is None
    assert "# TYPE agi_bitrix_ami_up gauge" in without_ami.exposition().decode()
    metrics = Metrics()
    settings = AmiSettings(username="agi-bitrix", secret_file="", port=free_port(), connect_timeout=0.5,
                           reconnect_first=0.05, reconnect_max=0.2)
    client = AmiClient(settings, lambda: "unused-secret", observer=metrics)
    client.start()
    try:
        await asyncio.sleep(0.2)  # a few refused connections
        assert metrics.registry.get_sample_value("agi_bitrix_ami_up") == 0
    finally:
        await client.stop()


def test_every_alert_has_a_runbook_entry_in_the_docs():
    doc = ALERTS_DOC.read_text()
    headings = {line[len("## "):].strip() for line in doc.splitlines() if line.startswith("## ")}
    for rule in alert_rules():
        assert rule["annotations"]["runbook_url"] == f"docs/alerts.md#{rule['alert'].lower()}"
        assert rule["alert"] in headings, f"docs/alerts.md has no '## {rule['alert']}'"
        assert rule["labels"]["severity"] in ("warning", "critical")


def test_promtool_parses_every_dashboard_query(tmp_path):
    # As recording rules, so promtool's parser checks each query Grafana will send.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"agi_bitrix_dashboard_query_{n}", "expr": grafana_filled(query)}
        for n, query in enumerate(dashboard_queries()) if not query.startswith("label_values(")]}]}
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(rules))
    result = run_promtool("check", "rules", str(tmp_path / "dashboard.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def exported_names(exposition: str) -> set[str]:
    """Every series name the exposition can hold, samples seen yet or not (a labelled counter with
    no call yet has only its HELP and TYPE lines)."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "gauge": ("",)}
    names = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


def metrics_config(path: Path, metrics_port: int, redis_url: str) -> Path:
    # Every part that exports metrics on: the call card's outbox, the redis section, the HTTP
    # listener and an ami section (its Asterisk on a closed port: down, still exported).
    path.write_text(textwrap.dedent(f"""\
        bitrix: {{webhook_url: "http://127.0.0.1:9/rest/1/unused/"}}
        http: {{listen: "127.0.0.1:{metrics_port}"}}
        redis: {{url: "{redis_url}", servers: 2}}
        ami: {{username: agi-bitrix, port: {free_port()}}}
        routing: {{fallback_queue: support, timezone: Europe/Moscow, rules: []}}
        callcard:
          outbox: redis
          register: {{default_user: 1}}
        """))
    return path


def test_the_dashboard_and_the_alerts_use_only_metrics_a_running_server_exports(tmp_path, redis_server):
    metrics_port = free_port()
    config = metrics_config(tmp_path / "agi-bitrix.yaml", metrics_port, redis_server.url)
    log = tmp_path / "serve.log"
    with open(log, "wb") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "agi_bitrix", "serve", "-c", str(config), "--listen", f"127.0.0.1:{free_port()}"],
            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, cwd=tmp_path,
            env={**os.environ, "AGI_BITRIX_AMI_SECRET": "unused-ami-secret"})
    try:
        exposition = scrape(f"http://127.0.0.1:{metrics_port}/metrics", server, log)
    finally:
        server.terminate()
        server.wait(timeout=30)
    exported = exported_names(exposition)
    used = {name for query in dashboard_queries() for name in METRIC_NAME.findall(query)}
    used_by_alerts = {name for rule in alert_rules() for name in METRIC_NAME.findall(rule["expr"])}
    assert used - exported == set(), "the dashboard asks for metrics the server does not export"
    assert used_by_alerts - exported == set(), "the alert rules watch metrics the server does not export"


def scrape(url: str, server: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert server.poll() is None, log.read_text(errors="replace")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.read().decode()
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"no /metrics within 20 s:\n{log.read_text(errors='replace')}")


# -- the release: one version ----------------------------------------------------------------------

def test_one_version_for_the_package_the_command_and_the_changelog():
    # setup.cfg reads agi_bitrix.__version__ (scripts/test reinstalls, so the metadata follows it).
    assert importlib.metadata.version("agi-bitrix") == __version__
    result = subprocess.run([sys.executable, "-m", "agi_bitrix", "--version"], capture_output=True, text=True,
                            check=True, cwd=ROOT)
    assert result.stdout.strip() == f"agi-bitrix {__version__}"
    released = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d\d-\d\d$", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert released[0] == __version__, "CHANGELOG.md's newest release is not the package's version"


async def test_healthz_the_admin_page_and_the_portals_user_agent_say_the_same_version():
    user_agents: list[str] = []

    async def portal(request: web.Request) -> web.Response:
        user_agents.append(request.headers.get("User-Agent", ""))
        return web.json_response({"result": [], "time": {}})

    runner = web.AppRunner(web.Application())
    runner.app.router.add_route("*", "/{tail:.*}", portal)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    webhook = f"http://127.0.0.1:{runner.addresses[0][1]}/rest/1/abcdefghijklmnop/"
    app = Application(make_config(webhook, metrics=f'"127.0.0.1:{free_port()}"'))
    host, port = await app.start("127.0.0.1", 0)
    try:
        await fake_call(host, port, callerid="89161234567")
        base = "http://{}:{}".format(*app.http_listener.address)
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/healthz") as answer:
                health = await answer.json()
            async with http.get(base + "/") as answer:
                page = await answer.text()
    finally:
        await app.stop()
        await runner.cleanup()
    assert health["version"] == __version__
    assert f"version {__version__}" in page
    assert user_agents and set(user_agents) == {f"agi-bitrix/{__version__}"}


def test_the_install_docs_server_section_is_valid_config():
    # The server section docs/install.md shows for agi-bitrix on another host than the PBX.
    doc = (ROOT / "docs" / "install.md").read_text()
    snippet = re.search(r"```yaml\n(server:.*?)```", doc, re.S).group(1)
    config = parse_config(snippet + textwrap.dedent("""\
        bitrix: {webhook_url: "https://example.bitrix24.ru/rest/1/abcdefghijklmnop/"}
        routing: {fallback_queue: support, rules: []}
        """), "docs/install.md")
    assert (config.server.host, config.server.port) == ("10.0.0.20", 4573)
    assert [str(network) for network in config.server.allowed_clients] == ["10.0.0.10/32"]
