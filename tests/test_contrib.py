"""The service files in contrib/ as an admin installs them."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
