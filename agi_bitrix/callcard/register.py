"""The `register` script: telephony.externalcall.register while the call is being put through.

Dialplan: AGI(agi://HOST:PORT/register,${B24_PHONE},${B24_USER_ID},${CHANNEL(linkedid)},${EXTEN},
${B24_ENTITY_TYPE},${B24_ENTITY_ID}) after the route step. Everything comes in as arguments, so
the session costs one round trip: the EXEC MSet that sets B24_CALL_ID and B24_REGISTER_ERROR.
A bare AGI(agi://HOST:PORT/register) works too, at the price of one more round trip that reads
the same values from the channel.
A failed or slow register never holds the call beyond its own deadline; the call goes on
without a call card and B24_REGISTER_ERROR says why.
With callcard.register.crm_create it also sets B24_CRM_CREATED (what the portal created, as
TYPE:ID pairs separated by spaces) and B24_LEAD_ERROR (the portal's LEAD_CREATION_ERROR). A lead
the portal could not create leaves the call registered, so it is no B24_REGISTER_ERROR.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agi_bitrix.agi.channel import AgiChannel
from agi_bitrix.agi.protocol import AgiRequest, loggable
from agi_bitrix.bitrix.client import PortalClient
from agi_bitrix.bitrix.errors import BitrixError, RequestNotSent, WrongAuthType
from agi_bitrix.bitrix.line_settings import line_and_source
from agi_bitrix.callcard.dialplan import dialplan_values
from agi_bitrix.callcard.holders import CardHolders
from agi_bitrix.callcard.identity import CALL_ID_PATTERN, USER_ID_PATTERN, responsible_user
from agi_bitrix.config import Config
from agi_bitrix.phones import normalize_number

log = logging.getLogger("agi_bitrix.callcard")

REGISTER = "telephony.externalcall.register"
INCOMING = 2
ENTITY_TYPES = ("CONTACT", "COMPANY", "LEAD")
_ERROR = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_ENTITY_TYPE = re.compile(r"^[A-Z][A-Z_]{0,29}$")
# The portal's LEAD_CREATION_ERROR is a sentence; B24_LEAD_ERROR keeps its start.
_LEAD_ERROR_CHARS = 200


@dataclass(frozen=True)
class RegisterArguments:
    phone: str | None  # international digits; None: nothing usable to register
    owner: str  # the routed owner's user id, or ""
    external_call_id: str
    did: str
    entity_type: str
    entity_id: str


def register_expressions(prefix: str) -> tuple[str, ...]:
    """The arguments of the sample's AGI(.../register,...), as dialplan expressions."""
    return (f"${{{prefix}PHONE}}", f"${{{prefix}USER_ID}}", "${CHANNEL(linkedid)}", "${EXTEN}",
            f"${{{prefix}ENTITY_TYPE}}", f"${{{prefix}ENTITY_ID}}")


def register_arguments(values: list[str], request: AgiRequest, default_country: str) -> RegisterArguments:
    """The dialplan's values, each checked, with the AGI header filling in what is missing."""
    args = [value.strip() for value in values] + [""] * 6
    owner, entity_type, entity_id = args[1], args[4].upper(), args[5]
    has_entity = entity_type in ENTITY_TYPES and entity_id.isascii() and entity_id.isdigit()
    call_ids = [text for text in (args[2], request.get("agi_uniqueid")) if CALL_ID_PATTERN.match(text)]
    return RegisterArguments(
        phone=normalize_number(args[0] or request.get("agi_callerid"), default_country),
        owner=owner if USER_ID_PATTERN.match(owner) else "",
        external_call_id=call_ids[0] if call_ids else "",
        did=normalize_number(args[3], default_country) or normalize_number(request.get("agi_extension"),
                                                                           default_country) or "",
        entity_type=entity_type if has_entity else "",
        entity_id=entity_id if has_entity else "",
    )


class RegisterService:
    def __init__(self, config: Config, portal: PortalClient, holders: CardHolders) -> None:
        """`holders` learns who the portal shows the card to (SHOW), so an answer can hide it."""
        self.config = config
        self.portal = portal
        self.holders = holders

    async def handle_register(self, request: AgiRequest, channel: AgiChannel) -> None:
        uniqueid = loggable(request.get("agi_uniqueid")) or "-"
        values = await dialplan_values(request, channel, register_expressions(self.config.variable_prefix))
        created = Created()
        try:
            call_id, error = await self.register(request, values, created)
        except Exception:
            log.exception("call %s: register failed unexpectedly", uniqueid)
            call_id, error = "", "internal"
        prefix = self.config.variable_prefix
        variables = {f"{prefix}CALL_ID": call_id, f"{prefix}REGISTER_ERROR": error}
        await set_register_answer(channel, uniqueid, prefix, variables,
                                  created if self.config.callcard.register.crm_create else None)

    async def register(self, request: AgiRequest, values: list[str],
                       created: Created | None = None) -> tuple[str, str]:
        """(CALL_ID, "") on success, ("", reason) otherwise; `values` as the dialplan gave them.
        What the portal created in the CRM (or failed to) is put in `created`."""
        config = self.config
        settings = config.callcard.register
        uniqueid = loggable(request.get("agi_uniqueid")) or "-"
        if not config.callcard.enabled:
            return "", "disabled"
        arguments = register_arguments(values, request, config.policy.default_country)
        user_id = arguments.owner or responsible_user(settings, arguments.did)
        if arguments.phone is None:
            log.info("call %s: no usable number; not registered", uniqueid)
            return "", "no_number"
        if not user_id:
            log.info("call %s: no owner, no callcard.register.responsible for DID %s and no default_user; not"
                     " registered", uniqueid, arguments.did or "-")
            return "", "no_user"
        params = self.register_params(arguments, user_id)
        return await self.send_register(params, uniqueid, show=settings.show, crm_create=settings.crm_create,
                                        created=created)

    async def send_register(self, params: dict[str, Any], uniqueid: str, *, show: bool, crm_create: bool,
                            created: Created | None = None) -> tuple[str, str]:
        """Send one register (incoming or outgoing) within callcard.register.deadline; (CALL_ID, "") on
        success, ("", reason) otherwise. What the portal created in the CRM is put in `created`."""
        deadline = self.config.callcard.register.deadline
        user_id, phone = params["USER_ID"], params["PHONE_NUMBER"]
        try:
            async with asyncio.timeout(deadline):
                # The request budget is the lookups' too: the portal counts every request.
                result = await self.portal.call(REGISTER, params, max_wait=deadline)
        except TimeoutError:
            log.warning("call %s: register took longer than %.1f s; the call goes on without a card",
                        uniqueid, deadline)
            return "", "timeout"
        except RequestNotSent as error:
            log.warning("call %s: not registered: %s", uniqueid, error)
            return "", error.reason
        except BitrixError as error:
            log.warning("call %s: register failed: %s", uniqueid, error)
            if isinstance(error, WrongAuthType):
                log.error("call %s: %s", uniqueid, WrongAuthType.ADVICE)
            return "", error.reason if _ERROR.match(error.reason) else "portal_error"
        call_id = result.get("CALL_ID") if isinstance(result, dict) else None
        if not isinstance(call_id, str) or not CALL_ID_PATTERN.match(call_id):
            log.warning("call %s: register answered without a usable CALL_ID: %.200r", uniqueid, result)
            return "", "bad_result"
        found = created_in_crm(result)
        log.info("call %s: registered as %s for user %s (type %s, external id %s)%s", uniqueid, call_id, user_id,
                 params["TYPE"], params["EXTERNAL_CALL_ID"] or "-",
                 f"; created in the CRM: {' '.join(found.entities)}" if found.entities else "")
        if found.lead_error:
            log.warning("call %s: registered, but the portal could not create a lead for %s: %s", uniqueid,
                        phone, found.lead_error)
        elif crm_create and not found.entities and not result.get("CRM_ENTITY_TYPE"):
            log.warning("call %s: registered with crm_create, but the portal names no CRM object for %s",
                        uniqueid, phone)
        if created is not None:
            created.entities, created.lead_error = found.entities, found.lead_error
        if show:
            self.holders.add(call_id, user_id)
        self.holders.link(call_id, params["EXTERNAL_CALL_ID"])  # AMI's transfer events name the linkedid
        return call_id, ""

    def register_params(self, arguments: RegisterArguments, user_id: str) -> dict[str, Any]:
        settings = self.config.callcard.register
        # The configured line of the DID (the `lines:` list), so the portal's reports split by it.
        line_number, crm_source = line_and_source(self.config.lines, arguments.did, settings.line_number,
                                                  settings.crm_source)
        params: dict[str, Any] = {
            "USER_ID": user_id,
            "PHONE_NUMBER": arguments.phone,
            "TYPE": INCOMING,
            "CALL_START_DATE": datetime.now(UTC).isoformat(timespec="seconds"),
            "CRM_CREATE": settings.crm_create,
            "SHOW": settings.show,
            "LINE_NUMBER": line_number,
            # Without a value unique to the call the portal merges this call into an earlier one
            # from the same number to the same user within 30 minutes.
            "EXTERNAL_CALL_ID": arguments.external_call_id,
        }
        if crm_source:
            params["CRM_SOURCE"] = crm_source
        if arguments.entity_type:
            params["CRM_ENTITY_TYPE"] = arguments.entity_type
            params["CRM_ENTITY_ID"] = arguments.entity_id
        return params


@dataclass
class Created:
    """What register's CRM_CREATE did: the objects made, as TYPE:ID, and the portal's error text."""

    entities: list[str] = field(default_factory=list)
    lead_error: str = ""


async def set_register_answer(channel: AgiChannel, uniqueid: str, prefix: str, variables: dict[str, str],
                              created: Created | None) -> None:
    """Set a register's answer on the channel (incoming or outgoing): `variables`, and what
    CRM_CREATE did when it was asked (`created`), so a lead the portal could not create is not silent."""
    if created is not None:
        variables = {**variables, f"{prefix}CRM_CREATED": " ".join(created.entities),
                     f"{prefix}LEAD_ERROR": created.lead_error}
    if not await channel.set_variables(variables):
        log.info("call %s: the channel went away before B24_CALL_ID was set", uniqueid)


def created_in_crm(result: dict[str, Any]) -> Created:
    """CRM_CREATED_ENTITIES and LEAD_CREATION_ERROR of a register answer
    (api-reference/telephony/telephony-external-call-register.md), each value checked: only
    "TYPE:ID" pairs of a known shape, and the error as one line of printable text."""
    entities = []
    listed = result.get("CRM_CREATED_ENTITIES")
    for item in listed if isinstance(listed, list) else []:
        if not isinstance(item, dict):
            continue
        kind, number = str(item.get("ENTITY_TYPE") or "").upper(), str(item.get("ENTITY_ID") or "")
        if _ENTITY_TYPE.match(kind) and number.isdigit() and len(number) <= 20:
            entities.append(f"{kind}:{number}")
    lead = str(result.get("CRM_CREATED_LEAD") or "")
    if lead.isdigit() and len(lead) <= 20 and f"LEAD:{lead}" not in entities:
        entities.append(f"LEAD:{lead}")  # older portals name the lead only here
    error = result.get("LEAD_CREATION_ERROR")
    text = " ".join(str(error).split()) if error not in (None, "", False) else ""
    text = "".join(char for char in text if char.isprintable())[:_LEAD_ERROR_CHARS]
    return Created(entities, text)
