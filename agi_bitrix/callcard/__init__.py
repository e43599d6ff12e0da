"""The call card: telephony.externalcall.register while the call rings, finish after hangup."""
