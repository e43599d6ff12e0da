"""Click-to-call as one running part: the AMI connection, the portal's events and the flow.

The pieces are built elsewhere and know nothing of each other: the AMI layer (agi_bitrix/ami/)
talks to Asterisk, the receiver or the offline poller (agi_bitrix/bitrix/event_*.py) hands on
only authentic events, and the flow (agi_bitrix/clicktocall.py) decides and dials through a
`Dialer`. This module joins them — an AMI-backed Dialer, the events' handler that starts the
flow — and gives the Application one thing to start, stop and ask for its health.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from agi_bitrix.ami.client import AmiClient, AmiObserver
from agi_bitrix.ami.errors import AmiError, OriginateOutcomeUnknown
from agi_bitrix.ami.originate import OriginateRequest, originate
from agi_bitrix.ami.settings import read_secret
from agi_bitrix.bitrix.client import PortalClient
from agi_bitrix.bitrix.event_gate import EventGate, MemorySeen, RedisSeen, SeenEvents, TokenFileIdentity
from agi_bitrix.bitrix.event_poller import OfflinePoller
from agi_bitrix.bitrix.event_receiver import EventReceiver
from agi_bitrix.bitrix.event_subscription import EventsStatus
from agi_bitrix.bitrix.events import HANDLER, OFFLINE, CallbackStart, Event, EventObserver, ExternalCallStart
from agi_bitrix.bitrix.models import CrmAnswer
from agi_bitrix.bitrix.shared import RedisLink
from agi_bitrix.bitrix.users import UserDirectory
from agi_bitrix.callback import Callback, CallbackRequest
from agi_bitrix.callcard.holders import CardHolders
from agi_bitrix.callcard.register import RegisterService
from agi_bitrix.clicktocall import (
    ClickToCall,
    ClickToCallEvent,
    CrmNames,
    Dialer,
    DialerError,
    FinishQueue,
    OriginateOutcome,
    UserLookup,
)
from agi_bitrix.config import Config
from agi_bitrix.service import Router

log = logging.getLogger("agi_bitrix.clicktocall")

# Clicks being placed at once (each holds a task until its agent's phone answers or gives up);
# past it a click is finished at once as the server being busy, never queued without bound.
MAX_CLICKS_IN_FLIGHT = 200
# How often /healthz's events.subscribed is asked again (event.get, a request that can wait): the
# portal drops our bindings when the application is updated or removed (event-bind.md), and the
# admin installs the application and runs `events bind` while the server runs (its install callback
# takes the install), so an answer from the start alone would stay wrong until a restart.
STATUS_REFRESH = 300.0
STATUS_RETRY = 10.0  # while not subscribed, or the portal could not tell


class AmiDialer:
    """The flow's Dialer over an AmiClient: one Async Originate, its OriginateResponse's Reason."""

    def __init__(self, client: AmiClient) -> None:
        self.client = client

    async def originate(self, channel: str, context: str, exten: str, variables: Mapping[str, str],
                        caller_id: str, timeout: float) -> OriginateOutcome:
        request = OriginateRequest(channel, context=context, exten=exten, timeout=timeout, caller_id=caller_id,
                                   variables=dict(variables))
        try:
            result = await originate(self.client, request)
        except OriginateOutcomeUnknown as error:
            # Sent, and the connection lost before the answer: the phone may ring, so the click is
            # finished as failed and never sent again (a second Originate would ring it twice).
            raise DialerError(f"the connection to AMI was lost after the Originate was sent ({error})") from error
        except AmiError as error:
            raise DialerError(f"{type(error).__name__}: {error}") from error
        return OriginateOutcome(result.reason)


class CurrentLookup:
    """The client's name for the agent's display, from the CRM lookup of the config in force (the
    same cache, breaker and request budget as incoming calls)."""

    def __init__(self, current: Callable[[], CrmNames]) -> None:
        self._current = current

    async def lookup(self, phone: str) -> CrmAnswer:
        return await self._current().lookup(phone)


class PortalRegistrar:
    """The callback's register through RegisterService, with the portal of the config in force."""

    def __init__(self, config: Config, current_portal: Callable[[], PortalClient]) -> None:
        self.config = config
        self._current_portal = current_portal
        self._holders = CardHolders()

    async def send_register(self, params: dict[str, Any], uniqueid: str, *, show: bool,
                            crm_create: bool) -> tuple[str, str]:
        register = RegisterService(self.config, self._current_portal(), self._holders)
        return await register.send_register(params, uniqueid, show=show, crm_create=crm_create)


class ClickToCallService:
    """AMI (with an `ami` section), the events (with `events.mode` not off) and the flow (with a
    `clicktocall` section), as one part of the Application."""

    def __init__(self, config: Config, *, current_portal: Callable[[], PortalClient], users: UserLookup | None,
                 outbox: FinishQueue | None, names: CrmNames | None, link: RedisLink | None,
                 ami_observer: AmiObserver | None = None, event_observer: EventObserver | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        self.ami = (AmiClient(config.ami, functools.partial(read_secret, config.ami, environ), observer=ami_observer)
                    if config.ami is not None else None)
        self.flow: ClickToCall | None = None
        if config.clicktocall.enabled and users is not None and outbox is not None:
            dialer: Dialer = AmiDialer(self.ami) if self.ami is not None else _NoAmi()
            self.flow = ClickToCall(config.clicktocall, default_country=config.policy.default_country,
                                    prefix=config.variable_prefix, dialer=dialer, users=users, outbox=outbox,
                                    names=names)
        self.callback = self._callback_flow(config, current_portal, users, outbox, names)
        self._clicks: set[asyncio.Task[str]] = set()
        self.callbacks_ignored = 0
        self._current_portal = current_portal
        self.receiver: EventReceiver | None = None
        self.poller: OfflinePoller | None = None
        self.status: EventsStatus | None = None
        events, oauth = config.events, config.bitrix.oauth
        if events.mode == "off" or oauth is None:
            return
        seen: SeenEvents = (RedisSeen(link, events.replay_window) if link is not None
                            else MemorySeen(events.replay_window))
        gate = EventGate(TokenFileIdentity(oauth.token_file, oauth.portal_url), seen,
                         country=config.policy.default_country, replay_window=events.replay_window,
                         observer=event_observer)
        part: EventReceiver | OfflinePoller
        if events.mode == HANDLER:
            part = self.receiver = EventReceiver(gate, self.take, events.handler_path)
        else:
            part = self.poller = OfflinePoller(current_portal, gate, self.take, interval=events.poll_interval)
        self.status = EventsStatus(events.mode, events.public_url, gate, part)

    def _callback_flow(self, config: Config, current_portal: Callable[[], PortalClient], users: UserLookup | None,
                       outbox: FinishQueue | None, names: CrmNames | None) -> Callback | None:
        """The callback requests' flow (with a `callback` section): routed like an incoming call
        by the same Router, each attempt's report heard on the AMI connection."""
        if not config.callback.enabled or outbox is None or names is None:
            return None
        dialer: Dialer = AmiDialer(self.ami) if self.ami is not None else _NoAmi()
        directory = users if isinstance(users, UserDirectory) else None
        router = Router(config, names, users=directory)
        flow = Callback(config, dialer=dialer, routes=router, registrar=PortalRegistrar(config, current_portal),
                        outbox=outbox, users=directory)
        if self.ami is not None:
            self.ami.add_listener(flow.on_ami_event)
        return flow

    def add_routes(self, app: web.Application) -> None:
        """Handler mode's POST route, on the HTTP listener beside the admin page."""
        if self.receiver is not None:
            self.receiver.add_routes(app)

    async def take(self, event: Event) -> None:
        """The events' handler: returns once the click is the flow's (the offline poller confirms
        the record then), not when the call ends; the flow finishes every click it does not place."""
        if isinstance(event, CallbackStart):
            await self._take_callback(event)
            return
        assert isinstance(event, ExternalCallStart)
        if self.flow is None:
            log.error("click-to-call event %s for user %s: no clicktocall section, so nothing dials it",
                      event.call_id, event.user_id)
            return
        click = ClickToCallEvent(event.call_id, event.user_id, event.phone, event.crm_entity_type,
                                 event.crm_entity_id, event.line_number)
        if len(self._clicks) >= MAX_CLICKS_IN_FLIGHT:
            await self.flow.refuse_busy(click)
            return
        task = asyncio.create_task(self.flow.handle(click))
        self._clicks.add(task)
        task.add_done_callback(self._click_done)

    async def _take_callback(self, event: CallbackStart) -> None:
        if self.callback is None:
            self.callbacks_ignored += 1
            log.error("callback request from the CRM for %s: no callback section, so nobody calls back",
                      event.phone[:40])
            return
        request = CallbackRequest(event.phone, event.text, event.line_number, event.crm_entity_type,
                                  event.crm_entity_id, event.key)
        if len(self._clicks) >= MAX_CLICKS_IN_FLIGHT:
            self.callbacks_ignored += 1
            log.error("callback request for %s: %d clicks and callbacks are in flight on this server; not called"
                      " back", event.phone[:40], len(self._clicks))
            return
        # Attempts and their intervals take minutes: the same bounded set of tasks as clicks.
        task = asyncio.create_task(self.callback.handle(request))
        self._clicks.add(task)
        task.add_done_callback(self._click_done)

    def _click_done(self, task: asyncio.Task[str]) -> None:
        self._clicks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("click-to-call: a click failed unexpectedly", exc_info=task.exception())

    async def start(self) -> None:
        if self.ami is not None:
            self.ami.start()
        if self.poller is not None:
            self.poller.start()
        if self.status is not None:
            # Whether the portal has our bindings, asked again and again; requests that can wait, in
            # the background.
            self._status_task = asyncio.create_task(self._refresh_status())

    async def _refresh_status(self) -> None:
        assert self.status is not None
        failed_before = False
        while True:
            try:
                await self.status.refresh(self._current_portal())
                failed_before = False
            except Exception:  # a bug: /healthz says unknown, the log says why (once, not every retry)
                if not failed_before:
                    log.exception("click-to-call events: asking event.get failed unexpectedly")
                failed_before = True
            await asyncio.sleep(STATUS_REFRESH if self.status.subscribed else STATUS_RETRY)

    async def close(self) -> None:
        if self.receiver is not None:
            await self.receiver.close()
        if self.poller is not None:
            await self.poller.close()
        for task in list(self._clicks):
            task.cancel()
        await asyncio.gather(*self._clicks, return_exceptions=True)
        status_task = getattr(self, "_status_task", None)
        if status_task is not None:
            status_task.cancel()
            await asyncio.gather(status_task, return_exceptions=True)
        if self.ami is not None:
            await self.ami.stop()

    def health(self) -> dict[str, Any]:
        """For /healthz: shown, not in the status (incoming calls are routed without any of it)."""
        return {
            "ami": {"state": "off"} if self.ami is None else self.ami.health(),
            "events": {"mode": "off"} if self.status is None else self.status.health(),
            "clicktocall": ({"state": "off"} if self.flow is None else
                            {"state": "on", "in_flight": len(self._clicks), "outcomes": dict(self.flow.outcomes),
                             "callbacks_ignored": self.callbacks_ignored}),
            "callback": ({"state": "off", "ignored": self.callbacks_ignored} if self.callback is None else
                         {"state": "on", "outcomes": dict(self.callback.outcomes), "ignored": self.callbacks_ignored}),
        }


class _NoAmi:
    """A clicktocall section without an ami section: `check` refuses it; this only keeps a click
    from waiting on nothing if it happens anyway."""

    async def originate(self, channel: str, context: str, exten: str, variables: Mapping[str, str],
                        caller_id: str, timeout: float) -> OriginateOutcome:
        raise DialerError("no ami section: the server has no connection to Asterisk's manager")


__all__ = ["OFFLINE", "AmiDialer", "ClickToCallService", "CurrentLookup"]
