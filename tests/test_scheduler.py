"""Workers take whole tasks in trial order, and split a task only when no unclaimed task is left."""

from __future__ import annotations

from pi05eval.env.suite import EpisodeSpec, TaskSpec
from pi05eval.scheduler import TaskScheduler


def _episodes(n_tasks: int, n_trials: int) -> list[EpisodeSpec]:
    tasks = [TaskSpec("libero_spatial", i, f"t{i}", "do it", "x.bddl", 220, ()) for i in range(n_tasks)]
    return [EpisodeSpec(t, k) for t in reversed(tasks) for k in reversed(range(n_trials))]


def _drain(s: TaskScheduler, workers: int) -> dict[int, list[tuple[int, int]]]:
    got: dict[int, list[tuple[int, int]]] = {w: [] for w in range(workers)}
    active = True
    while active:
        active = False
        for w in range(workers):
            ep = s.next_for(w)
            if ep is not None:
                got[w].append((ep.task.task_id, ep.trial))
                active = True
    return got


def test_one_worker_runs_tasks_and_trials_in_order() -> None:
    s = TaskScheduler(_episodes(3, 4))
    got = _drain(s, 1)
    assert got[0] == [(t, k) for t in range(3) for k in range(4)] and len(s) == 0


def test_workers_take_whole_tasks_then_split_the_longest_remainder() -> None:
    got = _drain(TaskScheduler(_episodes(2, 6)), 3)
    all_eps = sorted(e for eps in got.values() for e in eps)
    assert all_eps == [(t, k) for t in range(2) for k in range(6)]  # each exactly once
    for eps in got.values():  # within a task, each worker moves forward only
        for t in {e[0] for e in eps}:
            trials = [k for tt, k in eps if tt == t]
            assert trials == sorted(trials)
    assert got[2], "the third worker found work by splitting a task"
    assert {t for t, _ in got[0]} == {0} and {t for t, _ in got[1]} == {1}
