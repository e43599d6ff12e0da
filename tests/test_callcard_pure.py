"""The call card's pure parts, one branch at a time, without a portal, a socket or an outbox:
the status code a call ends with, the finish's parameters, what a failed finish attempt means,
and how register and finish read (and refuse) the dialplan's values.

test_callcard.py and the Asterisk tests check the same things end to end; these name the branch
that broke. Each function is reached through its public name only, so a rewrite of how the
outbox retries changes the expectations here, not the way they are reached."""

from __future__ import annotations

import textwrap
from dataclasses import replace
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from agi_bitrix.agi.protocol import AgiRequest
from agi_bitrix.bitrix import errors
from agi_bitrix.callcard.finish import (
    FinishArguments,
    FinishService,
    finish_arguments,
    finish_expressions,
    finish_outcome,
    recording_key,
    recording_path,
)
from agi_bitrix.callcard.holders import CardHolders
from agi_bitrix.callcard.register import (
    INCOMING,
    RegisterArguments,
    RegisterService,
    created_in_crm,
    register_arguments,
    register_expressions,
    responsible_user,
)
from agi_bitrix.callcard.status import ANSWERED, MISSED, status_code
from agi_bitrix.config import parse_config

CALL_ID = "externalCall.0a1b2c3d4e5f.1700000000"
UNIQUEID = "1700000000.42"
HANGUP = 1_700_000_100.0


def config(callcard: str = "", country: str = ""):
    """A config with a call card; `callcard` is YAML under the callcard key."""
    text = textwrap.dedent("""\
        bitrix: {webhook_url: "https://portal.example/rest/1/secretcode/"}
        routing: {fallback_queue: support}
        callcard:
          outbox: /var/lib/agi-bitrix/outbox.sqlite3
        """) + textwrap.indent(textwrap.dedent(callcard), "  ")
    if country:
        text += f"phones: {{default_country: {country}}}\n"
    return parse_config(text, "callcard-pure.yaml")


RESPONSIBLE = """\
    register:
      default_user: "9"
      responsible:
        - {did: "+7 495 111-22-33", user: "5"}
        - {did: "74951112233", user: "6"}
        - {did: "+7 495 000-00-01", user: "7"}
    """


# -- the status code: DIALSTATUS and the answer stamp -------------------------------------------

@pytest.mark.parametrize("dialstatus, code", [
    ("NOANSWER", MISSED),
    ("CANCEL", MISSED),  # the caller gave up while it rang: missed, not the portal's 603-S
    ("BUSY", "486"),
    ("CONGESTION", "503"),
    ("CHANUNAVAIL", "480"),
    ("DONTCALL", "603"),
    ("TORTURE", "603"),
    ("INVALIDARGS", MISSED),
    ("", MISSED),  # no Dial ran: hung up during routing or in a queue
    ("SOMETHINGNEW", MISSED),
    (" busy ", "486"),  # as the dialplan may pass it: any case, spaces around
])
def test_an_unanswered_call_ends_with_the_code_of_its_dialstatus(dialstatus, code):
    assert status_code(False, dialstatus) == code


@pytest.mark.parametrize("dialstatus", ["ANSWER", "NOANSWER", "BUSY", "CHANUNAVAIL", ""])
def test_an_answered_call_is_200_whatever_the_last_dial_said(dialstatus):
    # A call that rang an extension in vain and was then taken from a queue ends with NOANSWER.
    assert status_code(True, dialstatus) == ANSWERED == "200"


# -- register's arguments -------------------------------------------------------------------------

def request(**env: str) -> AgiRequest:
    return AgiRequest({"agi_uniqueid": UNIQUEID, **env})


def test_register_takes_each_value_from_the_dialplan():
    arguments = register_arguments([" 89161234567 ", "12", "1700000000.1", "+7 495 111-22-33", "contact", "61"],
                                   request(agi_callerid="79990000000", agi_extension="74990000000"), "RU")
    assert arguments == RegisterArguments(phone="79161234567", owner="12", external_call_id="1700000000.1",
                                          did="74951112233", entity_type="CONTACT", entity_id="61")


def test_register_without_values_falls_back_to_the_agi_header():
    arguments = register_arguments([], request(agi_callerid="89161234567", agi_extension="74951112233"), "RU")
    assert arguments == RegisterArguments(phone="79161234567", owner="", external_call_id=UNIQUEID,
                                          did="74951112233", entity_type="", entity_id="")


@pytest.mark.parametrize("callerid", ["", "unknown", "anonymous"])
def test_register_has_no_phone_when_neither_the_value_nor_the_caller_id_is_a_number(callerid):
    assert register_arguments([""], request(agi_callerid=callerid), "RU").phone is None


@pytest.mark.parametrize("owner", ["", "abc", "1 2", "-5", "1" * 21, "١٢", "12;DROP"])
def test_register_drops_an_owner_that_is_not_a_user_id(owner):
    assert register_arguments(["79161234567", owner], request(), "RU").owner == ""


@pytest.mark.parametrize("linkedid, uniqueid, expected", [
    ("1700000000.1", UNIQUEID, "1700000000.1"),
    ("", UNIQUEID, UNIQUEID),
    ("bad id/with slash", UNIQUEID, UNIQUEID),
    ("x" * 129, UNIQUEID, UNIQUEID),
    ("bad id", "also bad", ""),
])
def test_register_takes_the_first_usable_call_id_for_the_external_id(linkedid, uniqueid, expected):
    arguments = register_arguments(["79161234567", "", linkedid], AgiRequest({"agi_uniqueid": uniqueid}), "RU")
    assert arguments.external_call_id == expected


@pytest.mark.parametrize("entity_type, entity_id, expected", [
    ("CONTACT", "61", ("CONTACT", "61")),
    ("company", "12", ("COMPANY", "12")),
    ("LEAD", "1000", ("LEAD", "1000")),
    ("DEAL", "5", ("", "")),  # register binds a contact, a company or a lead only
    ("CONTACT", "", ("", "")),
    ("CONTACT", "6x", ("", "")),
    ("CONTACT", "٦١", ("", "")),  # Arabic-Indic digits pass str.isdigit(), not the portal
    ("", "61", ("", "")),
])
def test_register_binds_a_crm_object_only_with_a_known_type_and_a_plain_id(entity_type, entity_id, expected):
    arguments = register_arguments(["79161234567", "", "", "", entity_type, entity_id], request(), "RU")
    assert (arguments.entity_type, arguments.entity_id) == expected


def test_register_has_no_did_when_neither_the_value_nor_the_extension_is_a_number():
    assert register_arguments(["79161234567"], request(agi_extension="s"), "RU").did == ""


def test_the_samples_register_and_finish_expressions_use_the_variable_prefix():
    assert register_expressions("X_")[:2] == ("${X_PHONE}", "${X_USER_ID}")
    assert register_expressions("B24_")[4:] == ("${B24_ENTITY_TYPE}", "${B24_ENTITY_ID}")
    assert finish_expressions("X_")[:2] == ("${X_CALL_ID}", "${X_USER_ID}")
    assert "${DIALSTATUS}" in finish_expressions("X_") and len(finish_expressions("X_")) == 7


# -- who takes a call without an owner -------------------------------------------------------------

def test_the_first_responsible_entry_for_the_did_takes_the_call():
    settings = config(RESPONSIBLE).callcard.register
    assert responsible_user(settings, "74951112233") == "5"  # listed twice: the first one
    assert responsible_user(settings, "74950000001") == "7"


@pytest.mark.parametrize("did", ["", "74990000000"])
def test_without_a_responsible_entry_the_default_user_takes_the_call(did):
    assert responsible_user(config(RESPONSIBLE).callcard.register, did) == "9"
    assert responsible_user(config().callcard.register, did) == ""


# -- register's parameters and answer -----------------------------------------------------------

CALLER = RegisterArguments(phone="79161234567", owner="12", external_call_id=UNIQUEID, did="74951112233",
                           entity_type="", entity_id="")


def register_params(callcard: str, arguments: RegisterArguments = CALLER, user_id: str = "12"):
    service = RegisterService(config(callcard), portal=None, holders=CardHolders())
    return service.register_params(arguments, user_id)


def test_register_params_for_a_call_with_the_defaults():
    before = datetime.now(UTC).replace(microsecond=0)
    params = register_params("")
    started = datetime.fromisoformat(params.pop("CALL_START_DATE"))  # ISO 8601 with its offset, to the second
    assert started.tzinfo is not None and before <= started <= datetime.now(UTC)
    assert params == {
        "USER_ID": "12", "PHONE_NUMBER": "79161234567", "TYPE": INCOMING, "CRM_CREATE": False, "SHOW": True,
        "LINE_NUMBER": "74951112233", "EXTERNAL_CALL_ID": UNIQUEID,
    }


def test_register_params_name_the_line_the_source_and_the_crm_object_when_given():
    params = register_params("""\
        register: {line_number: "office", crm_source: "CALL", crm_create: true, show: false}
        """, replace(CALLER, entity_type="COMPANY", entity_id="12"))
    assert params["LINE_NUMBER"] == "office" and params["CRM_SOURCE"] == "CALL"
    assert (params["CRM_CREATE"], params["SHOW"]) == (True, False)
    assert (params["CRM_ENTITY_TYPE"], params["CRM_ENTITY_ID"]) == ("COMPANY", "12")


def test_register_params_leave_out_the_source_and_the_crm_object_when_not_given():
    assert {"CRM_SOURCE", "CRM_ENTITY_TYPE", "CRM_ENTITY_ID"}.isdisjoint(register_params(""))


def test_what_register_created_in_the_crm_is_read_from_its_answer():
    created = created_in_crm({
        "CRM_CREATED_ENTITIES": [{"ENTITY_TYPE": "lead", "ENTITY_ID": 1000}, {"ENTITY_TYPE": "CONTACT",
                                                                            "ENTITY_ID": "70"}],
        "CRM_CREATED_LEAD": "1000",  # named again in the list: not twice
    })
    assert (created.entities, created.lead_error) == (["LEAD:1000", "CONTACT:70"], "")


def test_an_older_portal_names_the_lead_only_in_crm_created_lead():
    assert created_in_crm({"CRM_CREATED_LEAD": 1001}).entities == ["LEAD:1001"]


@pytest.mark.parametrize("listed", [
    None, "LEAD:1", [None, "LEAD:1", 7],
    [{"ENTITY_TYPE": "LEAD", "ENTITY_ID": "x1"}],
    [{"ENTITY_TYPE": "LEAD", "ENTITY_ID": "1" * 21}],
    [{"ENTITY_TYPE": "LE AD", "ENTITY_ID": "1"}],
    [{"ENTITY_TYPE": "", "ENTITY_ID": "1"}],
    [{"ENTITY_ID": "1"}],
])
def test_created_entities_of_an_unknown_shape_are_left_out(listed):
    assert created_in_crm({"CRM_CREATED_ENTITIES": listed, "CRM_CREATED_LEAD": "no"}).entities == []


@pytest.mark.parametrize("error, text", [
    (None, ""), ("", ""), (False, ""),
    ("Leads are\n switched\toff ", "Leads are switched off"),
    ("bell\x07 and \x1b[31mcolour", "bell and [31mcolour"),
    ("x" * 500, "x" * 200),
])
def test_the_lead_creation_error_is_kept_as_one_printable_line(error, text):
    assert created_in_crm({"LEAD_CREATION_ERROR": error}).lead_error == text


# -- finish's arguments ---------------------------------------------------------------------------

def test_finish_takes_each_value_from_the_dialplan():
    arguments = finish_arguments([CALL_ID, "12", "answer", "1700000040.250", "PJSIP/101-0000001a", "1700000100.5",
                                  "/var/spool/asterisk/monitor/rec-1.wav", "+7 495 111-22-33"], "RU")
    assert arguments == FinishArguments(call_id=CALL_ID, owner="12", dialstatus="ANSWER", answered_at=1700000040.25,
                                        answered_by="PJSIP/101-0000001a", hangup_at=1700000100.5,
                                        recording="rec-1.wav", did="74951112233")


def test_finish_without_values_has_nothing_to_finish():
    assert finish_arguments([], "RU") == FinishArguments(call_id="", owner="", dialstatus="", answered_at=None,
                                                         answered_by="", hangup_at=None, recording="", did="")


@pytest.mark.parametrize("call_id", ["", "has space", "a/b", "x" * 129])
def test_finish_drops_a_call_id_it_could_not_have_registered(call_id):
    assert finish_arguments([call_id], "RU").call_id == ""


@pytest.mark.parametrize("dialstatus, kept", [
    ("noanswer", "NOANSWER"), ("BUSY", "BUSY"), ("", ""), ("BUSY,1", ""), ("NO ANSWER", ""), ("X" * 21, ""),
])
def test_finish_keeps_a_dialstatus_of_letters_only(dialstatus, kept):
    assert finish_arguments([CALL_ID, "", dialstatus], "RU").dialstatus == kept


@pytest.mark.parametrize("stamp, seconds", [
    ("1700000040", 1700000040.0), ("1700000040.125", 1700000040.125), ("", None), ("soon", None),
    ("0", None), ("-5", None), ("inf", None), ("nan", None),
])
def test_finish_reads_asterisks_clock_or_nothing(stamp, seconds):
    arguments = finish_arguments([CALL_ID, "", "", stamp, "", stamp], "RU")
    assert (arguments.answered_at, arguments.hangup_at) == (seconds, seconds)


def test_finish_keeps_only_the_recordings_file_name():
    assert finish_arguments([CALL_ID, "", "", "", "", "", "../../etc/passwd"], "RU").recording == "passwd"


# -- finish's parameters -----------------------------------------------------------------------

class Directory:
    """The user directory's one question finish asks: who has this extension or mobile."""

    def __init__(self, **users_by_number: str) -> None:
        self.users_by_number = users_by_number

    def by_number(self, number: str):
        user_id = self.users_by_number.get(number)
        return SimpleNamespace(user_id=user_id) if user_id else None


def finish_params(values: list[str], callcard: str = "", users: Directory | None = None):
    cfg = config(callcard)
    service = FinishService(cfg, outbox=None, users=users, holders=CardHolders(), clock=lambda: HANGUP)
    return service.finish_params(finish_arguments(values, cfg.policy.default_country), UNIQUEID)


def test_an_answered_call_lasts_from_its_answer_to_its_hangup_rounded():
    params = finish_params([CALL_ID, "12", "ANSWER", "1700000040.2", "", "1700000100.9"])
    assert params == {"CALL_ID": CALL_ID, "USER_ID": "12", "DURATION": 61, "STATUS_CODE": "200"}


def test_without_a_hangup_stamp_the_servers_clock_ends_the_call():
    assert finish_params([CALL_ID, "12", "", str(HANGUP - 30)])["DURATION"] == 30


def test_a_hangup_stamp_before_the_answer_is_no_negative_duration():
    params = finish_params([CALL_ID, "12", "ANSWER", "1700000100", "", "1700000090"])
    assert (params["DURATION"], params["STATUS_CODE"]) == (0, "200")


def test_an_answer_stamp_makes_the_call_answered_whatever_the_dialstatus():
    # Rang the extension in vain (NOANSWER), then a queue member took it.
    assert finish_params([CALL_ID, "12", "NOANSWER", "1700000040"])["STATUS_CODE"] == "200"


def test_dialstatus_answer_without_a_stamp_is_answered_with_no_talk_time():
    params = finish_params([CALL_ID, "12", "ANSWER"])
    assert (params["DURATION"], params["STATUS_CODE"]) == (0, "200")


@pytest.mark.parametrize("dialstatus, code", [("NOANSWER", "304"), ("BUSY", "486"), ("", "304")])
def test_an_unanswered_call_lasts_nothing_and_ends_with_its_dialstatus(dialstatus, code):
    assert finish_params([CALL_ID, "12", dialstatus]) == {
        "CALL_ID": CALL_ID, "USER_ID": "12", "DURATION": 0, "STATUS_CODE": code}


def test_the_user_whose_phone_answered_gets_the_call():
    users = Directory(**{"101": "3"})
    assert finish_params([CALL_ID, "12", "ANSWER", "1700000040", "PJSIP/101-0000001a"], users=users)["USER_ID"] == "3"


@pytest.mark.parametrize("answered_by, users", [
    ("PJSIP/199-0000001a", Directory(**{"101": "3"})),  # the directory does not know that phone
    ("", Directory(**{"101": "3"})),
    ("PJSIP/101-0000001a", None),  # no user directory
])
def test_without_a_known_answering_user_the_owner_keeps_the_call(answered_by, users):
    assert finish_params([CALL_ID, "12", "ANSWER", "1700000040", answered_by], users=users)["USER_ID"] == "12"


def test_an_unanswered_call_stays_with_its_owner_even_if_a_phone_is_named():
    users = Directory(**{"101": "3"})
    assert finish_params([CALL_ID, "12", "NOANSWER", "", "PJSIP/101-0000001a"], users=users)["USER_ID"] == "12"


@pytest.mark.parametrize("did, user", [("+7 495 111-22-33", "5"), ("", "9"), ("74990000000", "9")])
def test_a_call_without_an_owner_goes_to_the_dids_responsible_else_the_default_user(did, user):
    assert finish_params([CALL_ID, "", "NOANSWER", "", "", "", "", did], RESPONSIBLE)["USER_ID"] == user


def test_a_call_without_any_user_is_not_finished(caplog):
    assert finish_params([CALL_ID, "", "NOANSWER"]) is None
    assert f"finish {CALL_ID} has no user" in caplog.text


RECORD_URL = """\
    finish: {record_url: "https://pbx.example/records/{call_id}/{uniqueid}/{recording}"}
    """


def test_an_answered_call_names_its_recording_with_each_value_quoted():
    params = finish_params([CALL_ID, "12", "ANSWER", "1700000040", "", "", "rec 1&x=2.wav"], RECORD_URL)
    assert params["RECORD_URL"] == f"https://pbx.example/records/{CALL_ID}/{UNIQUEID}/rec%201%26x%3D2.wav"


@pytest.mark.parametrize("values, callcard", [
    ([CALL_ID, "12", "NOANSWER", "", "", "", "rec-1.wav"], RECORD_URL),  # nobody talked: nothing recorded
    ([CALL_ID, "12", "ANSWER", "1700000040", "", "", ""], RECORD_URL),  # the template needs a file name
    ([CALL_ID, "12", "ANSWER", "1700000040", "", "", "rec-1.wav"], ""),  # no record_url configured
])
def test_no_record_url_without_an_answer_a_file_name_or_a_template(values, callcard):
    assert "RECORD_URL" not in finish_params(values, callcard)


def test_a_record_url_without_the_file_name_needs_none():
    callcard = 'finish: {record_url: "https://pbx.example/records/{uniqueid}.wav"}\n'
    params = finish_params([CALL_ID, "12", "ANSWER", "1700000040"], callcard)
    assert params["RECORD_URL"] == f"https://pbx.example/records/{UNIQUEID}.wav"


# -- the recording's file and outbox key ------------------------------------------------------------

def test_a_recording_path_is_the_template_filled_in():
    path = recording_path("/var/spool/asterisk/monitor/{uniqueid}-{recording}", call_id=CALL_ID, uniqueid=UNIQUEID,
                          recording="in.wav")
    assert path == f"/var/spool/asterisk/monitor/{UNIQUEID}-in.wav"


@pytest.mark.parametrize("recording", ["", "..", ".hidden.wav", "a/b.wav", "x" * 201, "rec 1.wav"])
def test_a_recording_path_with_a_value_that_could_leave_the_folder_is_refused(recording):
    assert recording_path("/monitor/{recording}", call_id=CALL_ID, uniqueid=UNIQUEID, recording=recording) is None


def test_a_value_the_template_does_not_use_is_not_checked():
    assert recording_path("/monitor/{uniqueid}.wav", call_id=CALL_ID, uniqueid=UNIQUEID, recording="../x") \
        == f"/monitor/{UNIQUEID}.wav"


def test_a_recordings_outbox_key_cannot_be_a_finishs():
    assert recording_key(CALL_ID) == f"{CALL_ID}/recording"
    assert finish_arguments([recording_key(CALL_ID)], "RU").call_id == ""  # "/" is no CALL_ID character


# -- what a failed finish attempt means ------------------------------------------------------------

def call_not_found() -> errors.BitrixError:
    """The portal's answer to finishing a call it no longer has open (the emulator's wording, from
    the portal's: "Call is not found (call should be registered prior to finishing)")."""
    return errors.refusal("ERROR_CORE", "Call is not found (call should be registered prior to finishing)")


@pytest.mark.parametrize("error", [
    errors.PortalTimeout("timeout", "no answer within 1.0 s"),
    errors.PortalUnreachable("connect", "connection refused"),
    errors.BadResponse("bad_json", "not JSON"),
    errors.RateLimited("QUERY_LIMIT_EXCEEDED", "Too many requests"),
    errors.AuthRejected("INVALID_CREDENTIALS", "Invalid request credentials"),
    errors.WrongAuthType("WRONG_AUTH_TYPE", "Current authorization type is denied for this method"),
    errors.PortalUnavailable("http_503", "Service Unavailable"),
    errors.PortalMisconfigured("NO_AUTH_FOUND", "Wrong authorization data"),
    errors.RequestNotSent("circuit_open", "the portal failed 5 times"),
    errors.TokenFileError("no such file"),
    errors.LocalFault("session_closed", "the HTTP session is closed"),
])
def test_a_finish_that_failed_for_a_passing_reason_is_tried_again(error):
    for attempt in (1, 7):
        outcome = finish_outcome(error, attempt)
        assert outcome.kind == "retry" and error.reason in outcome.detail


@pytest.mark.parametrize("error", [
    errors.RequestRejected("ERROR_ARGUMENT", "Argument STATUS_CODE is invalid"),
    errors.PortalRefused("SOMETHING_NEW", "a code this server does not know"),
])
def test_a_finish_the_portal_refuses_for_what_it_says_fails_for_good(error):
    for attempt in (1, 2):
        outcome = finish_outcome(error, attempt)
        assert outcome.kind == "failed" and error.reason in outcome.detail and error.detail in outcome.detail


def test_call_not_found_on_the_first_attempt_is_a_failure():
    # Nothing of ours finished it: the call was never registered, or the portal lost it.
    assert finish_outcome(call_not_found(), 1).kind == "failed"


def test_call_not_found_after_an_attempt_whose_answer_was_lost_means_delivered():
    outcome = finish_outcome(call_not_found(), 2)
    assert (outcome.kind, outcome.detail) == ("delivered", "finished by an earlier attempt")
