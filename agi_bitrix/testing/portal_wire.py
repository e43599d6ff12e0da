"""How the Bitrix24 portal speaks HTTP, for the emulator: what it reads and what it sends.

A request's parameters come from the query string, a form (PHP-style keys such as FILTER[ID]) or
a JSON body, as PHP's $_REQUEST sees them; method names come in any case, with or without
".json". Success is `{"result", "time"}` with numbers as JSON numbers; failure is
`{"error", "error_description"}` with the portal's HTTP status. Answers are streamed chunked,
as the portal's nginx sends them.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from aiohttp import web


class ErrorAnswer(Exception):
    """An error answer, raised from a method to be sent as the portal would."""

    def __init__(self, status: int, code: str, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.code = code
        self.description = description


def canonical_method(name: str) -> str:
    return name.lower().removesuffix(".json")


async def read_params(request: web.Request) -> dict[str, Any]:
    """Query string, then the body (form or JSON) on top, as PHP's $_REQUEST sees them."""
    params = php_params(request.query.items())
    if request.method != "POST" or not request.can_read_body:
        return params
    if request.content_type == "application/json":
        try:
            body = json.loads(await request.read() or b"{}")
        except ValueError:
            raise ErrorAnswer(400, "INVALID_REQUEST", "Request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ErrorAnswer(400, "INVALID_REQUEST", "Request body must be a JSON object")
        params.update(body)
    else:
        params.update(php_params((await request.post()).items()))
    return params


def php_params(pairs: Any) -> dict[str, Any]:
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


def time_block(started: float, finished: float, processing: float | None = None,
               operating: tuple[float, float] | None = None) -> dict[str, Any]:
    """The `time` object (api-reference/data-types.md): `processing` is the method's own work,
    `operating` (seconds, reset_at) its accumulated time and when its oldest basket drops, sent
    for a method's own call (not for a batch's nested commands, nor a batch: limits.md)."""
    def iso(moment: float) -> str:
        return datetime.fromtimestamp(moment).astimezone().isoformat(timespec="seconds")

    block: dict[str, Any] = {
        "start": started,
        "finish": finished,
        "duration": finished - started,
        "processing": finished - started if processing is None else processing,
        "date_start": iso(started),
        "date_finish": iso(finished),
    }
    if operating is not None:
        block["operating_reset_at"], block["operating"] = operating[1], operating[0]
    return block


def json_response(status: int, body: Any) -> web.Response:
    response = web.Response(
        status=status, body=json.dumps(body).encode(), content_type="application/json", charset="utf-8"
    )
    # The portal's nginx streams answers chunked, without Content-Length.
    response.enable_chunked_encoding()
    return response


def error_response(error: ErrorAnswer) -> web.Response:
    return json_response(error.status, {"error": error.code, "error_description": error.description})
