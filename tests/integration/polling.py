"""Waiting for what the system does in the background (Prometheus scrapes, operator passes)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], within: float = 30
) -> T:
    """Poll ``probe`` until ``done(value)``; fail with the last value after ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still {value!r} after {within:.0f}s")
        await asyncio.sleep(0.25)
