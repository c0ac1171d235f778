"""Which episode an idle env worker runs next, keeping each task's trials in order on one env.

openpi's RNG stream makes a task's trial k depend on the k hard resets before it (DESIGN.md invariant 1). A worker
that continues a task it already holds pays nothing; one that starts a task at trial k pays k extra resets to
fast-forward. So workers take whole tasks while unclaimed ones remain, and only then split a running task's
remaining trials, taking the upper half.
"""

from __future__ import annotations

from collections.abc import Sequence

from pi05eval.env.suite import EpisodeSpec

TaskKey = tuple[str, int]


class TaskScheduler:
    def __init__(self, episodes: Sequence[EpisodeSpec]) -> None:
        self.queues: dict[TaskKey, list[EpisodeSpec]] = {}
        for ep in sorted(episodes, key=lambda e: e.key):
            self.queues.setdefault((ep.task.suite, ep.task.task_id), []).append(ep)
        self.claims: dict[int, list[EpisodeSpec]] = {}  # worker id → its remaining trials, in order

    def __len__(self) -> int:
        return sum(len(q) for q in self.queues.values()) + sum(len(c) for c in self.claims.values())

    def next_for(self, worker: int) -> EpisodeSpec | None:
        claim = self.claims.get(worker)
        if not claim:
            claim = self._claim(worker)
        if not claim:
            return None
        return claim.pop(0)

    def _claim(self, worker: int) -> list[EpisodeSpec]:
        if self.queues:
            key = next(iter(self.queues))
            self.claims[worker] = self.queues.pop(key)
            return self.claims[worker]
        donor = max(self.claims, key=lambda w: len(self.claims[w]), default=None)
        if donor is None or len(self.claims[donor]) < 2:
            self.claims[worker] = []
            return []
        remaining = self.claims[donor]
        half = len(remaining) // 2
        self.claims[donor], self.claims[worker] = remaining[: len(remaining) - half], remaining[len(remaining) - half :]
        return self.claims[worker]
