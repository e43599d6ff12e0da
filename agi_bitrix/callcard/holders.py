"""Who has each call's card on screen, as this server asked the portal (callcard/cards.py).

Register's SHOW adds the registered user, each ring its user; the answer keeps only the one who
answered; finish forgets the call and hides the card from whoever still holds it (but the finish's
user, whose card the portal's finish closes). Kept in memory for the life of the process (reloads keep it).
"""

from __future__ import annotations

from collections import OrderedDict

# Calls remembered; a call that is never finished here (its finish went to another server) is
# forgotten once this many newer ones came.
MAX_CALLS = 10_000


def _bounded_put(mapping: OrderedDict[str, str], key: str, value: str, limit: int) -> None:
    mapping[key] = value
    mapping.move_to_end(key)
    while len(mapping) > limit:
        mapping.popitem(last=False)


class CardHolders:
    """Who has each call's card on screen, as this server asked the portal; lives as long as the
    process."""

    def __init__(self, max_calls: int = MAX_CALLS) -> None:
        self._calls: OrderedDict[str, set[str]] = OrderedDict()
        self._answered: set[str] = set()  # calls someone took: a later ring shows nothing
        self._max_calls = max_calls
        # For transfers (callcard/transfers.py): each call's Asterisk linkedid, and the user a
        # transfer handed it to; bounded like the calls, and kept when the call's holders are
        # dropped at its finish (the finish's user is decided after that; a CALL_ID never comes back).
        self._linked: OrderedDict[str, str] = OrderedDict()
        self._handed: OrderedDict[str, str] = OrderedDict()

    def add(self, call_id: str, user_id: str) -> bool:
        """Note that `user_id` sees the card; False when they already did, or the call was answered
        (a ring that arrives after the answer is a phone about to stop ringing)."""
        if call_id in self._answered:
            return False
        holders = self._calls.get(call_id)
        if holders is None:
            holders = self._calls[call_id] = set()
            if len(self._calls) > self._max_calls:
                oldest, _ = self._calls.popitem(last=False)
                self._answered.discard(oldest)
        if user_id in holders:
            return False
        holders.add(user_id)
        return True

    def keep_only(self, call_id: str, user_id: str) -> list[str]:
        """The call was answered by `user_id`: the others, who no longer hold it."""
        holders = self._calls.get(call_id, set())
        others = _in_order(holders - {user_id})
        holders.intersection_update({user_id})
        if call_id in self._calls:
            self._answered.add(call_id)
        return others

    def release(self, call_id: str) -> list[str]:
        """The call ended: forget it, and say who still held its card."""
        self._answered.discard(call_id)
        return _in_order(self._calls.pop(call_id, set()))

    # -- transfers (callcard/transfers.py) -----------------------------------------------------

    def link(self, call_id: str, linkedid: str) -> None:
        """Register's note: Asterisk's AMI events name this call by `linkedid`."""
        if linkedid:
            _bounded_put(self._linked, linkedid, call_id, self._max_calls)

    def call_of(self, linkedid: str) -> str | None:
        return self._linked.get(linkedid) if linkedid else None

    def holders_of(self, call_id: str) -> frozenset[str]:
        return frozenset(self._calls.get(call_id, ()))

    def hand_over(self, call_id: str, user_id: str) -> None:
        """A transfer gave the call to `user_id`: they alone hold the card, and finish names them."""
        holders = self._calls.setdefault(call_id, set())
        holders.clear()
        holders.add(user_id)
        self._answered.add(call_id)
        _bounded_put(self._handed, call_id, user_id, self._max_calls)

    def handed_to(self, call_id: str) -> str:
        """The user the last transfer gave the call to, or ""."""
        return self._handed.get(call_id, "")

    def __len__(self) -> int:
        return len(self._calls)


def _in_order(user_ids: set[str]) -> list[str]:
    return sorted(user_ids, key=lambda uid: (len(uid), uid))  # numeric order for numeric ids
