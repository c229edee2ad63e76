"""Packs: a sweep's trials go to Ray Tune in packs, each pack one Ray Tune trial that runs its
trials one after the other, sized as the sweep goes so that a pack takes about ``PACK_SECONDS``.

Ray Tune costs each of its trials tens of milliseconds of the driver's CPU and a round trip before
the next one starts (measured on 2 cores: 48 ms of driver CPU and 16 ms of a worker's idle time per
trial): nothing against a trial of minutes, most of the cost of a trial of 0.2 s. The first packs
hold one trial each; once trials have finished, a pack holds as many as their median time fits in
``PACK_SECONDS``, but never more than an even share of what remains (so the last packs are small
and the sweep's end stays balanced across its slots). Trials of ``PACK_SECONDS`` or longer run one
per pack, as before packs. The order is the driver's (longest expected first).

A pack that fails is retried whole by Ray Tune (``max_failures``): its finished trials return their
``result.json`` at once, the others continue from their checkpoints.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

from ray.tune.search import Searcher

PACK_SECONDS = 5.0
KEYS, FINISHED = "keys", "finished"  # a pack's config: its trial keys; a report: [[key, seconds, acc], ...]


def pack_size(seconds: list[float], remaining: int, slots: int) -> int:
    """Trials in the next pack: 1 until some have finished (``seconds``: their attempts' wall
    times); then as many as fill PACK_SECONDS at the median of the last 64, at most an even share
    of the ``remaining`` trials among twice the ``slots`` (trials that can run at once)."""
    if not seconds:
        return 1
    typical = max(statistics.median(seconds[-64:]), 1e-3)
    return max(1, min(int(PACK_SECONDS / typical), math.ceil(remaining / (2 * slots))))


class PackSearcher(Searcher):
    """Hands Ray Tune the packs of ``keys`` (trial keys, in running order), one per ``suggest``,
    sized by ``pack_size`` from the trial times the packs report (``FINISHED``)."""

    def __init__(self, keys: list[str], slots: int):
        super().__init__()
        self.queue, self.slots = deque(keys), slots
        self.seconds: list[float] = []

    def suggest(self, trial_id: str) -> dict[str, Any] | str:
        if not self.queue:
            return Searcher.FINISHED
        size = pack_size(self.seconds, len(self.queue), self.slots)
        return {KEYS: [self.queue.popleft() for _ in range(size)]}  # pack_size never exceeds the queue

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self.seconds += [seconds for _, seconds, _ in result.get(FINISHED, [])]

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        """Nothing to learn: the pack's last result reached ``on_trial_result`` already."""


def slots(cpus_per_trial: float, gpus_per_trial: float, max_concurrent: int | None) -> int:
    """Trials the Ray cluster can run at once now (an autoscaling cluster may grow: packs stay
    small enough for that, as the share of the remaining trials is taken per pack)."""
    import ray

    total = ray.cluster_resources()
    n = total.get("CPU", 1.0) / cpus_per_trial
    if gpus_per_trial:
        n = min(n, total.get("GPU", 0.0) / gpus_per_trial)
    return max(1, min(int(n), max_concurrent or int(n)))
