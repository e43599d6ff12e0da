"""The outbox's two stores are storage only: the delivery policy and its loop live once, in
callcard/delivery.py (issue 21, "one delivery policy"), and each store offers the same few
methods behind delivery.Rows."""

from pathlib import Path

import pytest

from agi_bitrix.callcard.delivery import DeliveryLoop, Rows
from agi_bitrix.callcard.outbox import Outbox, SqliteRows
from agi_bitrix.callcard.redis_outbox import RedisOutbox, RedisRows


def public_members(thing):
    names = set(dir(thing)) | set(getattr(thing, "__annotations__", {}))  # dir: no property is run
    return {name for name in names if not name.startswith("_")}


@pytest.mark.parametrize("store", [SqliteRows(Path("/nonexistent/o.sqlite3")),
                                   RedisRows("redis://127.0.0.1:1/0", claim_after=60.0, prefix="p:")],
                         ids=["sqlite", "redis"])
def test_a_store_offers_what_rows_names_and_no_loop(store):
    # What a store may add beyond the protocol: its own settings and state, never a method of the loop.
    own_state = {"health", "url", "claim_after", "consumer", "held"}
    assert public_members(store) - own_state == public_members(Rows)
    assert not public_members(store) & {"start", "add", "open_or_retry_later", "waiting_of", "failed_of"}


@pytest.mark.parametrize("outbox", [Outbox, RedisOutbox])
def test_each_outbox_is_the_one_loop_around_its_store(outbox):
    # Only construction (and the Redis link's health as `problem`) is the outbox's own.
    own = {name for name in vars(outbox) if not name.startswith("__")} - {"_rows", "problem", "_held"}
    assert issubclass(outbox, DeliveryLoop) and own == set()
