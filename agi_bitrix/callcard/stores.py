"""The call card's outbox as the config asks for it: a SQLite file (outbox.py), or a stream in Redis
that several servers share (redis_outbox.py): the one of the `redis` section (`callcard.outbox:
redis`) or one of its own (a redis:// URL). Made once at start: `callcard.outbox`, its retry
policy and the Redis it names take effect only after a restart (their declarations say so).
"""

from __future__ import annotations

from agi_bitrix.callcard.outbox import Outbox, OutboxStore, RetryPolicy, Sender
from agi_bitrix.callcard.redis_outbox import RedisOutbox
from agi_bitrix.callcard_settings import SHARED_REDIS_OUTBOX, is_url
from agi_bitrix.config import Config


def make_outbox(config: Config, send: Sender) -> OutboxStore | None:
    """The outbox for `config`, not yet opened; None without a callcard section."""
    callcard = config.callcard
    if not callcard.enabled:
        return None
    retry = callcard.finish
    policy = RetryPolicy(retry.retry_first, retry.retry_max, retry.give_up_after)
    if callcard.outbox == SHARED_REDIS_OUTBOX and config.redis is not None:
        return RedisOutbox(config.redis.url, send, policy, claim_after=callcard.outbox_claim_after,
                           prefix=f"{config.redis.key_prefix}outbox:")
    if is_url(callcard.outbox):
        return RedisOutbox(callcard.outbox, send, policy, claim_after=callcard.outbox_claim_after)
    return Outbox(callcard.outbox, send, policy)
