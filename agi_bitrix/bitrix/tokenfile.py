"""The OAuth tokens on disk: one JSON file, mode 0600, replaced atomically, and the lock beside it
that processes sharing the file take while they refresh or replace it.

Who writes it: the server at every refresh (agi_bitrix.bitrix.oauth), `agi-bitrix oauth login`,
the install callback, an admin. A refresh token works once (settings/oauth/auto-renewal.md in
bitrix24/b24restdocs), so two processes refreshing from one file at once would lose one of the
pairs: the lock (fcntl.flock on FILE.lock) makes them take turns.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import stat
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from agi_bitrix.bitrix.errors import TokenFileError

_LOCK_POLL = 0.02


@dataclass(frozen=True)
class Tokens:
    access_token: str
    refresh_token: str
    expires_at: float  # unix time; 0 when unknown (refresh before the first request)
    # What the token server (or the install event) said besides the tokens; "" when not known.
    client_endpoint: str = ""  # https://PORTAL/rest/, where requests go
    member_id: str = ""  # the portal's id, which outlives a change of its address
    scope: str = ""  # "telephony,user,crm"
    # From the ONAPPINSTALL event: later calls of the install callback must carry it.
    application_token: str = ""


_EXTRA_FIELDS = ("client_endpoint", "member_id", "scope", "application_token")


class TokenFile:
    """The tokens on disk, as JSON, readable only by its owner; replaced atomically."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def stamp(self) -> tuple[int, int, int] | None:
        """What changes when anyone rewrites the file (an atomic replace gives a new inode)."""
        try:
            status = os.stat(self.path)
        except OSError:
            return None
        return status.st_mtime_ns, status.st_ino, status.st_size

    def load(self) -> Tokens:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except OSError as error:
            raise TokenFileError(f"cannot read token file {self.path}: {error.strerror}") from None
        except ValueError:
            raise TokenFileError(f"token file {self.path} is not JSON") from None
        refresh = data.get("refresh_token") if isinstance(data, dict) else None
        if not isinstance(refresh, str) or not refresh:
            raise TokenFileError(f"token file {self.path} has no refresh_token")
        access = data.get("access_token")
        expires_at = data.get("expires_at")
        extras = {name: data[name] for name in _EXTRA_FIELDS if isinstance(data.get(name), str)}
        return Tokens(access if isinstance(access, str) else "", refresh,
                      float(expires_at) if isinstance(expires_at, (int, float)) else 0.0, **extras)

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    @contextlib.asynccontextmanager
    async def locked(self, wait: float) -> AsyncIterator[None]:
        """Held by one process at a time while it refreshes or replaces the tokens; TokenFileError
        when another holds it for longer than `wait` seconds. Polled, so the event loop keeps
        routing calls meanwhile; released by closing, so a killed holder releases it too."""
        descriptor = self._open_lock()
        try:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise TokenFileError(f"{self.lock_path} is held by another process for over {wait:g} s"
                                             " (a refresh that does not finish)") from None
                    await asyncio.sleep(_LOCK_POLL)
                except OSError as error:
                    raise TokenFileError(f"cannot lock {self.lock_path}: {error.strerror}") from None
            yield
        finally:
            os.close(descriptor)

    def _open_lock(self) -> int:
        # Never through a symlink (O_NOFOLLOW), never a FIFO or device (O_NONBLOCK, then S_ISREG):
        # whoever can plant one in the directory must not make us open something else.
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            descriptor = os.open(self.lock_path, flags, 0o600)
        except OSError as error:
            raise TokenFileError(f"cannot open the lock file {self.lock_path}: {error.strerror}") from None
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            os.close(descriptor)
            raise TokenFileError(f"the lock file {self.lock_path} is not a regular file")
        return descriptor

    def load_if_present(self) -> Tokens | None:
        try:
            return self.load()
        except TokenFileError:
            return None

    def save(self, tokens: Tokens) -> None:
        """Write a temporary file beside the real one, flush it to disk, rename it over."""
        fields = {"access_token": tokens.access_token, "refresh_token": tokens.refresh_token,
                  "expires_at": tokens.expires_at}
        fields.update({name: getattr(tokens, name) for name in _EXTRA_FIELDS if getattr(tokens, name)})
        text = json.dumps(fields, indent=2) + "\n"
        directory = self.path.parent
        descriptor, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=directory)
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as file:  # mkstemp: mode 0600
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
        # The rename itself is durable only once the directory is flushed.
        directory_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)
