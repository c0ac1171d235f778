"""Parallel multirun jobs on one machine: a Hydra callback that prepares each joblib worker process for a job.

`hydra/launcher=parallel` (conf/hydra/launcher/parallel.yaml) runs jobs in joblib's worker processes, which are
reused from job to job. CUDA reads `CUDA_VISIBLE_DEVICES` once per process, so the GPU is pinned per *worker
process*, not per job number: the first job a worker runs claims a free GPU with an exclusive lock file under the
sweep dir and sets `CUDA_VISIBLE_DEVICES`; every later job of that worker keeps it. With `n_jobs` equal to the number
of GPUs, each GPU runs one job at a time.

joblib's loky workers also make "loky" their default multiprocessing start method, which the processes they spawn
cannot resolve (LIBERO env workers died with "cannot find context for 'loky'"); the callback restores "spawn".
"""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)

_claimed: tuple[str, IO[str] | None] | None = None  # (GPU id, lock file held for the process's lifetime)


def visible_gpus() -> list[str]:
    """GPU ids this process may use: `CUDA_VISIBLE_DEVICES` if set, else every NVIDIA GPU the driver lists."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        return [str(i) for i in range(len(list(proc.iterdir())))]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


def claim_gpu(gpus: Sequence[str], lock_dir: Path) -> str | None:
    """Claim one of `gpus` for this process (the same one on every call); None without GPUs.

    A GPU is free when no other live process holds its lock file; if all are taken (more workers than GPUs), the
    process shares the GPU its pid picks, with a warning.
    """
    global _claimed
    if _claimed is not None:
        return _claimed[0]
    if not gpus:
        return None
    lock_dir.mkdir(parents=True, exist_ok=True)
    for gpu in gpus:
        fh = (lock_dir / f"gpu{gpu}.lock").open("a")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            continue
        _claimed = (gpu, fh)
        return gpu
    gpu = gpus[os.getpid() % len(gpus)]
    _claimed = (gpu, None)
    n = len(gpus)
    log.warning("all %d GPUs are held by other jobs: sharing GPU %s (set hydra.launcher.n_jobs=%d)", n, gpu, n)
    return gpu


class ParallelJobSetup(Callback):
    """Before each job in a worker process: standard start method for its subprocesses, one GPU for the process."""

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        if multiprocessing.get_start_method(allow_none=True) not in (None, "spawn", "fork", "forkserver"):
            multiprocessing.set_start_method("spawn", force=True)
        first = _claimed is None  # later jobs of this worker keep its GPU (CUDA is already set up on it)
        gpu = claim_gpu(visible_gpus() if first else [], Path(str(config.hydra.sweep.dir)) / ".gpu_locks")
        if gpu is None:
            log.info("job %s: no GPU visible, CUDA_VISIBLE_DEVICES left unset", config.hydra.job.num)
            return
        if first and "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
            log.warning("CUDA was initialized in this process before the GPU was assigned: it may use another GPU")
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        log.info("job %s (pid %d): CUDA_VISIBLE_DEVICES=%s", config.hydra.job.num, os.getpid(), gpu)
