"""Process-wide counts of object reads and writes per store URI + key, shared by every Store of this
process (tasks open their own), so tests and benchmarks can prove what was touched. Thread-safe;
O(1) per count, O(distinct keys) per query."""
from __future__ import annotations

import collections
import threading


class AccessCounts:
    """Reads and writes per full object URI (`<store uri>/<key>`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reads: collections.Counter[str] = collections.Counter()
        self._writes: collections.Counter[str] = collections.Counter()

    def read(self, uri: str) -> None:
        """Count one read of the object at `uri`."""
        with self._lock:
            self._reads[uri] += 1

    def wrote(self, uri: str) -> None:
        """Count one write of the object at `uri`."""
        with self._lock:
            self._writes[uri] += 1

    def reads_under(self, prefix: str) -> int:
        """Reads so far of objects whose URI starts with `prefix`."""
        with self._lock:
            return sum(n for k, n in self._reads.items() if k.startswith(prefix))

    def writes_under(self, prefix: str) -> int:
        """Writes so far of objects whose URI starts with `prefix`."""
        with self._lock:
            return sum(n for k, n in self._writes.items() if k.startswith(prefix))

    def reads(self) -> collections.Counter[str]:
        """A copy of the read counts, URI -> reads (compare two copies to see what a call read)."""
        with self._lock:
            return collections.Counter(self._reads)

    def writes(self) -> collections.Counter[str]:
        """A copy of the write counts, URI -> writes."""
        with self._lock:
            return collections.Counter(self._writes)


ACCESS = AccessCounts()
