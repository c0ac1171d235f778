"""Experiment loggers: a small protocol (`log_config`, `log_episode`, `log_summary`, `close`) and its backends.

Results on disk (`episodes.jsonl`, `summary.json`) are the source of truth; loggers mirror them elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Logger(Protocol):
    def log_config(self, config: Mapping[str, Any], run_dir: str) -> None: ...

    def log_episode(self, record: Mapping[str, Any]) -> None: ...

    def log_summary(self, summary: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class LocalLogger:
    """Keeps results in the run directory only."""

    def log_config(self, config: Mapping[str, Any], run_dir: str) -> None:
        log.info("results in %s", run_dir)

    def log_episode(self, record: Mapping[str, Any]) -> None:
        log.debug("episode %s/%s trial %s: %s", record["suite"], record["task_id"], record["trial"], record["status"])

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
