"""decide(): the routing decision for one call, as a pure function.

Rules are tried in order. A rule decides when its call conditions hold, a CRM object passes
its object conditions (only the first object, unless the rule says `objects: all`), and one
of its targets is available for that object — an owner's mobile that is missing or not a
plain number is not available. A rule that matches but has nothing to dial lets the next
rule try. When no rule decides, the call goes to the fallback queue. Every step is recorded
in the trace so that `agi-bitrix route` can explain the outcome.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from agi_bitrix.bitrix.models import CrmAnswer, CrmEntity, Owner
from agi_bitrix.phones import dialable_number, normalize_extension
from agi_bitrix.routing.rules import Match, RoutingPolicy, Rule, Target

FALLBACK_RULE = "fallback"


@dataclass(frozen=True, slots=True)
class CallInfo:
    """What the PBX told us: the number as looked up (None when there is no usable caller ID)."""

    phone: str | None
    did: str = ""


@dataclass(frozen=True, slots=True)
class OwnerPhones:
    """The owner's phones as dialable digits; "" where missing or unusable."""

    extension: str = ""
    mobile: str = ""
    work_phone: str = ""
    personal_phone: str = ""

    def get(self, name: str) -> str:
        phone: str = getattr(self, name)  # every field is a str
        return phone


_NO_PHONES = OwnerPhones()


@dataclass(frozen=True, slots=True)
class RuleTrace:
    rule: str
    decided: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Decision:
    status: str
    route: str  # extension | mobile | queue
    target: str
    rule: str
    phone: str
    fallback_queue: str
    entity: CrmEntity | None = None
    owner_phones: OwnerPhones = OwnerPhones()
    error: str = ""
    cache: str = ""
    trace: tuple[RuleTrace, ...] = ()


def owner_phones(entity: CrmEntity | None, default_country: str) -> OwnerPhones:
    if entity is None or entity.owner is None:
        return _NO_PHONES
    return _owner_phones(entity.owner, default_country)


# Every rule that looks at an object needs its owner's phones, and the same few owners take
# call after call; the function is pure.
@functools.lru_cache(maxsize=4096)
def _owner_phones(owner: Owner, default_country: str) -> OwnerPhones:
    return OwnerPhones(
        extension=normalize_extension(owner.inner_phone) or "",
        # Dialled on a CRM user's word: only valid subscriber numbers, never "112" or a short code.
        mobile=dialable_number(owner.personal_mobile, default_country) or "",
        work_phone=dialable_number(owner.work_phone, default_country) or "",
        personal_phone=dialable_number(owner.personal_phone, default_country) or "",
    )


def decide(call: CallInfo, answer: CrmAnswer, policy: RoutingPolicy, now: datetime,
           inactive_owners: frozenset[str] = frozenset()) -> Decision:
    """`inactive_owners`: user ids known to be deactivated; their objects decide no rule, and a
    decision never names such an owner (no user id, no phones to dial)."""
    trace: list[RuleTrace] = []
    for rule in policy.rules:
        refusal = _call_refusal(rule.match, call, answer, policy, now)
        if refusal:
            trace.append(RuleTrace(rule.name, False, refusal))
            continue
        outcome = _pick(rule, answer, policy, inactive_owners)
        if isinstance(outcome, str):
            trace.append(RuleTrace(rule.name, False, outcome))
            continue
        entity, phones, target, skipped = outcome
        route, dial = _resolve(target, phones, policy)
        chosen = f" {entity.entity_type} {entity.entity_id}" if entity else ""
        passed_over = f" (passed over: {'; '.join(skipped)})" if skipped else ""
        trace.append(RuleTrace(rule.name, True, f"matched{chosen}{passed_over}; dials {target.describe()}"))
        return Decision(
            status=answer.status,
            route=route,
            target=dial,
            rule=rule.name,
            phone=call.phone or "",
            fallback_queue=policy.fallback_queue,
            entity=entity,
            owner_phones=phones,
            error=answer.error,
            cache=answer.cache,
            trace=tuple(trace),
        )
    first = answer.entities[0] if answer.entities else None
    why = ""
    if first is not None and _deactivated_owner(first, inactive_owners) is not None:
        why = f" (the owner of {_label(first)} is deactivated)"
    first = _without_inactive_owner(first, inactive_owners)
    trace.append(RuleTrace(FALLBACK_RULE, True, f"no rule decided{why}; fallback queue"))
    return Decision(
        status=answer.status,
        route="queue",
        target=policy.fallback_queue,
        rule=FALLBACK_RULE,
        phone=call.phone or "",
        fallback_queue=policy.fallback_queue,
        entity=first,
        owner_phones=owner_phones(first, policy.default_country),
        error=answer.error,
        cache=answer.cache,
        trace=tuple(trace),
    )


def _call_refusal(
    match: Match, call: CallInfo, answer: CrmAnswer, policy: RoutingPolicy, now: datetime
) -> str:
    """Why the call-level conditions do not hold ("" when they do)."""
    if match.status is not None and answer.status not in match.status:
        return f"status {answer.status} not in {sorted(match.status)}"
    if match.did is not None and call.did not in match.did:
        return f"DID {call.did or '(none)'} not in {sorted(match.did)}"
    if match.did_regex is not None and not match.did_regex.fullmatch(call.did):
        return f"DID {call.did or '(none)'} does not match /{match.did_regex.pattern}/"
    phone = call.phone or ""
    if match.caller is not None and phone not in match.caller:
        return f"caller {phone or '(none)'} not in {sorted(match.caller)}"
    if match.caller_regex is not None and not match.caller_regex.fullmatch(phone):
        return f"caller {phone or '(none)'} does not match /{match.caller_regex.pattern}/"
    if not (match.during or match.outside):
        return ""
    local = now.astimezone(policy.timezone)  # only for the rules that ask about the time
    for name in match.during:
        if not any(i.contains(local) for i in policy.time_intervals[name]):
            return f"{local:%a %Y-%m-%d %H:%M} is outside {name}"
    for name in match.outside:
        if any(i.contains(local) for i in policy.time_intervals[name]):
            return f"{local:%a %Y-%m-%d %H:%M} is during {name}"
    return ""


def _candidates(rule: Rule, entities: tuple[CrmEntity, ...]) -> list[CrmEntity]:
    if rule.objects == "first":
        return list(entities[:1])
    if not rule.prefer:
        return list(entities)
    rank = {entity_type: i for i, entity_type in enumerate(rule.prefer)}
    return sorted(entities, key=lambda e: rank.get(e.entity_type, len(rank)))


def _object_refusal(match: Match, entity: CrmEntity, phones: OwnerPhones) -> str:
    # Runs for every rule of every call: the reasons are only formatted when they are given.
    owner = entity.owner
    if match.entity_type is not None and entity.entity_type not in match.entity_type:
        return f"{_label(entity)}: type not in {sorted(match.entity_type)}"
    if match.owner is not None and (owner is None or owner.user_id not in match.owner):
        return f"{_label(entity)}: owner {owner.user_id if owner else '(none)'} not in {sorted(match.owner)}"
    timeman = owner.timeman_status if owner else ""
    if match.timeman is not None and timeman not in match.timeman:
        return f"{_label(entity)}: TIMEMAN_STATUS {timeman or '(empty)'} not in {sorted(match.timeman)}"
    missing = [name for name in match.has if not phones.get(name)]
    if missing:
        return f"{_label(entity)}: owner has no usable {', '.join(sorted(missing))}"
    return ""


def _label(entity: CrmEntity) -> str:
    return f"{entity.entity_type} {entity.entity_id}"


def _pick(
    rule: Rule, answer: CrmAnswer, policy: RoutingPolicy, inactive_owners: frozenset[str]
) -> tuple[CrmEntity | None, OwnerPhones, Target, list[str]] | str:
    """(entity, phones, target, passed-over reasons) for the first candidate that passes and
    has something to dial; or, when none does, the reasons as one string."""
    if not rule.uses_crm_object:
        first = _without_inactive_owner(answer.entities[0] if answer.entities else None, inactive_owners)
        return first, owner_phones(first, policy.default_country), rule.route[0], []
    candidates: Sequence[CrmEntity | None] = _candidates(rule, answer.entities)
    if not candidates and rule.match.about_crm_object:
        return f"no CRM object (status {answer.status})"
    if not candidates:
        candidates = [None]
    reasons = []
    for entity in candidates:
        phones = owner_phones(entity, policy.default_country)
        if entity is not None:
            deactivated = _deactivated_owner(entity, inactive_owners)
            if deactivated is not None:
                reasons.append(f"{_label(entity)}: owner {deactivated.user_id} is deactivated")
                continue
            refusal = _object_refusal(rule.match, entity, phones)
            if refusal:
                reasons.append(refusal)
                continue
        target = next((t for t in rule.route if _available(t, phones)), None)
        if target is None:
            wanted = ", ".join(t.describe() for t in rule.route)
            label = f"{_label(entity)}: " if entity is not None else ""
            reasons.append(f"{label}nothing to dial ({wanted} unavailable)")
            continue
        return entity, phones, target, reasons
    return "; ".join(reasons)


def _deactivated_owner(entity: CrmEntity, inactive_owners: frozenset[str]) -> Owner | None:
    """The object's owner when that owner is known to be deactivated; otherwise None."""
    owner = entity.owner
    return owner if owner is not None and owner.user_id in inactive_owners else None


def _without_inactive_owner(entity: CrmEntity | None, inactive_owners: frozenset[str]) -> CrmEntity | None:
    """The object as routing may use it: a deactivated owner is no owner."""
    if entity is not None and _deactivated_owner(entity, inactive_owners) is not None:
        return replace(entity, owner=None)
    return entity


def _available(target: Target, phones: OwnerPhones) -> bool:
    return target.kind != "owner" or bool(phones.get(target.value))


def _resolve(target: Target, phones: OwnerPhones, policy: RoutingPolicy) -> tuple[str, str]:
    """(B24_ROUTE, B24_TARGET) for a target known to be available."""
    if target.kind == "owner":
        route = "extension" if target.value == "extension" else "mobile"
        return route, phones.get(target.value)
    if target.kind == "queue":
        return "queue", target.value or policy.fallback_queue
    if target.kind == "extension":
        return "extension", target.value
    return "mobile", target.value
