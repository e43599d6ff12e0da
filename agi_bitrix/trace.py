"""A routed call explained step by step, as text: the number, the portal's answer and its CRM
objects, each rule's verdict and the variables sent.

`agi-bitrix route` (explain) prints it and the admin page shows it (web.pages), so it lives
below both.
"""

from __future__ import annotations

from agi_bitrix.callrecord import RoutedCall


def _shown(value: str) -> str:
    """A CRM field as typed (quoted, so stray spaces or junk show), or - when empty."""
    return repr(value) if value else "-"


def render(routed: RoutedCall, portal_url: str) -> str:
    lines = []
    call, answer, decision = routed.call, routed.answer, routed.decision
    lines.append(f"number:   {call.phone or '(no usable caller ID)'}    DID: {call.did or '(none)'}")
    lines.append(f"portal:   {portal_url}")
    if answer.status == "ERROR":
        lines.append(f"answer:   ERROR {answer.error} after {routed.seconds * 1000:.0f} ms")
    elif answer.status == "NO_CALLERID":
        lines.append("answer:   not asked (no usable caller ID)")
    else:
        lines.append(f"answer:   {answer.status}, {len(answer.entities)} CRM object(s)"
                     f" in {routed.seconds * 1000:.0f} ms")
    for index, entity in enumerate(answer.entities, start=1):
        owner = entity.owner
        if owner is None:
            lines.append(f"  {index}. {entity.entity_type} {entity.entity_id}, no owner")
            continue
        lines.append(
            f"  {index}. {entity.entity_type} {entity.entity_id}, owner {owner.user_id}"
            f" TIMEMAN_STATUS={owner.timeman_status or '(empty)'}"
            f" inner={_shown(owner.inner_phone)} mobile={_shown(owner.personal_mobile)}"
            f" work={_shown(owner.work_phone)} personal={_shown(owner.personal_phone)}"
        )
    lines.append("rules:")
    for step in decision.trace:
        mark = "=>" if step.decided else "  "
        lines.append(f"  {mark} {step.rule}: {step.reason}")
    lines.append("variables:")
    width = max(len(name) for name in routed.variables)
    for name, value in routed.variables.items():
        lines.append(f"  {name.ljust(width)} = {value}")
    return "\n".join(lines)
