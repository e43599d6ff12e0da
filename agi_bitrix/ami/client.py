"""One AMI connection kept up by itself: login, actions with a timeout, events to listeners.

The bytes are read and framed by agi_bitrix.ami.protocol; this module only moves them. What it
promises (docs/ami.md says why panoramisk's Manager did not):
- An action waits at most its timeout. When the connection ends, every waiting action fails at
  once (ConnectionLost) and is never sent again by itself: an Originate sent twice rings twice.
- The connection is made again by itself, waiting `reconnect.first` doubled up to `reconnect.max`
  between tries; a refused login is retried the same way, and `health()` says why it is down.
- Events go to listeners through a bounded queue: in a flood the newest are dropped and counted.
  An event that answers an action we wait for (OriginateResponse) bypasses the queue.
- The secret is read on each login and never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from agi_bitrix import background
from agi_bitrix.ami.errors import (
    ActionFailed,
    ActionTimeout,
    AmiError,
    AmiUnavailable,
    ConnectionLost,
    LoginRefused,
    OriginateOutcomeUnknown,
)
from agi_bitrix.ami.protocol import NEED_DATA, AmiConnection, Banner, EndOfStream, Event, Response, serialize_action
from agi_bitrix.ami.settings import AmiSettings

log = logging.getLogger("agi_bitrix.ami")

EventListener = Callable[[Event], None]
_READ_CHUNK = 64 * 1024


class AmiObserver(Protocol):
    """Where the client reports what metrics count (agi_bitrix.monitoring.Metrics implements it)."""

    def ami_up(self, up: bool) -> None:
        """The connection is logged in (True) or not (False); called on each change."""

    def ami_reconnected(self) -> None:
        """Logged in again after the connection had been up before."""

    def ami_events_dropped(self, count: int) -> None:
        """`count` events were dropped because the listeners' queue was full."""


class _NoObserver:
    def ami_up(self, up: bool) -> None:
        pass

    def ami_reconnected(self) -> None:
        pass

    def ami_events_dropped(self, count: int) -> None:
        pass


class AmiClient:
    def __init__(self, settings: AmiSettings, secret: Callable[[], str], *,
                 observer: AmiObserver | None = None) -> None:
        """`secret` returns the secret (agi_bitrix.ami.settings.read_secret); called on each login."""
        self.settings = settings
        self._secret = secret
        self._observer = observer or _NoObserver()
        self._listeners: list[EventListener] = []
        self._events: asyncio.Queue[Event] = asyncio.Queue(maxsize=settings.event_queue)
        self._answers: dict[str, asyncio.Future[Response]] = {}
        self._awaited: dict[str, asyncio.Future[Event]] = {}  # ActionID -> the event that ends the action
        self._writer: asyncio.StreamWriter | None = None
        self._ids = itertools.count(1)
        # ActionIDs unique across processes and restarts: another client's answers are never ours.
        self._id_prefix = f"agi-bitrix-{os.getpid()}-{secrets.token_hex(4)}-"
        self._up = False
        self._became_up = asyncio.Event()
        self._reason = "not started"
        self._changed_at = time.time()
        self._logins = 0
        self._reconnects = 0
        self._dropped = 0
        self._version = ""
        self._tasks: list[asyncio.Task[None]] = []

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Starts connecting (and reconnecting) in the background; returns at once."""
        if not self._tasks:
            self._set_down("connecting")
            self._tasks = [asyncio.create_task(self._keep_connected(), name="ami-connection"),
                           asyncio.create_task(self._deliver_events(), name="ami-events")]

    async def stop(self) -> None:
        for task in self._tasks:
            await background.stop(task)
        self._tasks = []
        self._close_writer()
        self._fail_waiting(AmiUnavailable("the AMI client stopped"))
        self._set_down("stopped")

    @property
    def up(self) -> bool:
        return self._up

    async def wait_up(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._became_up.wait(), timeout)
        return self._up

    def health(self) -> dict[str, object]:
        """For /healthz: whether AMI is usable, and if not, why (never the secret)."""
        return {"up": self._up, "reason": "" if self._up else self._reason, "since": round(self._changed_at, 3),
                "server": f"{self.settings.host}:{self.settings.port}", "username": self.settings.username,
                "ami_version": self._version, "reconnects": self._reconnects, "dropped_events": self._dropped,
                "waiting_actions": len(self._answers) + len(self._awaited)}

    def add_listener(self, listener: EventListener) -> Callable[[], None]:
        """`listener` gets every event no action waits for; returns the function that removes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    # -- actions -----------------------------------------------------------------------------

    async def send(self, action: str, fields: Iterable[tuple[str, str]] = (), *,
                   timeout: float | None = None) -> Response:
        """Sends one action and returns its answer. AmiUnavailable when not logged in (nothing is
        sent), UnsafeAction for a field that could inject AMI, ActionFailed for `Response: Error`,
        ActionTimeout, ConnectionLost."""
        if not self._up:
            raise AmiUnavailable(f"AMI is down: {self._reason}")
        response = await self._request(action, fields, self._timeout(timeout))
        if response.status.lower() == "error":
            raise ActionFailed(f"{action}: {response.message or 'error'}")
        return response

    async def send_awaiting(self, action: str, fields: Iterable[tuple[str, str]], *,
                            timeout: float) -> tuple[Response, Event]:
        """An action whose outcome comes later as an event with the same ActionID (an Async
        Originate's OriginateResponse): its answer, then that event within `timeout` of the answer.
        After the answer, a lost connection raises OriginateOutcomeUnknown: Asterisk may go on."""
        if not self._up:
            raise AmiUnavailable(f"AMI is down: {self._reason}")
        action_id = self._next_id()
        outcome: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._awaited[action_id] = outcome  # before sending: the event may follow the answer at once
        try:
            try:
                response = await self._request(action, fields, self.settings.action_timeout, action_id)
            except ConnectionLost as error:  # sent, maybe read and queued: Asterisk may go on
                raise OriginateOutcomeUnknown(f"{error}; Asterisk may have queued {action}") from None
            if response.status.lower() == "error":
                raise ActionFailed(f"{action}: {response.message or 'error'}")
            try:
                return response, await asyncio.wait_for(outcome, timeout)
            except TimeoutError:
                raise ActionTimeout(f"no outcome of {action} within {timeout:g} s") from None
        finally:
            self._awaited.pop(action_id, None)
            if outcome.done() and not outcome.cancelled():
                outcome.exception()  # failed with the connection before we awaited it: seen, not "never retrieved"

    async def _request(self, action: str, fields: Iterable[tuple[str, str]], timeout: float,
                       action_id: str | None = None) -> Response:
        action_id = action_id or self._next_id()
        data = serialize_action(action, action_id, fields)  # UnsafeAction before anything is sent
        writer = self._writer
        if writer is None:
            raise AmiUnavailable(f"AMI is down: {self._reason}")
        answer: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._answers[action_id] = answer
        try:
            async with asyncio.timeout(timeout):
                writer.write(data)
                await writer.drain()
                return await answer
        except TimeoutError:
            raise ActionTimeout(f"no answer to {action} within {timeout:g} s") from None
        except (ConnectionError, OSError) as error:  # drain() on a connection that just broke
            raise ConnectionLost(f"the AMI connection broke while sending {action}: {error}") from None
        finally:
            self._answers.pop(action_id, None)

    def _timeout(self, timeout: float | None) -> float:
        return self.settings.action_timeout if timeout is None else timeout

    def _next_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids)}"

    # -- the connection ----------------------------------------------------------------------

    async def _keep_connected(self) -> None:
        delay = self.settings.reconnect_first
        while True:
            logins = self._logins
            try:
                await self._session()
            except AmiError as error:
                reason = str(error)
            except OSError as error:
                reason = (f"cannot connect to {self.settings.host}:{self.settings.port}:"
                          f" {error.strerror or error.__class__.__name__}")
            except TimeoutError:
                reason = f"no answer from {self.settings.host}:{self.settings.port} within the connect timeout"
            self._close_writer()
            self._lost()
            self._set_down(reason)
            if self._logins > logins:  # it was up: a new failure starts from the first delay
                delay = self.settings.reconnect_first
            # Jitter keeps several servers from hammering a restarted Asterisk in step.
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self.settings.reconnect_max)

    async def _session(self) -> None:
        """One connection: banner, login, then reading and pinging until it ends (by an exception)."""
        settings = self.settings
        reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(settings.host, settings.port, limit=_READ_CHUNK), settings.connect_timeout)
        connection = AmiConnection()
        try:
            banner = await asyncio.wait_for(self._banner(reader, connection), settings.connect_timeout)
        except TimeoutError:
            raise AmiUnavailable(f"no AMI banner from {settings.host}:{settings.port}"
                                 f" within {settings.connect_timeout:g} s") from None
        self._version = banner.version
        reading = asyncio.create_task(self._read(reader, connection), name="ami-reader")
        # The moment the reading ends, whatever waits for an answer fails (the login included).
        reading.add_done_callback(lambda _: self._lost())
        pinging: asyncio.Task[None] | None = None
        try:
            await self._login()
            self._set_up()
            pinging = asyncio.create_task(self._ping(), name="ami-ping")
            done, _ = await asyncio.wait({reading, pinging}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises why the session ended
            raise ConnectionLost("the AMI connection ended")
        finally:
            await background.stop(pinging)
            if not reading.done():
                await background.stop(reading)
            elif not reading.cancelled():
                reading.exception()  # seen (it may have been why the login failed), not "never retrieved"

    async def _banner(self, reader: asyncio.StreamReader, connection: AmiConnection) -> Banner:
        while True:
            message = connection.next_event()
            if message is NEED_DATA:
                connection.receive_data(await reader.read(_READ_CHUNK))
            elif isinstance(message, Banner):
                return message

    async def _login(self) -> None:
        username = self.settings.username
        secret = self._secret()  # SecretUnavailable keeps the client down and says why
        try:
            response = await self._request("Login", [("Username", username), ("Secret", secret), ("Events", "on")],
                                           self.settings.connect_timeout)
        except ActionTimeout:
            raise AmiUnavailable(f"no answer to the Login within {self.settings.connect_timeout:g} s") from None
        if response.status.lower() != "success":
            raise LoginRefused(f"Asterisk refused the login of AMI user {username!r}:"
                               f" {response.message or response.status} (check ami.username, the secret,"
                               " and the user's permit/deny in manager.conf)")

    async def _read(self, reader: asyncio.StreamReader, connection: AmiConnection) -> None:
        while True:
            message = connection.next_event()  # ProtocolViolation ends the session
            if message is NEED_DATA:
                connection.receive_data(await reader.read(_READ_CHUNK))
            elif isinstance(message, EndOfStream):
                raise ConnectionLost(f"Asterisk at {self.settings.host}:{self.settings.port} closed the connection")
            elif isinstance(message, Response):
                answer = self._answers.get(message.action_id)
                if answer is not None and not answer.done():
                    answer.set_result(message)
            elif isinstance(message, Event):
                self._take_event(message)

    def _take_event(self, event: Event) -> None:
        awaited = self._awaited.get(event.action_id) if event.action_id else None
        if awaited is not None:
            if not awaited.done():
                awaited.set_result(event)
            return
        if not self._listeners:
            return
        try:
            self._events.put_nowait(event)
        except asyncio.QueueFull:
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                log.warning("AMI events dropped: the listeners are behind (%d dropped so far)", self._dropped)
            self._observer.ami_events_dropped(1)

    async def _ping(self) -> None:
        """A connection that stops answering is found within ping_interval + action_timeout."""
        while True:
            await asyncio.sleep(self.settings.ping_interval)
            try:
                await self._request("Ping", (), self.settings.action_timeout)
            except ActionTimeout:
                raise AmiUnavailable(f"no answer to a Ping within {self.settings.action_timeout:g} s") from None

    async def _deliver_events(self) -> None:
        while True:
            event = await self._events.get()
            for listener in list(self._listeners):
                try:
                    listener(event)
                except Exception:  # one broken listener must not stop the others
                    log.exception("an AMI event listener failed on %s", event.name)

    # -- state -------------------------------------------------------------------------------

    def _set_up(self) -> None:
        if self._logins:
            self._reconnects += 1
            self._observer.ami_reconnected()
        self._logins += 1
        self._up, self._reason, self._changed_at = True, "", time.time()
        self._became_up.set()
        self._observer.ami_up(True)
        log.info("AMI up: logged in to %s:%s as %s (AMI %s)", self.settings.host, self.settings.port,
                 self.settings.username, self._version)

    def _lost(self) -> None:
        """The connection ended: down at once, and whatever waits fails now (the reason follows)."""
        if self._up:
            self._up, self._reason = False, "the connection was lost"
            self._became_up.clear()
            self._observer.ami_up(False)
        self._fail_waiting(None)

    def _set_down(self, reason: str) -> None:
        if self._up:
            self._observer.ami_up(False)
        if reason != self._reason:
            self._changed_at = time.time()
            # Once per change: a refused login retried every 30 s logs once, not every 30 s.
            if reason not in ("connecting", "not started", "stopped"):
                log.warning("AMI down: %s", reason)
        self._up, self._reason = False, reason
        self._became_up.clear()

    def _fail_waiting(self, error: AmiError | None) -> None:
        """Every action waiting for an answer or an outcome fails now, not at its timeout."""
        for answer in self._answers.values():
            if not answer.done():
                answer.set_exception(error or ConnectionLost("the AMI connection was lost before the answer"))
        for outcome in self._awaited.values():
            if not outcome.done():
                outcome.set_exception(error or OriginateOutcomeUnknown(
                    "the AMI connection was lost after Asterisk queued the action and before its outcome"))

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
