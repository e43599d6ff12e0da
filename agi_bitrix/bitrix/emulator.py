"""An in-process Bitrix24 portal, faithful where this project depends on the portal's behaviour.

It serves inbound-webhook URLs (/rest/USER_ID/CODE/METHOD[.json]) over real HTTP so the real
client, timeouts and connection handling are exercised, and it answers the way the REST
documentation and the portal's code say the portal does: numbers as JSON numbers, string user
ids, `{"result", "time"}` on success, `{"error", "error_description"}` with the portal's HTTP
statuses on failure, method names in any case, parameters from the query string, a form or a
JSON body.

Tests and the demo steer it in-process: `set_client` edits the CRM, `fail` injects faults (a
slow or hung portal, a proxy's HTML page, garbage, a dropped connection) and `requests` records
what the portal was asked. Only the methods this project calls are implemented.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import re
import secrets
import socket
import struct
import time
from urllib.parse import parse_qsl
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from http import HTTPStatus
from typing import Any

from aiohttp import web

SEARCH_METHOD = "telephony.externalcall.searchcrmentities"
REGISTER_METHOD = "telephony.externalcall.register"
FINISH_METHOD = "telephony.externalcall.finish"
USER_GET_METHOD = "user.get"
BATCH_METHOD = "batch"
MAX_BATCH_COMMANDS = 50

# The portal merges a repeated register with the same call data into the call still open.
REGISTER_MERGE_WINDOW = 30 * 60.0

# The portal's defaults for ordinary plans: drain 2 requests/s, refuse at 50 waiting.
PORTAL_RATE_LIMIT = (2.0, 50)

_FAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "slow": {"delay": 1.0},
    "hang": {},
    "error": {"status": 500, "code": "INTERNAL_SERVER_ERROR", "description": "Internal server error"},
    "html": {"status": 502},
    "bad_json": {"body": b'{"result":[{"CRM_ENTITY_TYPE":"CONTA'},
    # PHP turns an array used as a string into "Array": a believable broken result.
    "malformed": {"result": "Array"},
    "disconnect": {"reset": False},
}
FAULT_KINDS = tuple(_FAULT_OPTIONS)

_NGINX_PAGE = (
    "<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n"
    "<center><h1>{status} {reason}</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)


def normalise_phone(raw: Any) -> str:
    """Digits as the portal compares them: 8XXXXXXXXXX becomes 7XXXXXXXXXX, nothing else changes.

    A 10-digit national number stays 10 digits and so does not match a stored 7XXXXXXXXXX,
    exactly like the portal.
    """
    digits = re.sub(r"\D", "", "" if raw is None else str(raw))
    if len(digits) == 11 and digits.startswith("8"):
        return "7" + digits[1:]
    return digits


def canonical_method(name: str) -> str:
    name = name.lower()
    return name[: -len(".json")] if name.endswith(".json") else name


@dataclass(frozen=True)
class RecordedRequest:
    method: str  # lower-case, without ".json"
    params: dict[str, Any]
    at: float  # time.monotonic() on arrival
    http_method: str


@dataclass
class RegisteredCall:
    call_id: str
    user_id: str
    params: dict[str, Any]  # as sent to register
    crm_entity_type: str | None
    crm_entity_id: int | None
    registered_at: float  # time.monotonic(); tests may move it back to leave the merge window
    finish_params: dict[str, Any] | None = None


@dataclass
class _Fault:
    kind: str
    phone: str | None
    method: str | None
    remaining: int | None
    options: dict[str, Any]

    def matches(self, method: str, params: Mapping[str, Any]) -> bool:
        if self.method is not None and self.method != method:
            return False
        return self.phone is None or normalise_phone(params.get("PHONE_NUMBER")) == self.phone


class _PortalError(Exception):
    """An error answer, raised from a method to be sent as the portal would."""

    def __init__(self, status: int, code: str, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.code = code
        self.description = description


class _LeakyBucket:
    """The portal's request limiter: each request adds one, the bucket drains at `rate` per second."""

    def __init__(self, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate limit needs rate > 0 and burst >= 1, got {rate}, {burst}")
        self.rate = rate
        self.burst = burst
        self._level = 0.0
        self._updated = time.monotonic()

    def admit(self) -> bool:
        now = time.monotonic()
        self._level = max(0.0, self._level - (now - self._updated) * self.rate)
        self._updated = now
        if self._level + 1 > self.burst:
            return False
        self._level += 1
        return True


class PortalEmulator:
    def __init__(
        self,
        crm: Mapping[str, list[dict]] | None = None,
        *,
        users: Mapping[str, dict] | None = None,
        user_id: str = "1",
        code: str = "emulator-secret",
        rate_limit: tuple[float, int] | None = None,
    ) -> None:
        """`crm` maps a phone to the raw searchCrmEntities answer; `users` adds user.get-only
        fields (NAME, LAST_NAME, ACTIVE) to the owners found in `crm`, keyed by user id."""
        self.user_id = user_id
        self.code = code
        self.requests: list[RecordedRequest] = []
        self.calls: dict[str, RegisteredCall] = {}
        self._crm: dict[str, list[dict]] = {}
        self._user_extras = {str(key): dict(value) for key, value in (users or {}).items()}
        self._users: dict[str, dict[str, Any]] = {}
        self._faults: list[_Fault] = []
        self._bucket = _LeakyBucket(*rate_limit) if rate_limit else None
        # Set to let hung and slow requests go on; replaced by a fresh one on each reset.
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._lead_ids = itertools.count(1000)
        self.webhook_url = ""
        for phone, entities in (crm or {}).items():
            self.set_client(phone, entities)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application()
        app.router.add_route("*", "/rest/{user_id}/{code}/{method}", self._handle)
        # Hung requests are released on stop, so a short shutdown grace is enough.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        self.webhook_url = f"http://{bound_host}:{bound_port}/rest/{self.user_id}/{self.code}/"
        return self.webhook_url

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> PortalEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- steering ---------------------------------------------------------------------------

    def set_client(self, phone: str, entities: list[dict]) -> None:
        """Make `phone` answer with `entities`, raw portal-shaped objects sent as they are."""
        self._crm[normalise_phone(phone)] = list(entities)
        for entity in entities:
            owner = entity.get("ASSIGNED_BY") if isinstance(entity, dict) else None
            if isinstance(owner, dict) and owner.get("ID") is not None:
                self._users[str(owner["ID"])] = dict(owner)

    def fail(
        self,
        kind: str,
        *,
        phone: str | None = None,
        method: str | None = None,
        times: int | None = None,
        **options: Any,
    ) -> None:
        """Inject a fault for requests about `phone` (any request when None) and `method` (any
        when None), for the next `times` such requests (until reset when None). Faults apply
        in the order they were added.

        slow(delay=s): answer normally after a delay. hang: no answer until reset or stop.
        error(status=, code=, description=): an error body; code may be "". html(status=502):
        a proxy's HTML page. bad_json(body=bytes): a 200 whose body is not the portal's JSON
        (default: cut short). malformed(result=): a 200 whose result is not a list of objects.
        disconnect(reset=False): close without answering; reset=True sends a TCP reset.
        """
        if kind not in _FAULT_OPTIONS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {', '.join(FAULT_KINDS)}")
        unknown = set(options) - set(_FAULT_OPTIONS[kind])
        if unknown:
            raise TypeError(f"fault {kind!r} takes no option(s) {', '.join(sorted(unknown))}")
        if times is not None and times < 1:
            raise ValueError(f"times must be at least 1, got {times}")
        self._faults.append(
            _Fault(
                kind=kind,
                phone=None if phone is None else normalise_phone(phone),
                method=None if method is None else canonical_method(method),
                remaining=times,
                options={**_FAULT_OPTIONS[kind], **options},
            )
        )

    def reset_faults(self) -> None:
        self._faults.clear()
        self._release.set()
        self._release = asyncio.Event()

    def requests_for(self, method: str) -> list[RecordedRequest]:
        wanted = canonical_method(method)
        return [request for request in self.requests if request.method == wanted]

    # -- HTTP -------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        started = time.time()
        method = canonical_method(request.match_info["method"])
        try:
            params = await _read_params(request)
        except _PortalError as error:
            return _error_response(error)
        self.requests.append(RecordedRequest(method, params, time.monotonic(), request.method))

        fault = self._take_fault(method, params)
        if fault is not None:
            response = await self._apply_fault(fault, request)
            if response is not None:
                return response
        try:
            body = self._answer(request, method, params)
        except _PortalError as error:
            return _error_response(error)
        finished = time.time()
        body["time"] = _time_block(started, finished)
        return _json_response(200, body)

    def _answer(self, request: web.Request, method: str, params: dict[str, Any]) -> dict[str, Any]:
        if request.match_info["user_id"] != self.user_id or request.match_info["code"] != self.code:
            raise _PortalError(401, "INVALID_CREDENTIALS", "Invalid request credentials")
        if self._bucket is not None and not self._bucket.admit():
            raise _PortalError(503, "QUERY_LIMIT_EXCEEDED", "Too many requests")
        if method == BATCH_METHOD:
            return self._batch(params)
        return self._method(method)(params)

    def _method(self, method: str):
        """The handler of a method the emulator knows, for a direct call or a batch command."""
        handler = {
            SEARCH_METHOD: self._search,
            REGISTER_METHOD: self._register,
            FINISH_METHOD: self._finish,
            USER_GET_METHOD: self._user_get,
        }.get(method)
        if handler is None:
            raise _PortalError(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
        return handler

    def _take_fault(self, method: str, params: Mapping[str, Any]) -> _Fault | None:
        for fault in self._faults:
            if fault.matches(method, params):
                if fault.remaining is not None:
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                return fault
        return None

    async def _apply_fault(self, fault: _Fault, request: web.Request) -> web.StreamResponse | None:
        """The faulty answer, or None when the request should then be answered normally."""
        options = fault.options
        if fault.kind in ("slow", "hang"):
            release = self._release
            timeout = options["delay"] if fault.kind == "slow" else None
            try:
                await asyncio.wait_for(release.wait(), timeout)
            except asyncio.TimeoutError:
                pass
            return None
        if fault.kind == "error":
            return _error_response(_PortalError(options["status"], options["code"], options["description"]))
        if fault.kind == "html":
            status = options["status"]
            page = _NGINX_PAGE.format(status=status, reason=_reason(status))
            return web.Response(status=status, text=page, content_type="text/html")
        if fault.kind == "bad_json":
            return web.Response(status=200, body=options["body"], content_type="application/json")
        if fault.kind == "malformed":
            now = time.time()
            return _json_response(200, {"result": options["result"], "time": _time_block(now, now)})
        # disconnect: drop the connection; aiohttp then quietly skips writing the response.
        transport = request.transport
        assert transport is not None
        if options["reset"]:
            # Zero linger turns close() into a TCP RST, like a crashed or firewalled peer.
            transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        transport.close()
        return web.Response(status=200)

    # -- methods ----------------------------------------------------------------------------

    def _batch(self, params: dict[str, Any]) -> dict[str, Any]:
        """Up to 50 calls in one request, as the portal runs them: each command is
        "method?query"; answers and errors come back under the command's key. An `error`
        fault aimed at one number fails only that command, as the portal would."""
        commands = params.get("cmd")
        if not isinstance(commands, dict) or not commands:
            raise _PortalError(400, "INVALID_REQUEST", "Batch cmd is empty")
        if len(commands) > MAX_BATCH_COMMANDS:
            raise _PortalError(400, "ERROR_BATCH_LENGTH_EXCEEDED", "Max batch length exceeded")
        results: dict[str, Any] = {}
        errors: dict[str, Any] = {}
        for key, command in commands.items():
            name, _, query = str(command).partition("?")
            method = canonical_method(name)
            command_params = _php_params(parse_qsl(query, keep_blank_values=True))
            fault = self._take_fault(method, command_params)
            try:
                if fault is not None and fault.kind == "error":
                    options = fault.options
                    raise _PortalError(options["status"], options["code"], options["description"])
                results[key] = self._method(method)(command_params)["result"]
            except _PortalError as error:
                errors[key] = {"error": error.code, "error_description": error.description}
        # PHP sends an empty array, not an empty object, for "no errors".
        return {"result": {"result": results, "result_error": errors or [], "result_total": [],
                           "result_next": [], "result_time": []}}

    def _search(self, params: dict[str, Any]) -> dict[str, Any]:
        phone = params.get("PHONE_NUMBER")
        if _php_empty(phone):
            raise _PortalError(400, "ERROR_CORE", "PHONE_NUMBER is empty")
        return {"result": self._crm.get(normalise_phone(phone), [])}

    def _register(self, params: dict[str, Any]) -> dict[str, Any]:
        user_id = self._resolve_user(params)
        phone = params.get("PHONE_NUMBER")
        if _php_empty(phone):
            raise _PortalError(400, "ERROR_CORE", "PHONE_NUMBER is empty")
        call_type = str(params.get("TYPE", ""))
        if call_type not in ("1", "2", "3", "4", "5"):
            raise _PortalError(400, "ERROR_CORE", "Unknown TYPE")

        now = time.monotonic()
        merge_key = _merge_key(params, user_id)
        for call in self.calls.values():
            # Only a call still open absorbs a repeat: finish closes it for good.
            if (
                call.finish_params is None
                and now - call.registered_at < REGISTER_MERGE_WINDOW
                and _merge_key(call.params, call.user_id) == merge_key
            ):
                return {"result": _register_result(call, created_lead=None)}

        digits = normalise_phone(phone)
        entity_type, entity_id = self._crm_binding(params, digits)
        created_lead = None
        if entity_type is None and str(params.get("CRM_CREATE", "0")) == "1":
            created_lead = next(self._lead_ids)
            entity_type, entity_id = "LEAD", created_lead
            self.set_client(digits, [_lead(created_lead, self._users[user_id])])
        call_id = f"externalCall.{secrets.token_hex(16)}.{int(time.time())}"
        call = RegisteredCall(call_id, user_id, dict(params), entity_type, entity_id, now)
        self.calls[call_id] = call
        return {"result": _register_result(call, created_lead)}

    def _finish(self, params: dict[str, Any]) -> dict[str, Any]:
        call = self.calls.get(str(params.get("CALL_ID", "")))
        if call is None or call.finish_params is not None:
            raise _PortalError(400, "", "Call is not found (call should be registered prior to finishing)")
        self._resolve_user(params)
        call.finish_params = dict(params)
        duration = _int_or_zero(params.get("DURATION"))
        status_code = str(params.get("STATUS_CODE") or ("200" if duration > 0 else "304"))
        return {
            "result": {
                "CALL_ID": call.call_id,
                "EXTERNAL_CALL_ID": call.params.get("EXTERNAL_CALL_ID"),
                "PORTAL_USER_ID": call.user_id,
                "PHONE_NUMBER": call.params.get("PHONE_NUMBER"),
                "PORTAL_NUMBER": call.params.get("LINE_NUMBER"),
                "INCOMING": str(call.params.get("TYPE")),
                "CALL_DURATION": duration,
                "CALL_FAILED_CODE": status_code,
                "CALL_FAILED_REASON": params.get("FAILED_REASON", ""),
                "CRM_ENTITY_TYPE": call.crm_entity_type,
                "CRM_ENTITY_ID": call.crm_entity_id,
            }
        }

    def _user_get(self, params: dict[str, Any]) -> dict[str, Any]:
        # user.get takes its filter as FILTER[...] or, in the older form, as the parameters themselves.
        conditions = params.get("FILTER") if isinstance(params.get("FILTER"), dict) else params
        conditions = {
            key.upper(): value
            for key, value in conditions.items()
            if key.upper() not in ("SORT", "ORDER", "START")
        }
        users = [
            user
            for user in (self._user_record(user_id) for user_id in sorted(self._users, key=_numeric_first))
            if all(_user_field_matches(user.get(key), value) for key, value in conditions.items())
        ]
        return {"result": users, "total": len(users)}

    def _user_record(self, user_id: str) -> dict[str, Any]:
        owner = self._users[user_id]
        extras = self._user_extras.get(user_id, {})
        return {
            "ID": user_id,
            "ACTIVE": extras.get("ACTIVE", True),
            "NAME": extras.get("NAME", ""),
            "LAST_NAME": extras.get("LAST_NAME", ""),
            "UF_PHONE_INNER": owner.get("USER_PHONE_INNER"),
            "WORK_PHONE": owner.get("WORK_PHONE"),
            "PERSONAL_PHONE": owner.get("PERSONAL_PHONE"),
            "PERSONAL_MOBILE": owner.get("PERSONAL_MOBILE"),
        }

    def _resolve_user(self, params: Mapping[str, Any]) -> str:
        if not _php_empty(params.get("USER_ID")):
            user_id = str(params["USER_ID"])
            if user_id not in self._users:
                raise _PortalError(400, "ERROR_CORE", f"User {user_id} is not found")
            return user_id
        inner = params.get("USER_PHONE_INNER")
        if _php_empty(inner):
            raise _PortalError(400, "ERROR_CORE", "USER_ID or USER_PHONE_INNER should be set")
        for user_id, owner in self._users.items():
            if str(owner.get("USER_PHONE_INNER")) == str(inner):
                return user_id
        raise _PortalError(400, "ERROR_CORE", f"User with phone extension {inner} is not found")

    def _crm_binding(self, params: Mapping[str, Any], phone: str) -> tuple[str | None, int | None]:
        if not _php_empty(params.get("CRM_ENTITY_TYPE")) and not _php_empty(params.get("CRM_ENTITY_ID")):
            return str(params["CRM_ENTITY_TYPE"]).upper(), _int_or_zero(params["CRM_ENTITY_ID"])
        for entity in self._crm.get(phone, []):
            if isinstance(entity, dict):
                return entity.get("CRM_ENTITY_TYPE"), entity.get("CRM_ENTITY_ID")
        return None, None


# -- wire helpers -----------------------------------------------------------------------------


async def _read_params(request: web.Request) -> dict[str, Any]:
    """Query string, then the body (form or JSON) on top, as PHP's $_REQUEST sees them."""
    params = _php_params(request.query.items())
    if request.method != "POST" or not request.can_read_body:
        return params
    if request.content_type == "application/json":
        try:
            body = json.loads(await request.read() or b"{}")
        except ValueError:
            raise _PortalError(400, "INVALID_REQUEST", "Request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _PortalError(400, "INVALID_REQUEST", "Request body must be a JSON object")
        params.update(body)
    else:
        params.update(_php_params((await request.post()).items()))
    return params


def _php_params(pairs: Any) -> dict[str, Any]:
    """Decode PHP-style form keys: FILTER[ID]=5 -> {"FILTER": {"ID": "5"}}; KEY[]=x appends."""
    params: dict[str, Any] = {}
    for key, value in pairs:
        if not isinstance(value, str):
            continue  # uploaded files: no method here takes one
        name, bracket, rest = key.partition("[")
        path = [name, *rest[:-1].split("][")] if bracket and rest.endswith("]") else [key]
        node = params
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        last = path[-1] or str(len(node))
        node[last] = value
    return params


def _php_empty(value: Any) -> bool:
    # PHP's empty(): the portal treats "0" like a missing value.
    return value is None or value == "" or value == "0" or value == 0 or value is False


def _int_or_zero(value: Any) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        return 0


def _numeric_first(user_id: str) -> tuple[int, str]:
    return (int(user_id), "") if user_id.isdigit() else (0, user_id)


def _user_field_matches(actual: Any, wanted: Any) -> bool:
    if isinstance(actual, bool):
        return actual == (str(wanted).upper() in ("Y", "TRUE", "1"))
    return str(actual) == str(wanted)


def _merge_key(params: Mapping[str, Any], user_id: str) -> tuple[str, str, str, str, str]:
    return (
        normalise_phone(params.get("PHONE_NUMBER")),
        str(params.get("TYPE", "")),
        user_id,
        str(params.get("LINE_NUMBER", "")),
        str(params.get("EXTERNAL_CALL_ID", "")),
    )


def _register_result(call: RegisteredCall, created_lead: int | None) -> dict[str, Any]:
    created = [{"ENTITY_TYPE": "LEAD", "ENTITY_ID": created_lead}] if created_lead else []
    return {
        "CALL_ID": call.call_id,
        "CRM_CREATED_LEAD": created_lead,
        "CRM_CREATED_ENTITIES": created,
        "CRM_ENTITY_TYPE": call.crm_entity_type,
        "CRM_ENTITY_ID": call.crm_entity_id,
    }


def _lead(lead_id: int, owner: dict[str, Any]) -> dict[str, Any]:
    owner_id = str(owner.get("ID"))
    return {
        "CRM_ENTITY_TYPE": "LEAD",
        "CRM_ENTITY_ID": lead_id,
        "ASSIGNED_BY_ID": int(owner_id) if owner_id.isdigit() else owner_id,
        "ASSIGNED_BY": dict(owner),
    }


def _time_block(started: float, finished: float) -> dict[str, Any]:
    def iso(moment: float) -> str:
        return datetime.fromtimestamp(moment).astimezone().isoformat(timespec="seconds")

    return {
        "start": started,
        "finish": finished,
        "duration": finished - started,
        "processing": finished - started,
        "date_start": iso(started),
        "date_finish": iso(finished),
        "operating_reset_at": int(started) + 600,
        "operating": 0,
    }


def _json_response(status: int, body: Any) -> web.Response:
    response = web.Response(
        status=status, body=json.dumps(body).encode(), content_type="application/json", charset="utf-8"
    )
    # The portal's nginx streams answers chunked, without Content-Length.
    response.enable_chunked_encoding()
    return response


def _error_response(error: _PortalError) -> web.Response:
    return _json_response(error.status, {"error": error.code, "error_description": error.description})


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


# -- manual testing ---------------------------------------------------------------------------


def _parse_rate_limit(text: str) -> tuple[float, int]:
    rate, _, burst = text.partition(":")
    try:
        return float(rate), int(burst)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RATE:BURST such as 2:50, got {text!r}") from None


async def _serve(host: str, port: int, rate_limit: tuple[float, int] | None) -> None:
    from agi_bitrix.bitrix.sample_data import SAMPLE_CALLS, SAMPLE_CRM, SAMPLE_USERS

    emulator = PortalEmulator(SAMPLE_CRM, users=SAMPLE_USERS, rate_limit=rate_limit)
    url = await emulator.start(host, port)
    print(f"Bitrix24 portal emulator: webhook URL {url}", flush=True)
    example = f"{url}telephony.externalCall.searchCrmEntities.json?PHONE_NUMBER={SAMPLE_CALLS[0].phone}"
    print(f"Try: curl '{example}'", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await emulator.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m agi_bitrix.bitrix.emulator",
        description="Serve the sample CRM as a Bitrix24 inbound webhook, for manual testing.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--rate-limit",
        nargs="?",
        const=PORTAL_RATE_LIMIT,
        type=_parse_rate_limit,
        metavar="RATE:BURST",
        help="limit requests like the portal (default when given without a value: 2:50)",
    )
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve(args.host, args.port, args.rate_limit))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
