"""Whole episodes at openpi's own step limits, on every standard suite (marker `slow`: ~1360 simulated steps).

The default tests shorten episodes with `runner.max_steps`; these run each suite's real limit, the number a success
rate depends on. The limits are openpi's LIBERO client's (`examples/libero/main.py`: spatial 220, object 280, goal
300, libero_10 520 policy steps after 10 wait steps, an action chunk replanned every 5 steps).
"""

from __future__ import annotations

import json
import math

import pytest
from conftest import compose

from pi05eval.app import evaluate

pytestmark = pytest.mark.slow

OPENPI_MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520}
WAIT_STEPS, REPLAN = 10, 5


def test_holding_still_runs_each_suite_to_openpis_limit(tmp_path) -> None:
    overrides = ["policy=noop", "suite=libero_4", "suite.tasks=[0]", "suite.trials_per_task=1", "runner.progress=false"]
    summary = evaluate(compose(overrides), tmp_path)
    recs = {r["suite"]: r for r in map(json.loads, (tmp_path / "episodes.jsonl").read_text().splitlines())}
    assert sorted(recs) == sorted(OPENPI_MAX_STEPS)
    for suite, limit in OPENPI_MAX_STEPS.items():
        rec = recs[suite]
        assert rec["status"] == "failure", (suite, rec.get("error"))
        assert rec["steps"] == limit + WAIT_STEPS, suite
        assert rec["calls"] == math.ceil(limit / REPLAN) == rec["latency"]["n"], suite
    assert summary["success"]["n"] == 4 and summary["success"]["successes"] == 0 and summary["success"]["errors"] == 0
