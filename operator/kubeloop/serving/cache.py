"""Response cache: a bounded LRU of recent answers, each valid for ``ttl_s`` seconds.

Keyed by a hash of the request's rows (their float32 bytes and shape), so the same rows sent
through V1 or V2 hit the same entry.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

Rows = npt.NDArray[np.float32]


def rows_key(rows: Rows) -> bytes:
    data = np.ascontiguousarray(rows, dtype=np.float32)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(data.shape).encode())
    digest.update(data.tobytes())
    return digest.digest()


class ResponseCache:
    def __init__(
        self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries={max_entries}; expected an integer >= 1")
        if ttl_s <= 0:
            raise ValueError(f"ttl_s={ttl_s}; expected a number of seconds > 0")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[float, Rows]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> Rows | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] <= self._clock():
            if entry is not None:
                del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[1]

    def put(self, key: bytes, value: Rows) -> None:
        value = value.copy()
        value.flags.writeable = False  # shared between requests: nobody may change it
        self._entries[key] = (self._clock() + self.ttl_s, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
