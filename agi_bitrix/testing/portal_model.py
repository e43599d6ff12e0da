"""The Bitrix24 portal's data and REST methods, as the emulator answers them, without HTTP.

The data is a CRM (what telephony.externalCall.searchCrmEntities returns per phone), the users
that own its objects (what user.get lists) and the telephony calls that
telephony.externalcall.register opens and telephony.externalcall.finish closes. Each method takes
the request's parameters and returns the portal's answer, or raises `ErrorAnswer` with the
status, code and text the portal sends; the checks, the number matching and the merging of
repeated registers follow the REST documentation and the portal's code. Only the methods this
project calls are implemented.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from agi_bitrix.testing.portal_lines import LINE_METHODS, ExternalLines
from agi_bitrix.testing.portal_wire import ErrorAnswer

SEARCH_METHOD = "telephony.externalcall.searchcrmentities"
REGISTER_METHOD = "telephony.externalcall.register"
FINISH_METHOD = "telephony.externalcall.finish"
ATTACH_RECORD_METHOD = "telephony.externalcall.attachrecord"
SHOW_METHOD = "telephony.externalcall.show"
HIDE_METHOD = "telephony.externalcall.hide"
USER_GET_METHOD = "user.get"
SCOPE_METHOD = "scope"
TODO_ADD_METHOD = "crm.activity.todo.add"
NOTIFY_METHOD = "im.notify.personal.add"
# api-reference/telephony/telephony-external-call-attach-record.md: FILENAME's extensions.
RECORD_EXTENSIONS = (".wav", ".mp3")

# The portal merges a repeated register with the same call data into the call still open.
REGISTER_MERGE_WINDOW = 30 * 60.0


def normalise_phone(raw: Any) -> str:
    """Digits as the portal compares them: 8XXXXXXXXXX becomes 7XXXXXXXXXX, nothing else changes.

    A 10-digit national number stays 10 digits and so does not match a stored 7XXXXXXXXXX,
    exactly like the portal.
    """
    digits = re.sub(r"\D", "", "" if raw is None else str(raw))
    if len(digits) == 11 and digits.startswith("8"):
        return "7" + digits[1:]
    return digits


@dataclass
class RegisteredCall:
    call_id: str
    user_id: str
    params: dict[str, Any]  # as sent to register
    crm_entity_type: str | None
    crm_entity_id: int | None
    registered_at: float  # time.monotonic(); tests may move it back to leave the merge window
    finish_params: dict[str, Any] | None = None
    record: AttachedRecord | None = None  # the last one attachRecord gave (a new one replaces it)
    records_attached: int = 0
    # Whose screens show the call card now (register's SHOW, show, hide), and every show and
    # hide in order as ("show" | "hide", user ids), for tests to read.
    card_shown_to: set[str] = field(default_factory=set)
    card_requests: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)


@dataclass(frozen=True)
class AttachedRecord:
    file_id: int
    filename: str
    content: bytes


class PortalModel:
    def __init__(
        self,
        crm: Mapping[str, list[dict]] | None = None,
        *,
        users: Mapping[str, dict] | None = None,
    ) -> None:
        """`crm` maps a phone to the raw searchCrmEntities answer; `users` adds user.get-only
        fields (NAME, LAST_NAME, ACTIVE) to the owners found in `crm`, keyed by user id."""
        self.calls: dict[str, RegisteredCall] = {}
        self._crm: dict[str, list[dict]] = {}
        self._user_extras = {str(key): dict(value) for key, value in (users or {}).items()}
        self._users: dict[str, dict[str, Any]] = {}
        self._lead_ids = itertools.count(1000)
        self._file_ids = itertools.count(9000)
        # When set, register's CRM_CREATE makes no lead and answers LEAD_CREATION_ERROR with this
        # text, as a portal whose CRM refuses the lead does (leads switched off, a required field).
        self.lead_creation_error = ""
        # What the `scope` method answers: the scopes the webhook or application was given.
        self.scopes = ["crm", "telephony", "user"]
        # What crm.activity.todo.add and im.notify.personal.add were given, in order.
        self.todos: list[dict[str, Any]] = []
        self.notifications: list[dict[str, Any]] = []
        self._activity_ids = itertools.count(500)
        self.external_lines = ExternalLines()  # telephony.externalLine.* (portal_lines)
        for phone, entities in (crm or {}).items():
            self.set_client(phone, entities)

    def set_client(self, phone: str, entities: list[Any]) -> None:
        """Make `phone` answer with `entities`, raw portal-shaped objects sent as they are."""
        self._crm[normalise_phone(phone)] = list(entities)
        for entity in entities:
            owner = entity.get("ASSIGNED_BY") if isinstance(entity, dict) else None
            if isinstance(owner, dict) and owner.get("ID") is not None:
                self._users[str(owner["ID"])] = dict(owner)

    def call_method(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """The answer of a method the emulator knows, for a direct call or a batch command."""
        if method in LINE_METHODS:
            return self.external_lines.answer(method, params)
        handler: Callable[[dict[str, Any]], dict[str, Any]] | None = {
            SEARCH_METHOD: self._search,
            REGISTER_METHOD: self._register,
            FINISH_METHOD: self._finish,
            ATTACH_RECORD_METHOD: self._attach_record,
            SHOW_METHOD: self._show,
            HIDE_METHOD: self._hide,
            USER_GET_METHOD: self._user_get,
            SCOPE_METHOD: self._scope,
            TODO_ADD_METHOD: self._todo_add,
            NOTIFY_METHOD: self._notify,
        }.get(method)
        if handler is None:
            raise ErrorAnswer(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
        return handler(params)

    # -- methods ----------------------------------------------------------------------------

    def _search(self, params: dict[str, Any]) -> dict[str, Any]:
        phone = params.get("PHONE_NUMBER")
        if _php_empty(phone):
            raise ErrorAnswer(400, "ERROR_CORE", "PHONE_NUMBER is empty")
        return {"result": self._crm.get(normalise_phone(phone), [])}

    def _register(self, params: dict[str, Any]) -> dict[str, Any]:
        user_id = self._resolve_user(params)
        phone = params.get("PHONE_NUMBER")
        if _php_empty(phone):
            raise ErrorAnswer(400, "ERROR_CORE", "PHONE_NUMBER is empty")
        call_type = str(params.get("TYPE", ""))
        if call_type not in ("1", "2", "3", "4", "5"):
            raise ErrorAnswer(400, "ERROR_CORE", "Unknown TYPE")

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
        lead_error = ""
        if entity_type is None and str(params.get("CRM_CREATE", "0")) == "1":
            if self.lead_creation_error:
                lead_error = self.lead_creation_error
            else:
                created_lead = next(self._lead_ids)
                entity_type, entity_id = "LEAD", created_lead
                self.set_client(digits, [_lead(created_lead, self._users[user_id])])
        call_id = f"externalCall.{secrets.token_hex(16)}.{int(time.time())}"
        call = RegisteredCall(call_id, user_id, dict(params), entity_type, entity_id, now)
        if str(params.get("SHOW", "1")) != "0":  # SHOW: 1 by default
            call.card_shown_to.add(user_id)
        self.calls[call_id] = call
        result = _register_result(call, created_lead)
        if lead_error:
            result["LEAD_CREATION_ERROR"] = lead_error  # only when there is one ("if any")
        return {"result": result}

    def _finish(self, params: dict[str, Any]) -> dict[str, Any]:
        call = self.calls.get(str(params.get("CALL_ID", "")))
        if call is None or call.finish_params is not None:
            raise ErrorAnswer(400, "", "Call is not found (call should be registered prior to finishing)")
        user_id = self._resolve_user(params)
        call.finish_params = dict(params)
        # voximplant's Rest\Helper::finishExternalCall hides the card from the finish's user, and
        # from nobody else: the others' cards stay open until a hide.
        call.card_shown_to.discard(user_id)
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

    def _attach_record(self, params: dict[str, Any]) -> dict[str, Any]:
        """api-reference/telephony/telephony-external-call-attach-record.md: a record for a call
        that was finished (it is looked up in the call statistics finish writes), checked in the
        page's order of errors; a new one replaces the one attached before."""
        filename = params.get("FILENAME")
        if _php_empty(params.get("RECORD_URL")) and filename is None:
            raise ErrorAnswer(400, "ERROR_CORE", "Required parameters are not set. Request should contain either URL"
                                                 " or FILENAME parameter")
        call = self.calls.get(str(params.get("CALL_ID", "")))
        if call is None or call.finish_params is None:
            raise ErrorAnswer(400, "ERROR_CORE", "Call is not found in the statistic table. It looks like it is not"
                                                 " finished yet.")
        if "FILE_CONTENT" not in params:
            # RECORD_URL makes the portal download the file, FILENAME alone answers an upload URL:
            # neither is what this project sends, and the emulator does not pretend to do them.
            raise ErrorAnswer(501, "EMULATOR_NOT_IMPLEMENTED", "the emulator takes only FILENAME with FILE_CONTENT")
        if _php_empty(filename):
            raise ErrorAnswer(400, "ERROR_CORE", "File name is empty")
        if not str(filename).lower().endswith(RECORD_EXTENSIONS):
            raise ErrorAnswer(400, "ERROR_CORE", "Wrong file extension. Only wav and mp3 are allowed")
        encoded = params.get("FILE_CONTENT")
        if _php_empty(encoded):
            raise ErrorAnswer(400, "ERROR_CORE", "File content is empty.")
        try:
            content = base64.b64decode(str(encoded), validate=True)
        except (binascii.Error, ValueError):
            raise ErrorAnswer(400, "ERROR_CORE", "File content is not properly encoded. Base64 encoding is"
                                                 " expected.") from None
        call.record = AttachedRecord(next(self._file_ids), str(filename), content)
        call.records_attached += 1
        return {"result": {"FILE_ID": call.record.file_id}}

    def _show(self, params: dict[str, Any]) -> dict[str, Any]:
        """api-reference/telephony/telephony-external-call-show.md: USER_ID one id or a list, by
        default the user the call was registered for; `true`, or `false` for a call it does not
        have (an unknown CALL_ID, or one already finished: finish ends the call)."""
        return self._card(params, "show")

    def _hide(self, params: dict[str, Any]) -> dict[str, Any]:
        """api-reference/telephony/telephony-external-call-hide.md: USER_ID as for show; no
        error codes of its own, `false` when the CALL_ID is not found."""
        return self._card(params, "hide")

    def _card(self, params: dict[str, Any], action: Literal["show", "hide"]) -> dict[str, Any]:
        call = self._open_call(params)
        if call is None:
            return {"result": False}
        users = _user_ids(params.get("USER_ID")) or (call.user_id,)
        if action == "show":
            call.card_shown_to.update(users)
        else:
            call.card_shown_to.difference_update(users)
        call.card_requests.append((action, users))
        return {"result": True}

    def _scope(self, params: dict[str, Any]) -> dict[str, Any]:
        """dev.1c-bitrix.ru/rest_help/general/scope.php (api-reference/common/scope.md): without
        parameters, the scopes this application or webhook has, as a list of names."""
        return {"result": list(self.scopes)}

    def _todo_add(self, params: dict[str, Any]) -> dict[str, Any]:
        """api-reference/crm/timeline/activities/todo/crm-activity-todo-add.md (dev.1c-bitrix.ru
        rest_help/crm/rest_activity/todo/crm_activity_todo_add.php): ownerTypeId, ownerId and
        deadline are required; title, description, responsibleId optional. Answers {"id": N}."""
        for name in ("ownerTypeId", "ownerId", "deadline"):
            if _php_empty(params.get(name)):
                raise ErrorAnswer(400, "ERROR_CORE", f"Required parameter {name} is not set")
        self.todos.append(dict(params))
        return {"result": {"id": next(self._activity_ids)}}

    def _notify(self, params: dict[str, Any]) -> dict[str, Any]:
        """api-reference/chats/notifications/im-notify-personal-add.md: USER_ID and MESSAGE
        required; answers the notification's id."""
        if _php_empty(params.get("USER_ID")):
            raise ErrorAnswer(400, "USER_ID_EMPTY", "Recipient user ID not specified")
        if _php_empty(params.get("MESSAGE")):
            raise ErrorAnswer(400, "MESSAGE_EMPTY", "Message text not specified")
        self.notifications.append(dict(params))
        return {"result": len(self.notifications)}

    def _open_call(self, params: Mapping[str, Any]) -> RegisteredCall | None:
        call = self.calls.get(str(params.get("CALL_ID", "")))
        return call if call is not None and call.finish_params is None else None

    def _user_get(self, params: dict[str, Any]) -> dict[str, Any]:
        # user.get takes its filter as FILTER[...] or, in the older form, as the parameters themselves.
        given_filter = params.get("FILTER")
        conditions = given_filter if isinstance(given_filter, dict) else params
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
                raise ErrorAnswer(400, "ERROR_CORE", f"User {user_id} is not found")
            return user_id
        inner = params.get("USER_PHONE_INNER")
        if _php_empty(inner):
            raise ErrorAnswer(400, "ERROR_CORE", "USER_ID or USER_PHONE_INNER should be set")
        for user_id, owner in self._users.items():
            if str(owner.get("USER_PHONE_INNER")) == str(inner):
                return user_id
        raise ErrorAnswer(400, "ERROR_CORE", f"User with phone extension {inner} is not found")

    def _crm_binding(self, params: Mapping[str, Any], phone: str) -> tuple[str | None, int | None]:
        if not _php_empty(params.get("CRM_ENTITY_TYPE")) and not _php_empty(params.get("CRM_ENTITY_ID")):
            return str(params["CRM_ENTITY_TYPE"]).upper(), _int_or_zero(params["CRM_ENTITY_ID"])
        for entity in self._crm.get(phone, []):
            if isinstance(entity, dict):
                return entity.get("CRM_ENTITY_TYPE"), entity.get("CRM_ENTITY_ID")
        return None, None


def _php_empty(value: Any) -> bool:
    # PHP's empty(): the portal treats "0" like a missing value.
    return value is None or value == "" or value == "0" or value == 0 or value is False


def _user_ids(value: Any) -> tuple[str, ...]:
    """USER_ID as `integer | integer[]`: one id, a JSON list, or PHP's array from a form
    (USER_ID[0]=1&USER_ID[1]=2 arrives as {"0": "1", "1": "2"})."""
    if isinstance(value, dict):
        value = list(value.values())
    values = value if isinstance(value, list) else [value]
    return tuple(str(item) for item in values if not _php_empty(item))


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
