"""The `ami:` section (declared once with agi_bitrix.schema) and the secret it points to.

The secret is never in the YAML: it comes from the environment variable AGI_BITRIX_AMI_SECRET
or from `secret_file`, a regular file of root or the server's user that no one but its owner
(and the owner's group, read-only) may read. It is read again on every login, so a rotated
secret needs no restart, and it never appears in a message, a log line or a repr.
"""

from __future__ import annotations

import os
import stat
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass

from agi_bitrix.ami.errors import SecretUnavailable
from agi_bitrix.schema import integer, not_shorter_than, number, text

AMI_SECRET_ENV = "AGI_BITRIX_AMI_SECRET"
# A secret file may be read by its owner and read (not written) by its group: 0600, 0640, 0400, 0440.
_FORBIDDEN_SECRET_MODE = stat.S_IWGRP | stat.S_IXGRP | stat.S_IRWXO | stat.S_IXUSR | stat.S_ISUID | stat.S_ISGID
_MAX_SECRET_BYTES = 1024


def _no_space(value: str) -> str:
    if not value or any(char.isspace() or unicodedata.category(char) == "Cc" for char in value):
        raise ValueError("must be non-empty text without spaces or control characters")
    return value


def _username(value: str) -> str:
    if not value:
        raise ValueError("missing; the [user] of Asterisk's manager.conf")
    return _no_space(value)


def _absolute(value: str) -> str:
    if value and not value.startswith("/"):
        raise ValueError("must be an absolute path")
    return value



@dataclass(frozen=True)
class AmiSettings:
    """How the server reaches Asterisk's manager interface (for the calls it starts itself)."""

    # The [user] of manager.conf; required, read by the section's reader (agi_bitrix.config).
    username: str = text("username", check=_username, restart=True)
    # The secret's file when AGI_BITRIX_AMI_SECRET is not set: absolute, regular, mode 0600 or 0640;
    # read by the section's reader, "" when the environment holds the secret.
    secret_file: str = text("secret_file", check=_absolute, restart=True)
    host: str = text("host", "127.0.0.1", check=_no_space, restart=True)
    port: int = integer("port", 5038, 1, 65535, restart=True)
    # TCP connect, the banner and the Login answer, each.
    connect_timeout: float = number("connect_timeout", 5.0, 0, 60, restart=True)
    # An action's answer (an Originate's "queued" included; the call's own ring time is its own).
    action_timeout: float = number("action_timeout", 5.0, 0, 120, restart=True)
    # A Ping this often while idle; unanswered within action_timeout, the connection is dropped and made again.
    ping_interval: float = number("ping_interval", 20.0, 0, 3600, restart=True)
    # The wait before connecting again: first, doubled on each failure up to max.
    reconnect_first: float = number("reconnect.first", 0.5, 0, 60, restart=True)
    reconnect_max: float = number("reconnect.max", 30.0, 0, 3600, check=not_shorter_than("reconnect.first"),
                                  needs=("reconnect_first",), restart=True)
    # Events waiting for their listeners; past it new ones are dropped and counted, never piled up.
    event_queue: int = integer("event_queue", 10_000, 1, 1_000_000, restart=True)


def read_secret(settings: AmiSettings, environ: Mapping[str, str]) -> str:
    """The AMI secret: AGI_BITRIX_AMI_SECRET, else secret_file. SecretUnavailable says why not
    (never quoting the secret)."""
    from_environment = environ.get(AMI_SECRET_ENV, "")
    if from_environment:
        return _usable(from_environment, f"the environment variable {AMI_SECRET_ENV}")
    if not settings.secret_file:
        raise SecretUnavailable(f"no AMI secret: set the environment variable {AMI_SECRET_ENV} or ami.secret_file")
    return _usable(_read_secret_file(settings.secret_file), f"ami.secret_file {settings.secret_file}")


def _read_secret_file(path: str) -> str:
    try:
        # O_NONBLOCK: a FIFO put in the file's place must not hang the open.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise SecretUnavailable(f"ami.secret_file {path}: {error.strerror}") from None
    with os.fdopen(descriptor, "rb") as file:
        status = os.fstat(file.fileno())
        if not stat.S_ISREG(status.st_mode):
            raise SecretUnavailable(f"ami.secret_file {path} is not a regular file")
        if status.st_uid not in (0, os.geteuid()):  # another user could put a secret of their choosing there
            raise SecretUnavailable(f"ami.secret_file {path} belongs to user {status.st_uid}, not to root or"
                                    " the user the server runs as")
        if status.st_mode & _FORBIDDEN_SECRET_MODE:
            raise SecretUnavailable(f"ami.secret_file {path} has mode {stat.S_IMODE(status.st_mode):04o};"
                                    " make it 0600 or 0640 (chmod 600)")
        raw = file.read(_MAX_SECRET_BYTES + 1)
    if len(raw) > _MAX_SECRET_BYTES:
        raise SecretUnavailable(f"ami.secret_file {path} is longer than {_MAX_SECRET_BYTES} bytes")
    try:
        return raw.decode().removesuffix("\n").removesuffix("\r")
    except UnicodeDecodeError:
        raise SecretUnavailable(f"ami.secret_file {path} is not UTF-8 text") from None


def _usable(secret: str, where: str) -> str:
    if not secret:
        raise SecretUnavailable(f"{where} is empty")
    if any(unicodedata.category(char) in ("Cc", "Zl", "Zp") for char in secret):
        raise SecretUnavailable(f"{where} holds a control or line-break character (one line, no newline inside)")
    return secret
