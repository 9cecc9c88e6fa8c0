"""A per-process circuit breaker for each store: after `store_breaker` consecutive operations failed
past their retries, every further operation on that store fails at once with `StoreUnavailable`
until a probe after `BREAKER_COOLDOWN_S` succeeds."""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass

from infra.settings import Settings
from infra.store_base import StoreUnavailable

LOG = logging.getLogger(__name__)
BREAKER_COOLDOWN_S = 30.0  # an open breaker lets one probe through after this long


@dataclass
class StoreBreaker:
    """Consecutive-failure circuit breaker for one store in one process. `threshold` 0: never opens.
    Thread-safe; O(1) per call."""

    name: str
    threshold: int
    cooldown_s: float = BREAKER_COOLDOWN_S
    failures: int = 0
    opened_at: float | None = None
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def before(self) -> None:
        """Raise StoreUnavailable while open; after the cooldown, let one probe through."""
        with self._lock:
            if self.opened_at is None:
                return
            if time.monotonic() - self.opened_at < self.cooldown_s:
                raise StoreUnavailable(
                    f"store {self.name} is unavailable: {self.failures} operations in a row failed past their "
                    f"retries; failing fast (next probe in {self.cooldown_s - (time.monotonic() - self.opened_at):.0f}s). "
                    f"Check the endpoint, the network and the bucket, then rerun: committed shards are kept")
            self.opened_at = time.monotonic()  # this call is the probe; the others keep failing fast

    def failed(self) -> None:
        with self._lock:
            self.failures += 1
            if self.threshold and self.failures >= self.threshold:
                if self.opened_at is None:
                    LOG.error("store %s: %d operations in a row failed; failing fast for %.0fs",
                              self.name, self.failures, self.cooldown_s)
                self.opened_at = time.monotonic()

    def succeeded(self) -> None:
        with self._lock:
            self.failures, self.opened_at = 0, None


_BREAKERS: dict[tuple[str, str | None], StoreBreaker] = {}
_BREAKERS_LOCK = threading.Lock()


def breaker_for(uri: str, settings: Settings) -> StoreBreaker:
    """The process-wide breaker of the store at `uri` (and endpoint): every Store object on it shares it."""
    key = (uri.rstrip("/"), settings.s3_endpoint)
    with _BREAKERS_LOCK:
        if key not in _BREAKERS:
            _BREAKERS[key] = StoreBreaker(uri.rstrip("/"), settings.store_breaker)
        return _BREAKERS[key]
