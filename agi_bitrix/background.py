"""Background tasks that live as long as the application (the outbox's delivery, the user
directory's refresh): started once, stopped by cancelling and waiting for the end."""

from __future__ import annotations

import asyncio
import contextlib


async def stop(task: asyncio.Task[None] | None) -> None:
    """Cancel `task` (if any) and wait until it has ended."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
