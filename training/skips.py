"""Skipped samples: the error a stage raises for an unusable sample, the counter every skip
goes into, and the webdataset handler that logs, counts and continues.

Reasons: ``read`` (unreadable shard or tar member), ``truncated shard NAME`` (samples that
``make-shards`` wrote into shard file NAME but that could not be read from it), ``no_image``,
``decode``, ``caption``, ``prompts``, ``tokenize``, ``augment``.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

TRUNCATED = "truncated shard"  # reason prefix: f"{TRUNCATED} {shard file name}"


class SampleError(Exception):
    """A sample that cannot be used; ``reason`` is the key it is counted under."""

    def __init__(self, reason: str, key: str | None, message: str) -> None:
        super().__init__(f"{reason}: sample {key}: {message}")
        self.reason, self.key = reason, key


class SkipCounter:
    """Counts skipped samples by reason.

    In the pipeline (one copy per DataLoader worker) it is fed by ``SkipHandler``s and drained
    into every batch. In the trainer, ``update(batch)`` sums the per-batch counts of all
    workers, so ``counts`` there is the total for the run.

    Args:
        max_consecutive: raise when this many samples in a row are skipped (the data or the
            pipeline is broken; without this a bug would silently skip everything).
    """

    def __init__(self, max_consecutive: int = 1000) -> None:
        self.counts: dict[str, int] = {}
        self.pending: dict[str, int] = {}
        self.pending_lost: dict[str, int] = {}  # shard losses (``lost``), delivered separately
        self.consecutive = 0
        self.max_consecutive = max_consecutive

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, reason: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n
        self.pending[reason] = self.pending.get(reason, 0) + n

    def good(self, n: int = 1) -> None:
        """Samples that made it into a batch."""
        self.consecutive = 0

    def pop_pending(self) -> dict[str, int]:
        """Counts since the last call (what the next batch carries)."""
        out, self.pending = self.pending, {}
        return out

    def pop_lost(self) -> dict[str, int]:
        """Shard losses since the last call."""
        out, self.pending_lost = self.pending_lost, {}
        return out

    def update(self, batch: dict) -> dict[str, int]:
        """Main process: add a batch's ``skip_reasons``; returns them."""
        reasons = batch.get("skip_reasons") or {}
        for reason, n in reasons.items():
            self.counts[reason] = self.counts.get(reason, 0) + int(n)
        return reasons

    def handler(self, default_reason: str) -> "SkipHandler":
        return SkipHandler(self, default_reason)

    def lost(self, reason: str, n: int, message: str) -> None:
        """Samples a shard lost (unreadable, truncated): counted and always logged; the next
        batch released gets them (``pop_lost``)."""
        self.counts[reason] = self.counts.get(reason, 0) + n
        self.pending_lost[reason] = self.pending_lost.get(reason, 0) + n
        log.warning("skipped %d (%s, %d so far): %s", n, reason, self.counts[reason], message[:300])


def describe_skips(counts: dict[str, int]) -> str:
    """``"0 skipped"`` or ``"25 skipped (truncated shard train-000001.tar 22, decode 3)"``, largest first
    (for a run's summary line)."""
    total = sum(counts.values())
    if not total:
        return "0 skipped"
    parts = ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n)
    return f"{total} skipped ({parts})"


class SkipHandler:
    """A webdataset exception handler that logs, counts and continues.

    Args:
        counter: where counts go.
        default_reason: the reason for exceptions that are not ``SampleError``s
            (``"read"`` for the tar reader).
    """

    log_first = 10  # log every skip up to this many per reason, then every 1000th

    def __init__(self, counter: SkipCounter, default_reason: str) -> None:
        self.counter, self.default_reason = counter, default_reason

    def __call__(self, exn: Exception) -> bool:
        reason = exn.reason if isinstance(exn, SampleError) else self.default_reason
        c = self.counter
        c.add(reason)
        c.consecutive += 1
        n = c.counts[reason]
        if n <= self.log_first or n % 1000 == 0:
            log.warning("skipped (%s, %d so far): %s", reason, n, str(exn)[:300])
        if c.consecutive >= c.max_consecutive:
            raise RuntimeError(f"{c.consecutive} samples in a row were skipped (last: {str(exn)[:200]}); the data or the pipeline is broken")
        return True
