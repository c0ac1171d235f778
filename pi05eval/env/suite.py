"""Suite selection: which tasks and trials a run covers, validated before any simulation."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

from pi05eval.env.protocol import MAX_STEPS, NUM_INIT_STATES, SUITE_GROUPS, SUITES
from pi05eval.policy.base import TaskInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskSpec:
    """One LIBERO task as the runner needs it (picklable: it travels to env workers)."""

    suite: str  # e.g. "libero_spatial"
    task_id: int  # index in the suite's standard task order
    name: str  # LIBERO task name (the BDDL file stem)
    language: str  # the instruction given to the policy
    bddl_file: str  # absolute path of the BDDL problem file
    max_steps: int  # policy steps allowed (openpi's per-suite limit)
    goal: tuple[tuple[str, ...], ...]  # BDDL goal predicates

    @property
    def info(self) -> TaskInfo:
        return TaskInfo(suite=self.suite, task_id=self.task_id, language=self.language, goal=self.goal)


@dataclass(frozen=True)
class EpisodeSpec:
    """One trial: task `task` from LIBERO's init state number `trial`."""

    task: TaskSpec
    trial: int

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.task.suite, self.task.task_id, self.trial)


@dataclass(frozen=True)
class SuiteConfig:
    """`conf/suite/*.yaml`. `tasks=None` means every task of each suite."""

    name: str  # config name, e.g. "libero_spatial" or "libero_4"
    suites: tuple[str, ...]  # LIBERO suites covered
    tasks: tuple[int, ...] | None = None  # task ids (within each suite); None = all
    trials_per_task: int = NUM_INIT_STATES  # trials 0..n-1 use init states 0..n-1
    first_trial: int = 0  # start at this init state (e.g. to shard a suite across machines)

    def __post_init__(self) -> None:
        unknown = [s for s in self.suites if s not in SUITES]
        if unknown or not self.suites:
            raise ValueError(f"unknown LIBERO suite(s) {unknown or '(none given)'}; choose from {list(SUITES)}")
        if not self.trials_per_task >= 1 or self.first_trial < 0:
            raise ValueError(
                f"suite.trials_per_task must be >= 1 and suite.first_trial >= 0, got "
                f"{self.trials_per_task} / {self.first_trial}"
            )
        if self.first_trial + self.trials_per_task > NUM_INIT_STATES:
            raise ValueError(
                f"suite.first_trial + suite.trials_per_task = {self.first_trial + self.trials_per_task} exceeds the "
                f"{NUM_INIT_STATES} initial states LIBERO ships per task (trial k uses init state k)"
            )


def suites_of(name: str) -> tuple[str, ...]:
    return SUITE_GROUPS.get(name, (name,))


def load_tasks(cfg: SuiteConfig) -> list[TaskSpec]:
    """Resolve the selected tasks of every suite from LIBERO's benchmark (no simulation)."""
    from libero.libero import benchmark, get_libero_path
    from libero.libero.envs.bddl_utils import robosuite_parse_problem

    registry = benchmark.get_benchmark_dict()
    out: list[TaskSpec] = []
    for suite_name in cfg.suites:
        suite = registry[suite_name]()
        n = suite.get_num_tasks()
        ids = list(range(n)) if cfg.tasks is None else list(cfg.tasks)
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"suite.tasks {bad} out of range for {suite_name}: task ids are 0..{n - 1}")
        for i in ids:
            task = suite.get_task(i)
            bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
            goal = tuple(tuple(str(x) for x in pred) for pred in robosuite_parse_problem(bddl)["goal_state"])
            out.append(
                TaskSpec(
                    suite=suite_name,
                    task_id=i,
                    name=task.name,
                    language=str(task.language),
                    bddl_file=bddl,
                    max_steps=MAX_STEPS[suite_name],
                    goal=goal,
                )
            )
    return out


def episodes_of(tasks: Sequence[TaskSpec], cfg: SuiteConfig) -> list[EpisodeSpec]:
    """Every (task, trial) in protocol order: per task, trials in increasing order."""
    trials = range(cfg.first_trial, cfg.first_trial + cfg.trials_per_task)
    return [EpisodeSpec(task=t, trial=k) for t in tasks for k in trials]


def load_init_states(task: TaskSpec):  # -> np.ndarray [50, state_dim]
    from libero.libero import benchmark

    return benchmark.get_benchmark_dict()[task.suite]().get_task_init_states(task.task_id)
