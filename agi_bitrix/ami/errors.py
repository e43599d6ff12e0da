"""What can go wrong talking AMI, as classes: callers decide by `isinstance`, never by message.

    AmiError
    ├── ProtocolViolation      the peer sent something that is not AMI, or too much of it
    ├── UnsafeAction           an action we were asked to send would break the framing (CR/LF, ...)
    ├── SecretUnavailable      the AMI secret is not set or its file cannot be used
    ├── LoginRefused           Asterisk answered the Login with an error (wrong user or secret, ACL)
    ├── AmiUnavailable         no logged-in connection to send on right now
    ├── ConnectionLost         the connection ended while an action waited for its answer
    │   └── OriginateOutcomeUnknown  ... after Asterisk had queued the Originate: it may still ring
    ├── ActionTimeout          no answer within the action's timeout
    └── ActionFailed           Asterisk answered `Response: Error` (the message says why)

Messages never carry the secret.
"""

from __future__ import annotations


class AmiError(Exception):
    """Anything that kept an AMI action or connection from working."""


class ProtocolViolation(AmiError):
    """The peer broke the AMI framing or a size limit; the connection is finished."""


class UnsafeAction(AmiError, ValueError):
    """An action field would inject AMI headers or cannot be framed; nothing was sent."""


class SecretUnavailable(AmiError):
    """The AMI secret is missing, or its file is not a private regular file we can read."""


class LoginRefused(AmiError):
    """Asterisk refused the Login (wrong username or secret, or the user's permit/deny)."""


class AmiUnavailable(AmiError):
    """No logged-in AMI connection right now (the message says why); nothing was sent."""


class ConnectionLost(AmiError):
    """The connection ended before the action's answer arrived."""


class OriginateOutcomeUnknown(ConnectionLost):
    """The connection ended after Asterisk queued the Originate and before its OriginateResponse:
    the call may ring anyway. Never send it again (that would ring the phone twice)."""


class ActionTimeout(AmiError):
    """No answer (or no OriginateResponse) within the timeout."""


class ActionFailed(AmiError):
    """Asterisk answered the action with `Response: Error`; str() is Asterisk's message."""
