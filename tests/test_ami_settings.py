"""The `ami:` section: declared once, checked by `check`, its secret from AGI_BITRIX_AMI_SECRET or a
private regular file, never in the YAML and never in a message."""

import os
import pwd
import subprocess
import sys

import pytest

from agi_bitrix.ami.errors import SecretUnavailable
from agi_bitrix.ami.settings import AmiSettings, read_secret
from agi_bitrix.config import parse_config
from tests.test_config import BASE, problems

SECRET = "Ami-s3cret-\u0456"  # ending in a Cyrillic letter: any one-line UTF-8 text


def secret_file(tmp_path, mode: int = 0o600, text: str = SECRET + "\n") -> str:
    path = tmp_path / "ami.secret"
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_without_the_section_ami_is_off():
    assert parse_config(BASE).ami is None


def test_the_section_with_the_secret_in_the_environment():
    config = parse_config(BASE + "ami:\n  username: agi-bitrix\n", environ={"AGI_BITRIX_AMI_SECRET": SECRET})
    assert config.ami == AmiSettings(username="agi-bitrix", secret_file="")
    assert (config.ami.host, config.ami.port, config.ami.reconnect_max) == ("127.0.0.1", 5038, 30.0)
    assert read_secret(config.ami, {"AGI_BITRIX_AMI_SECRET": SECRET}) == SECRET


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o400])
def test_a_private_secret_file_is_read_without_its_newline(tmp_path, mode):
    path = secret_file(tmp_path, mode)
    config = parse_config(BASE + f"ami:\n  username: u\n  secret_file: {path}\n")
    assert config.ami is not None and read_secret(config.ami, {}) == SECRET
    assert SECRET not in repr(config)


def test_the_environment_wins_over_the_file(tmp_path):
    settings = AmiSettings(username="u", secret_file=secret_file(tmp_path))
    assert read_secret(settings, {"AGI_BITRIX_AMI_SECRET": "from-env"}) == "from-env"


def test_a_secret_written_in_the_file_is_refused_and_not_quoted():
    found = problems(BASE + "ami:\n  username: u\n  secret: hunter2\n", {"AGI_BITRIX_AMI_SECRET": SECRET})
    assert found == ["test.yaml:7: ami.secret: never in this file: use AGI_BITRIX_AMI_SECRET or secret_file"]


def test_no_secret_and_no_username_are_each_said():
    found = problems(BASE + "ami:\n  port: 5038\n")
    assert found == ["test.yaml:6: ami.username: missing; the [user] of Asterisk's manager.conf",
                     ("test.yaml:6: ami: no AMI secret: set the environment variable AGI_BITRIX_AMI_SECRET"
                      " or ami.secret_file")]


@pytest.mark.parametrize(("mode", "why"), [(0o644, "has mode 0644"), (0o660, "has mode 0660"),
                                           (0o604, "has mode 0604"), (0o700, "has mode 0700")])
def test_a_secret_file_others_may_read_or_write_is_refused(tmp_path, mode, why):
    settings = AmiSettings(username="u", secret_file=secret_file(tmp_path, mode))
    with pytest.raises(SecretUnavailable, match=why) as refused:
        read_secret(settings, {})
    assert SECRET not in str(refused.value)


def test_a_secret_file_of_another_user_is_refused(tmp_path):
    # A real other user: root (the tests' user) hands the file to `nobody`.
    path = secret_file(tmp_path)
    nobody = pwd.getpwnam("nobody")
    os.chown(path, nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(SecretUnavailable, match=f"belongs to user {nobody.pw_uid}"):
        read_secret(AmiSettings(username="u", secret_file=path), {})


def test_a_fifo_in_the_secret_files_place_is_refused_without_hanging(tmp_path):
    path = tmp_path / "ami.secret"
    os.mkfifo(path, 0o600)
    with pytest.raises(SecretUnavailable, match="not a regular file"):
        read_secret(AmiSettings(username="u", secret_file=str(path)), {})


@pytest.mark.parametrize(("text", "why"), [("", "is empty"), ("\n", "is empty"), ("a\nb\n", "line-break"),
                                           ("x" * 2000, "longer than")])
def test_an_unusable_secret_file_is_refused(tmp_path, text, why):
    with pytest.raises(SecretUnavailable, match=why):
        read_secret(AmiSettings(username="u", secret_file=secret_file(tmp_path, text=text)), {})


def test_a_missing_or_relative_secret_file_is_a_problem(tmp_path):
    assert problems(BASE + f"ami:\n  username: u\n  secret_file: {tmp_path}/none\n") == [
        f"test.yaml:7: ami: ami.secret_file {tmp_path}/none: No such file or directory"]
    assert problems(BASE + "ami:\n  username: u\n  secret_file: ami.secret\n",
                    {"AGI_BITRIX_AMI_SECRET": SECRET}) == ["test.yaml:7: ami.secret_file: must be an absolute path"]


def test_bounds_and_backoff_order_are_checked():
    found = problems(BASE + "ami:\n  username: u\n  port: 70000\n  reconnect:\n    first: 10\n    max: 5\n",
                     {"AGI_BITRIX_AMI_SECRET": SECRET})
    assert found == ["test.yaml:7: ami.port: expected a whole number from 1 to 65535, got 70000",
                     "test.yaml:10: ami.reconnect.max: 5 is shorter than reconnect.first (10)"]


def test_check_refuses_a_world_readable_secret_file_and_never_prints_the_secret(tmp_path):
    # Through the real command an admin runs.
    config = tmp_path / "agi-bitrix.yaml"
    config.write_text(BASE + f"ami:\n  username: u\n  secret_file: {secret_file(tmp_path, 0o644)}\n")
    environ = {name: value for name, value in os.environ.items() if name != "AGI_BITRIX_AMI_SECRET"}
    run = subprocess.run([sys.executable, "-m", "agi_bitrix", "check", "-c", str(config)], capture_output=True,
                         text=True, timeout=60, env=environ, check=False)
    assert run.returncode != 0 and "has mode 0644; make it 0600 or 0640" in run.stdout + run.stderr
    assert SECRET not in run.stdout + run.stderr
