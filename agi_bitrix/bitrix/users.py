"""The portal's users, loaded with user.get at start and refreshed in the background.

Two things need them: routing, to skip owners whose account is deactivated (the portal still
names fired employees as owners), and finish, to turn the extension or mobile that answered a
call into the Bitrix24 user who took it. A failed refresh keeps the last good snapshot; before
the first load nobody is known to be inactive, so routing works as if there were no directory.

Without a `users` section the directory is on whenever the credentials carry the `user` scope
(`automatic`): the OAuth token file's `scope` says so, else the portal's own `scope` method
(api-reference/common/scope.md: without parameters, the scopes of the current application or
webhook). A portal that cannot be asked leaves it unknown, said in /healthz and the log, and asked
again after RETRY_AFTER_FAILURE.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agi_bitrix import background
from agi_bitrix.bitrix.client import PortalClient
from agi_bitrix.bitrix.errors import BadResponse, BitrixError, NotPermitted, PortalMisconfigured
from agi_bitrix.bitrix.oauth import OAuthTokens
from agi_bitrix.phones import dialable_number, normalize_extension, normalize_number

log = logging.getLogger("agi_bitrix.users")

USER_GET = "user.get"
SCOPE = "scope"  # the scopes the credentials carry
USER_SCOPE = "user"
# What `automatic` found, for /healthz: whether deactivated owners are skipped.
SKIPPED, NOT_SKIPPED, UNKNOWN = "skipped", "not skipped", "unknown"
# user.get answers 50 users per page and takes the offset of the next page as `start`.
PAGE_SIZE = 50
# 500 pages are 25,000 users, far beyond any portal this serves; a portal that ignores `start`
# would otherwise keep us paging forever.
MAX_PAGES = 500
# After a failed load, try again sooner than the regular refresh, but not in a tight loop.
RETRY_AFTER_FAILURE = 30.0
# A page waits at most this long for a request slot; the client gives user.get only slots that
# leave half the burst to the lookups, so a directory of thousands pages along behind the calls.
PAGE_SLOT_WAIT = 5.0

# Channel names as Asterisk writes them: TECH/RESOURCE-SUFFIX or Local/EXTEN@CONTEXT-SUFFIX;N.
_CHANNEL_SUFFIX = re.compile(r"-[0-9a-f]{8}(;[12])?$")
# [TECH/][PEER/]NUMBER[@CONTEXT]: a channel, a dial string or Dial's DIALEDPEERNUMBER.
_ANSWERED_BY = re.compile(r"^(?:[A-Za-z0-9_.-]+/){0,2}(?P<number>\+?[0-9]{1,32})(?:@[A-Za-z0-9_.-]*)?$")


@dataclass(frozen=True)
class User:
    user_id: str
    active: bool
    extension: str = ""  # UF_PHONE_INNER, digits only; "" when missing or not a plain number
    mobile: str = ""  # PERSONAL_MOBILE in international digits, or ""


def parse_user(item: Any, default_country: str) -> User | None:
    """One user.get record, or None when it has no usable ID."""
    if not isinstance(item, Mapping):
        return None
    user_id = str(item.get("ID") or "").strip()
    if not (user_id.isascii() and user_id.isdigit()):  # isdigit() alone passes fullwidth digits
        return None
    active = item.get("ACTIVE")
    # JSON true/false from the REST API; "Y"/"N" from older portals and proxies.
    is_active = active if isinstance(active, bool) else str(active).strip().upper() in ("Y", "1", "TRUE")
    return User(
        user_id=user_id,
        active=is_active,
        extension=normalize_extension(_scalar(item.get("UF_PHONE_INNER"))) or "",
        # Only a number we could have dialled can be the one that answered.
        mobile=dialable_number(_scalar(item.get("PERSONAL_MOBILE")), default_country) or "",
    )


def _scalar(value: Any) -> str:
    return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else ""


def directory_health(users: UserDirectory | None) -> dict[str, Any]:
    """/healthz's `users`: whether deactivated owners are skipped, and why."""
    if users is None:
        return {"deactivated_owners": NOT_SKIPPED, "why": "users.refresh is 0: no user directory"}
    return {"deactivated_owners": users.skipping, "why": users.why, "users": users.size,
            "loaded": users.loaded_at is not None}


def answering_number(answered_by: str) -> str:
    """The number in what the dialplan reports as having answered, or "".

    "101", "101@internal" (Dial's DIALEDPEERNUMBER), "PJSIP/101-0000001a",
    "Local/79161110101@outbound-00000003;1" -> "101" / "79161110101".
    """
    match = _ANSWERED_BY.match(_CHANNEL_SUFFIX.sub("", answered_by.strip()))
    return match["number"] if match else ""


class UserDirectory:
    def __init__(self, portal: Callable[[], PortalClient], *, refresh: float, default_country: str,
                 clock: Callable[[], float] = time.monotonic, automatic: bool = False) -> None:
        """`portal` gives the portal client in use (a reload may replace it); the directory itself
        outlives reloads. `automatic`: no users section; loaded only while the credentials carry
        the user scope."""
        self.portal_source = portal
        self.refresh = refresh
        self.automatic = automatic
        # Whether deactivated owners are skipped, and why (for /healthz and `check`).
        self.skipping, self.why = (UNKNOWN, "not asked yet") if automatic else (SKIPPED, "users section")
        self.default_country = default_country
        self._clock = clock
        self._users: dict[str, User] = {}
        self._by_extension: dict[str, User] = {}
        self._by_mobile: dict[str, User] = {}
        self.loaded_at: float | None = None
        self._task: asyncio.Task[None] | None = None

    # -- what the calls ask ------------------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self._users)

    def inactive_among(self, user_ids: Iterable[str]) -> frozenset[str]:
        """Those of `user_ids` whose account is known to be deactivated."""
        return frozenset(uid for uid in user_ids if (user := self._users.get(uid)) is not None and not user.active)

    def by_extension(self, extension: str) -> User | None:
        """The active user whose extension (UF_PHONE_INNER) is `extension`; never a mobile."""
        number = normalize_extension(extension)
        return self._by_extension.get(number) if number else None

    def by_id(self, user_id: str) -> User | None:
        """The user with this id, active or not; None when unknown (or before the first load)."""
        return self._users.get(user_id)

    def by_number(self, number: str) -> User | None:
        """The active user whose extension, else whose mobile, is `number`."""
        extension = normalize_extension(number)
        user = self._by_extension.get(extension) if extension else None
        if user is None:
            mobile = normalize_number(number, self.default_country)
            user = self._by_mobile.get(mobile) if mobile else None
        return user

    # -- loading -----------------------------------------------------------------------------

    async def load(self) -> None:
        """Load every user; the snapshot changes only when the whole load succeeds."""
        users: dict[str, User] = {}
        # One pass without a filter: api-reference/user/user-get.md in bitrix24/b24restdocs says
        # the method returns all users (bots and the like aside) and that FILTER[ACTIVE]=true is
        # what *excludes* the terminated ones, so the plain list holds the deactivated too. Each
        # record's own ACTIVE decides.
        for item in await self._list():
            user = parse_user(item, self.default_country)
            if user is not None:
                users[user.user_id] = user
        self._install(users)

    async def _list(self) -> list[Any]:
        items: list[Any] = []
        seen: set[str] = set()
        for page in range(MAX_PAGES):
            result = await self.portal_source().call(USER_GET, {"start": page * PAGE_SIZE}, max_wait=PAGE_SLOT_WAIT)
            if not isinstance(result, list):
                raise BadResponse("bad_result", f"{USER_GET}: result is {type(result).__name__}, expected a list")
            fresh = [item for item in result if isinstance(item, Mapping) and str(item.get("ID")) not in seen]
            seen.update(str(item.get("ID")) for item in fresh)
            items.extend(fresh)
            if len(result) < PAGE_SIZE or not fresh:
                break
        return items

    def _install(self, users: dict[str, User]) -> None:
        active = [user for user in users.values() if user.active]
        self._users = users
        self._by_extension = {user.extension: user for user in active if user.extension}
        self._by_mobile = {user.mobile: user for user in active if user.mobile}
        self.loaded_at = self._clock()
        log.info("user directory: %d users, %d deactivated", len(users), len(users) - len(active))

    # -- background refresh ------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._refresh_forever(), name="user directory")

    async def close(self) -> None:
        await background.stop(self._task)
        self._task = None

    async def user_scope(self) -> bool | None:
        """Whether the credentials carry the user scope; None when that cannot be known now."""
        portal = self.portal_source()
        if isinstance(portal.auth, OAuthTokens):
            saved = portal.auth.token_file.load_if_present()
            scopes = saved.scope.replace(" ", ",").split(",") if saved is not None else []
            if any(scopes):
                return USER_SCOPE in scopes
        try:
            result = await portal.call(SCOPE, {}, max_wait=PAGE_SLOT_WAIT)
        except BitrixError as error:
            self._decide(UNKNOWN, f"the portal's scope method failed: {error.reason}")
            return None
        if not isinstance(result, list):
            self._decide(UNKNOWN, f"the portal's scope method answered {type(result).__name__}, not a list")
            return None
        return USER_SCOPE in result

    def _decide(self, skipping: str, why: str) -> None:
        if (skipping, why) != (self.skipping, self.why):  # logged once per change
            level = logging.INFO if skipping == SKIPPED else logging.WARNING
            log.log(level, "user directory: deactivated owners %s (%s)", skipping, why)
        self.skipping, self.why = skipping, why

    async def refresh_once(self) -> float:
        """One load (after the scope check, when automatic); the seconds until the next one."""
        if self.automatic:
            has_scope = await self.user_scope()
            if has_scope is None:
                return min(self.refresh, RETRY_AFTER_FAILURE)
            if not has_scope:
                self._decide(NOT_SKIPPED, "the credentials lack the user scope: a deactivated owner's calls"
                             " still go to their phones; add the scope, or set users.refresh: 0 to say so")
                return self.refresh
        try:
            await self.load()
        except BitrixError as error:
            self._log_failure(error)
            return min(self.refresh, RETRY_AFTER_FAILURE)
        if self.automatic:
            self._decide(SKIPPED, "the credentials carry the user scope")
        return self.refresh

    def _log_failure(self, error: BitrixError) -> None:
        hint = ""
        if isinstance(error, PortalMisconfigured):
            hint = f" ({error.advice})"
        elif isinstance(error, NotPermitted):
            hint = " (the webhook needs the 'user' scope, an application in its card)"
        log.warning("user directory not refreshed: %s%s; keeping %s; next try in %.0f s",
                    error, hint, "the last snapshot" if self.loaded_at is not None else "no users",
                    min(self.refresh, RETRY_AFTER_FAILURE))

    async def _refresh_forever(self) -> None:
        while True:
            wait = await self.refresh_once()
            await asyncio.sleep(wait)
