"""Asterisk's manager interface (AMI), for the calls the server starts itself.

`protocol`: the wire format without sockets (bytes in, messages out; actions serialized with
every injection refused); `client`: one asyncio connection that logs in, sends actions with a
timeout, reconnects by itself and hands events to listeners through a bounded queue;
`originate`: an Async Originate and its outcome; `settings`: the `ami:` section and its secret;
`errors`: the exception tree. Like `agi/`, it imports nothing of the package but `schema` and
`background`.
"""
