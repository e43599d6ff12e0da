"""A small believable CRM for the demo and the tests, shaped exactly as the portal sends it.

Every object is what telephony.externalCall.searchCrmEntities returns: CRM_ENTITY_ID and
ASSIGNED_BY_ID are JSON numbers while ASSIGNED_BY.ID is a string, phones are null, empty or typed
by hand, and some values are hostile on purpose (a CRM is edited by people, so anything a person
can type reaches the dialplan). Numbers are keyed in international digits; a number that is not
here is simply not in the CRM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def _owner(
    user_id: int,
    timeman_status: str,
    *,
    inner: str | None = None,
    work: str | None = "",
    personal: str | None = "",
    mobile: str | None = "",
) -> dict[str, Any]:
    return {
        "ID": str(user_id),
        "TIMEMAN_STATUS": timeman_status,
        "USER_PHONE_INNER": inner,
        "WORK_PHONE": work,
        "PERSONAL_PHONE": personal,
        "PERSONAL_MOBILE": mobile,
    }


def _entity(entity_type: str, entity_id: int, owner: dict[str, Any], name: str) -> dict[str, Any]:
    # Field order as in the REST docs' example answer (telephony-external-call-search-crm-entities.md).
    return {
        "CRM_ENTITY_TYPE": entity_type,
        "CRM_ENTITY_ID": entity_id,
        "ASSIGNED_BY_ID": int(owner["ID"]),
        "NAME": name,
        "ASSIGNED_BY": dict(owner),
    }


_ANNA = _owner(1, "OPENED", inner="101", mobile="79161110101")
_IGOR = _owner(2, "PAUSED", inner="102", mobile="+79162220202")
_OLGA = _owner(3, "CLOSED", inner="103", work="+7 (495) 123-00-03", mobile="+7 (903) 555-12-34")
_DMITRY = _owner(4, "CLOSED", inner="104", work=None)
_ELENA = _owner(5, "UNAVAILABLE", inner="105")
_SERGEY = _owner(6, "NOT_INSTALLED", inner="106")
_MARIA = _owner(7, "", inner="107")
_PAVEL = _owner(8, "OPENED", inner="108", mobile="79208880808")
_NATALIA = _owner(9, "OPENED", inner=None, work=None, personal=None, mobile=None)
# A CRM field is free text: an "extension" that would dial a Local channel if pasted into Dial().
_ARTEM = _owner(10, "OPENED", inner="120&Local/666@evil", mobile=None)
# A newline ends an AGI command, so this "mobile" would inject a second command if passed through.
_VIKTOR = _owner(11, "CLOSED", inner="111", mobile='+79160000000\nEXEC Dial "SIP/attacker" \\"x\\\\')
_YULIA = _owner(12, "EXPIRED", inner="112", mobile="8 905 765-43-21")
# Fired: the portal does not filter out deactivated owners (see SAMPLE_USERS).
_ANDREY = _owner(13, "CLOSED", inner="113", mobile="79268889900")
# An emergency number as the "mobile": a CRM user must not be able to divert clients there.
_ROMAN = _owner(14, "CLOSED", inner="114", mobile="112")

# A CRM object's name is free text too: quotes, a comma and a semicolon, a newline that would end
# an AGI command, a dialplan function that would run if the dialplan evaluated the value, an
# emoji, and padding to 10 KB.
HOSTILE_NAME = ('${SHELL(rm -rf /)} \n Фирма "Рожки, Копытца"; \'Ltd\'\nEXEC Hangup 😀 '
                + "x" * 10_000)

SAMPLE_CRM: dict[str, list[dict[str, Any]]] = {
    # Like the documentation's example: the same owner for the contact and their company.
    "79161234567": [_entity("CONTACT", 12, _ANNA, "Иван Петров"), _entity("COMPANY", 7, _ANNA, "Romashka LLC")],
    "79262345678": [_entity("CONTACT", 27, _IGOR, "Мария Сидорова")],
    "74957654321": [_entity("COMPANY", 4, _OLGA, "Компания «Вектор»")],
    "79031234567": [_entity("CONTACT", 31, _DMITRY, "Пётр Ильин")],
    "79857778899": [_entity("LEAD", 88, _ELENA, "Заявка из формы")],
    "79104445566": [_entity("CONTACT", 40, _SERGEY, "John Doe")],
    "78123334455": [_entity("COMPANY", 9, _MARIA, "Daisy LLC")],
    # The portal usually lists contacts before leads; this answer puts the lead first to show
    # that routing follows the first object whatever its type.
    "79201112233": [_entity("LEAD", 95, _PAVEL, ""), _entity("CONTACT", 44, _ANNA, "Олег Смирнов")],
    "79651239876": [_entity("CONTACT", 52, _NATALIA, "Анна Белова")],
    "79997776655": [_entity("CONTACT", 60, _ARTEM, "Артур Ким")],
    "79035550000": [_entity("CONTACT", 61, _VIKTOR, HOSTILE_NAME)],
    "79163332211": [_entity("CONTACT", 70, _YULIA, "Юрий Орлов")],
    "74991112233": [_entity("COMPANY", 12, _ANDREY, "ИП Михайлов")],
    "79164445566": [_entity("CONTACT", 62, _ROMAN, "Роман Фёдоров мл.")],
}

# What user.get knows beyond the search answer: names and whether the account is active.
_STAFF = ["Анна Смирнова", "Игорь Петров", "Ольга Кузнецова", "Дмитрий Волков", "Елена Морозова",
          "Сергей Соколов", "Мария Лебедева", "Павел Новиков", "Наталья Козлова", "Артём Зайцев",
          "Виктор Павлов", "Юлия Васильева", "Андрей Михайлов", "Роман Фёдоров"]
_FIRED = {"13"}  # Andrey: the portal still names him as an owner, his account is deactivated
SAMPLE_USERS: dict[str, dict[str, Any]] = {
    str(number): {"NAME": name.split()[0], "LAST_NAME": name.split()[1]} | (
        {"ACTIVE": False} if str(number) in _FIRED else {})
    for number, name in enumerate(_STAFF, start=1)
}


@dataclass(frozen=True)
class SampleCall:
    """A caller the demo can play, and where the shipped default policy should send them."""

    phone: str
    route: str  # "extension", "mobile" or "queue"
    target: str  # the extension, the mobile in international digits, or the queue name
    story: str


SAMPLE_CALLS: list[SampleCall] = [
    SampleCall("79161234567", "extension", "101", "Anna is at work: ring her desk phone."),
    SampleCall("79262345678", "queue", "support", "Igor is on a break: the queue takes the call."),
    SampleCall("74957654321", "mobile", "79035551234",
               "Olga's day is closed: her hand-typed mobile +7 (903) 555-12-34 is dialled."),
    SampleCall("79031234567", "queue", "support",
               "Dmitry's day is closed and he has no mobile: the queue takes the call."),
    SampleCall("79857778899", "extension", "105",
               "Elena's time tracking is off (UNAVAILABLE): treated as at work."),
    SampleCall("79104445566", "extension", "106",
               "The time-tracking module is not installed: treated as at work."),
    SampleCall("78123334455", "extension", "107",
               "The portal has no time tracking at all (empty status): treated as at work."),
    SampleCall("79201112233", "extension", "108",
               "A lead and a contact with different owners: the first object's owner, Pavel, wins."),
    SampleCall("79651239876", "queue", "support",
               "Natalia is at work but has no phone of any kind: the queue takes the call."),
    SampleCall("79997776655", "queue", "support",
               "Artem's extension is '120&Local/666@evil': refused as not dialable."),
    SampleCall("79035550000", "queue", "support",
               "Viktor's mobile hides a newline and an EXEC command: refused as not dialable."),
    SampleCall("79163332211", "mobile", "79057654321",
               "Yulia forgot to close her day (EXPIRED): her mobile '8 905 765-43-21' is dialled."),
    SampleCall("74991112233", "queue", "support",
               "Andrey was fired, but the portal still names him owner: skipped, the queue takes the call."),
    SampleCall("79164445566", "queue", "support",
               "Roman's day is closed and his mobile is '112': an emergency number is never dialled."),
    SampleCall("79990001122", "queue", "support", "Not in the CRM: the queue takes the call."),
]
