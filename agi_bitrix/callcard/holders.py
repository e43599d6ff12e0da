"""Who has each call's card on screen, as this server asked the portal (callcard/cards.py).

Register's SHOW adds the registered user, each ring its user; the answer keeps only the one who
answered; finish forgets the call. Kept in memory for the life of the process (reloads keep it).
"""

from __future__ import annotations

from collections import OrderedDict

# Calls remembered; a call that is never finished here (its finish went to another server) is
# forgotten once this many newer ones came.
MAX_CALLS = 10_000


class CardHolders:
    """Who has each call's card on screen, as this server asked the portal; lives as long as the
    process."""

    def __init__(self, max_calls: int = MAX_CALLS) -> None:
        self._calls: OrderedDict[str, set[str]] = OrderedDict()
        self._max_calls = max_calls

    def add(self, call_id: str, user_id: str) -> bool:
        """Note that `user_id` sees the card; False when they already did."""
        holders = self._calls.get(call_id)
        if holders is None:
            holders = self._calls[call_id] = set()
            if len(self._calls) > self._max_calls:
                self._calls.popitem(last=False)
        if user_id in holders:
            return False
        holders.add(user_id)
        return True

    def keep_only(self, call_id: str, user_id: str) -> list[str]:
        """The call was answered by `user_id`: the others, who no longer hold it."""
        holders = self._calls.get(call_id, set())
        others = sorted(holders - {user_id}, key=lambda uid: (len(uid), uid))
        holders.intersection_update({user_id})
        return others

    def forget(self, call_id: str) -> None:
        self._calls.pop(call_id, None)

    def __len__(self) -> int:
        return len(self._calls)
