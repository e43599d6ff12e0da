# ruff: noqa: E501 -- the dialplan lines are FreePBX's own, unwrapped as it generates them
r"""Stand-ins for the dialplan FreePBX generates, as far as the samples' calls go through it.

Each context follows the generator named in its comment, in the FreePBX/core repository
(functions.inc.php, branches release/16.0 and release/17.0, the same logic in both) or
FreePBX/queues (functions.inc/dialplan.php). They are written in FreePBX 17's form, where the
generated macro-* contexts run as Gosub() and end in Return(); FreePBX 16 runs the same bodies
with Macro() (app_macro, which Asterisk 21+ no longer has). What they leave out: features the
samples' calls never reach (intercom, call forwarding, recording, follow-me, hot desks, VMX
menus); AstDB lookups stay as FreePBX writes them and find nothing, as for an external caller.

The phones, voicemail and the trunk are the test stand-ins of conftest.STAND_IN_CONTEXTS; the
voicemail box answers (Answer(), as VoiceMail() does) and reports AgiBitrixTestVoicemail.
"""

from agi_bitrix.testing.pbx_harness import AsteriskBuild

# The company number an Outbound Route sends as caller ID (the route's "Route CID").
ROUTE_CID = "74950000000"


def queue_call(build: AsteriskBuild) -> str:
    """ext-queues' Queue() line, as FreePBX writes it for this Asterisk: FreePBX/queues
    dialplan.php passes Queue(queuename,options,URL,announceoverride,timeout,AGI,macro,gosub,
    rule,position) with an empty macro; Asterisk 21+ has no macro argument (apps/app_queue.c
    on branch 22: ...,AGI,gosub,rule,position), so there the gosub moves one place left."""
    macro = ["${QMACRO}"] if build.major < 21 else []
    return ",".join(["${EXTEN}", "${QOPTIONS}", "", "${QAANNOUNCE}", "${QMAXWAIT}", "${QAGI}", *macro,
                     "${QGOSUB}", "${QRULE}", "${QPOSITION}"])


def freepbx_dialplan(build: AsteriskBuild) -> str:
    return r"""
; Trunk 1 (core writes OUT_N and OUT_N_SUFFIX of each trunk into [globals]) is the stand-in
; trunk; TRUNK_RING_TIMER and TRUNK_OPTIONS as Settings > Advanced Settings set them (ours).
[globals](+)
OUT_1=Local
OUT_1_SUFFIX=@agi-bitrix-test-outbound
TRUNK_RING_TIMER=300
TRUNK_OPTIONS=T

; An inbound route (core: ext-did / from-pstn) whose destination is the custom destination
; custom-agi-bitrix,s,1: FROM_DID carries the dialled number.
[from-pstn]
exten => _X.,1,Set(__FROM_DID=${EXTEN})
 same => n,Goto(custom-agi-bitrix,s,1)

; from-internal: extensions (core: ext-local, included through from-internal-additional) and an
; Outbound Route for numbers in international digits (core: outrt-N).
[from-internal]
include => ext-local
include => outrt-1

; core functions.inc.php, "ext-local": one extension with voicemail, for every 1XX.
[ext-local]
exten => _1XX,1,Set(__RINGTIMER=${IF($["${DB(AMPUSER/${EXTEN}/ringtimer)}" > "0"]?${DB(AMPUSER/${EXTEN}/ringtimer)}:${RINGTIMER_DEFAULT})})
 same => n,Gosub(macro-exten-vm,s,1(${EXTEN},${EXTEN},0,0,0))
 same => n,Goto(vmret,1)
exten => vmret,1,GotoIf($["${IVR_RETVM}" = "RETURN" & "${IVR_CONTEXT}" != ""]?playret)
 same => n,Hangup()
 same => n(playret),Hangup()

; core functions.inc.php, "macro-exten-vm" (ARG1 voicemail box, ARG2 extension, ARG3-5: a
; no-answer/busy/unavailable destination exists). The phone is rung by macro-dial-one; here a
; Dial() of the stand-in phone for the ring time RT.
[macro-exten-vm]
exten => s,1,Set(RingGroupMethod=none)
 same => n,Set(__EXTTOCALL=${ARG2})
 same => n,Set(__PICKUPMARK=${ARG2})
 same => n,Set(RT=${IF($["${ARG1}"!="novm" | "${DB(CFU/${EXTTOCALL})}"!="" | "${DB(CFB/${EXTTOCALL})}"!="" | "${ARG3}"="1" | "${ARG4}"="1" | "${ARG5}"="1"]?${RINGTIMER}:)})
 same => n,Dial(Local/${EXTTOCALL}@agi-bitrix-test-phones,${RT})
 same => n,Set(SV_DIALSTATUS=${DIALSTATUS})
 same => n,Set(DIALSTATUS=${SV_DIALSTATUS})
 same => n,ExecIf($[("${DIALSTATUS}"="NOANSWER"&"${ARG3}"="1")|("${DIALSTATUS}"="BUSY"&"${ARG4}"="1")|("${DIALSTATUS}"="CHANUNAVAIL"&"${ARG5}"="1")]?Return())
 same => n,GotoIf($["${ARG1}"="novm"]?s-${DIALSTATUS},1)
 same => n,Gosub(macro-vm,s,1(${ARG1},${DIALSTATUS},${IVR_RETVM}))
 same => n,Return()
exten => s-BUSY,1,PlayTones(busy)
 same => n,Busy(20)
exten => _s-!,1,PlayTones(congestion)
 same => n,Congestion(10)

; core functions.inc.php, "macro-vm": a call that someone blocked from voicemail (BLKVM) is
; hung up; any other reaches the box, which answers.
[macro-vm]
exten => s,1,Gosub(macro-blkvm-check,s,1)
 same => n,GotoIf($["${GOSUB_RETVAL}" != "TRUE"]?vmx,1)
 same => n,NoOp(CAME FROM: ${NODEST} - Blocking VM macro-blkvm-check returned TRUE)
 same => n,Hangup()
exten => vmx,1,Set(MEXTEN=${ARG1})
 same => n,Set(MMODE=${ARG2})
 same => n,Goto(agi-bitrix-test-voicemail,${MEXTEN},1)

; core functions.inc.php, "macro-blkvm-set" / "-clr" / "-check" (the SHARED() form). The
; missing $ in "{ARG1}" is FreePBX's own: the reset argument never takes effect.
[macro-blkvm-set]
exten => s,1,ExecIf($[!${EXISTS(${BLKVM_CHANNEL})} | "{ARG1}" = "reset"]?Set(__BLKVM_CHANNEL=${CHANNEL}))
 same => n,Set(SHARED(BLKVM,${BLKVM_CHANNEL})=TRUE)
 same => n,Set(GOSUB_RETVAL=TRUE)
 same => n,Return()

[macro-blkvm-clr]
exten => s,1,Set(SHARED(BLKVM,${BLKVM_CHANNEL})=)
 same => n,Set(GOSUB_RETVAL=)
 same => n,Return()

[macro-blkvm-check]
exten => s,1,Set(GOSUB_RETVAL=${SHARED(BLKVM,${BLKVM_CHANNEL})})
 same => n,ExecIf($["${GOSUB_RETVAL}"="" & "${CC_RECALL}"="1"]?Set(GOSUB_RETVAL=TRUE))
 same => n,Return(${GOSUB_RETVAL})

; core functions.inc.php, outbound routes ("outrt-"): a route with a Route CID (not forced):
; the company number, unless KEEPCID=TRUE; then one trunk, 1, through macro-dialout-trunk
; (ARG1 trunk, ARG2 number, ARG3 route password, ARG4 "continue" on failure); when it returns (the
; trunk failed), macro-outisbusy's congestion.
[outrt-1]
exten => _7XXXXXXXXXX,1,Set(REALCALLERIDNUM=${IF($["${REALCALLERIDNUM}" = ""]?${CALLERID(number)}:${REALCALLERIDNUM})})
 same => n,ExecIf($["${KEEPCID}"!="TRUE" & ${LEN(${DB(AMPUSER/${AMPUSER}/outboundcid)})}=0 & ${LEN(${TRUNKCIDOVERRIDE})}=0]?Set(TRUNKCIDOVERRIDE=""" + ROUTE_CID + r"""))
 same => n,Set(_CALLERIDNUMINTERNAL=${CALLERID(num)})
 same => n,Gosub(macro-dialout-trunk,s,1(1,${EXTEN},,))
 same => n,Congestion(20)

; core functions.inc.php, "macro-dialout-trunk" (release/16.0 and release/17.0), the steps of a
; trunk that has no dial options, channel limit, prefix rules or PIN of its own: the trunk's Dial
; options, macro-outbound-callerid, OUTNUM, then at "gocall" the hook an installation may fill,
; dialout-trunk-predial-hook (etc/extensions.conf defines it blank, after extensions_custom.conf),
; then the Dial() (in 17 moved into trunk-dial-with-exten) and what each DIALSTATUS leads to.
; Left out: the announcements before s-NOANSWER's congestion, and the trunk argument of
; func-apply-sipheaders. Trunk 1 dials the stand-in trunk (OUT_1, OUT_1_SUFFIX below).
[macro-dialout-trunk]
exten => s,1,Set(DIAL_TRUNK=${ARG1})
 same => n,Set(DIAL_NUMBER=${ARG2})
 same => n,Set(DIAL_TRUNK_OPTIONS=${DIAL_OPTIONS})
 same => n,Set(OUTBOUND_GROUP=OUT_${DIAL_TRUNK})
 same => n,Set(DIAL_TRUNK_OPTIONS=${IF($["${DB_EXISTS(TRUNK/${DIAL_TRUNK}/dialopts)}" = "1"]?${DB_RESULT}:${TRUNK_OPTIONS})})
 same => n(nomax),Gosub(macro-outbound-callerid,s,1(${DIAL_TRUNK}))
 same => n,Set(OUTNUM=${OUTPREFIX_${DIAL_TRUNK}}${DIAL_NUMBER})
 same => n(gocall),Gosub(macro-dialout-trunk-predial-hook,s,1)
 same => n,GotoIf($["${PREDIAL_HOOK_RET}" = "BYPASS"]?bypass,1)
 same => n,Gosub(trunk-dial-with-exten,${DIAL_NUMBER},1)
 same => n,NoOp(Dial failed for some reason with DIALSTATUS = ${DIALSTATUS} and HANGUPCAUSE = ${HANGUPCAUSE})
 same => n,Goto(s-${DIALSTATUS},1)
exten => s-BUSY,1,PlayTones(busy)
 same => n,Busy(20)
exten => s-ANSWER,1,Hangup()
exten => s-NOANSWER,1,Progress()
 same => n,Congestion(20)
; Any other status: on to the route's next trunk (FreePBX goes there through HANGUPCAUSE).
exten => _s-.,1,Goto(continue,1)
exten => continue,1,ExecIf($["${AMPUSER}"!="" ]?Set(CALLERID(number)=${AMPUSER}))
 same => n,Return()
exten => bypass,1,Return()

[trunk-dial-with-exten]
exten => _[+-X].,1,Dial(${OUT_${DIAL_TRUNK}}/${OUTNUM}${OUT_${DIAL_TRUNK}_SUFFIX},${TRUNK_RING_TIMER},${DIAL_TRUNK_OPTIONS}b(func-apply-sipheaders^s^1))
 same => n,Return()

[func-apply-sipheaders]
exten => s,1,Return()

; core etc/extensions.conf (release/17.0; 16.0 ends it with MacroExit()): the hook, blank. The
; sample's own definition came first (extensions_custom.conf), so this line is refused as a
; duplicate, as on FreePBX.
[macro-dialout-trunk-predial-hook]
exten => s,1,Return()

; core functions.inc.php, "macro-outbound-callerid" (ARG1: the trunk), the steps that decide
; the number; trunk 1 sets no CID of its own and OUTKEEPCID_1 is off ("Allow Any CID").
[macro-outbound-callerid]
exten => s,1,ExecIf($["${REALCALLERIDNUM:1:2}" = ""]?Set(REALCALLERIDNUM=${CALLERID(number)}))
 same => n(start),GotoIf($[ $[${LEN(${REALCALLERIDNUM})} = 0] | $["${KEEPCID}" != "TRUE"] | $["${OUTKEEPCID_${ARG1}}" = "on"] ]?normcid)
 same => n,Set(USEROUTCID=${CALLERID(name)} <${REALCALLERIDNUM}>)
 same => n,GotoIf($["${CIDMASQUERADING}" = "TRUE"]?normcid)
 same => n,GotoIf($["${DB(AMPUSER/${REALCALLERIDNUM}/device)}" = "" & "${DB(DEVICE/${REALCALLERIDNUM}/user)}" = ""]?bypass)
 same => n(normcid),Set(USEROUTCID=${DB(AMPUSER/${AMPUSER}/outboundcid)})
 same => n(bypass),Set(TRUNKOUTCID=${OUTCID_${ARG1}})
 same => n(trunkcid),ExecIf($[${LEN(${TRUNKOUTCID})} != 0]?Set(CALLERID(all)=${TRUNKOUTCID}))
 same => n(usercid),ExecIf($[${LEN(${USEROUTCID})} != 0]?Set(CALLERID(all)=${USEROUTCID}))
 same => n,ExecIf($[${LEN(${TRUNKCIDOVERRIDE})} != 0 | ${LEN(${FORCEDOUTCID_${ARG1}})} != 0]?Set(CALLERID(all)=${IF($[${LEN(${FORCEDOUTCID_${ARG1}})}=0]?${TRUNKCIDOVERRIDE}:${FORCEDOUTCID_${ARG1}})}))
 same => n,ExecIf($[${LEN(${CALLERIDNUMINTERNAL})} = 0 & ${LEN(${AMPUSER})} = 0 & ${LEN(${USEROUTCID})} = 0 & "${OUTKEEPCID_${ARG1}}" ="off" & ${LEN(${REALCALLERIDNUM})} != 0 ]?Set(CALLERID(all)=${REALCALLERIDNUM}))
 same => n,Return()

; FreePBX/queues functions.inc/dialplan.php, "ext-queues": voicemail blocked while the call
; waits (blkvm-set, and U(macro-auto-blkvm) for the members), the options (t, with "answered
; elsewhere", ring and retry settings appended; a Virtual Queue's VQ_OPTIONS replaces the t), the
; member gosub QGOSUB (a Virtual Queue's VQ_GOSUB wins), Queue(), then the block lifted.
[ext-queues]
exten => _4XX,1,Set(__FROMQUEUEEXTEN=${CALLERID(number)})
 same => n,Gosub(macro-blkvm-set,s,1(reset))
 same => n,ExecIf($["${REGEX("(M[(]auto-blkvm[)])" ${DIAL_OPTIONS})}" != "1"]?Set(_DIAL_OPTIONS=${DIAL_OPTIONS}U(macro-auto-blkvm)))
 same => n,Set(__NODEST=${EXTEN})
 same => n,Set(QCANCELMISSED=)
 same => n,Set(QRETRY=${IF($[${LEN(${VQ_RETRY})}>0]?${VQ_RETRY}: )})
 same => n,Set(VQ_RETRY=)
 same => n(qoptions),Set(QOPTIONS=${IF($[${LEN(${VQ_OPTIONS})}>0]?${VQ_OPTIONS}:t)}${QCANCELMISSED}${QRINGOPTS}${QRETRY})
 same => n,Set(VQ_OPTIONS=)
 same => n(qgosub),Set(QGOSUB=${IF($[${LEN(${VQ_GOSUB})}>0]?${VQ_GOSUB}:${QGOSUB})})
 same => n,Set(VQ_GOSUB=)
 same => n,Set(QUEUENUM=${EXTEN})
 same => n(qcall),Queue(""" + queue_call(build) + r""")
 same => n,Gosub(macro-blkvm-clr,s,1)
 same => n,Set(__NODEST=)

; core Dialplan/macroAutoBlkvm.php (release/17.0), "macro-auto-blkvm": run on the member who
; answers a queue or ring group; lifts the voicemail block so that transfers work again.
[macro-auto-blkvm]
exten => s,1,Set(__MACRO_RESULT=)
 same => n,Set(CFIGNORE=)
 same => n,Set(FORWARD_CONTEXT=from-internal)
 same => n,Gosub(macro-blkvm-clr,s,1)
 same => n,Return()
"""
