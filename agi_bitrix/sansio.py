"""What the two sans-IO wire protocols (agi/protocol.py, ami/protocol.py) share, kept below both
so that neither imports the other: the NEED_DATA their `next_event` answers when the bytes
received so far hold no whole event (after h11)."""

from __future__ import annotations

import enum
from typing import Final, Literal, TypeAlias


class _Sentinel(enum.Enum):
    # A one-member enum rather than a plain object, so that `event is NEED_DATA` narrows the type.
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return self.name

    __str__ = __repr__


NEED_DATA: Final = _Sentinel.NEED_DATA
NeedData: TypeAlias = Literal[_Sentinel.NEED_DATA]
