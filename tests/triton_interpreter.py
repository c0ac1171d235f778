"""Triton's CPU interpreter for the kernel tests (imported by them as a plain module, like `faulty_policies`).

The interpreter must be on when Triton itself is imported (its own jit functions too), and it reads TRITON_INTERPRET
again while running kernels. A test module calls `turn_on()` before importing Triton, `turn_off(was_set)` after
(keeping it out of other tests' subprocesses), sets it per test with a fixture, and reruns a test in a fresh process
with `rerun_in_fresh_process` when Triton came in earlier without it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_TRITON_INTERPRETED = False  # Triton itself was imported after a `turn_on` here


def turn_on() -> bool:
    """Switch the interpreter on for the kernels the caller imports next (no GPU; Triton not imported yet, or imported
    with it on) -> whether this call did it."""
    global _TRITON_INTERPRETED
    if DEVICE.type != "cpu" or "TRITON_INTERPRET" in os.environ:
        return False
    if "triton" in sys.modules and not _TRITON_INTERPRETED:
        return False  # Triton came in without the interpreter: `interpreted` says no, the tests rerun elsewhere
    os.environ["TRITON_INTERPRET"] = "1"
    _TRITON_INTERPRETED = True
    return True


def turn_off(was_set: bool) -> None:
    if was_set:
        del os.environ["TRITON_INTERPRET"]


def interpreted(kernel) -> bool:
    """Whether `kernel` (a @triton.jit function) runs here: on a GPU, or in the interpreter."""
    return DEVICE.type == "cuda" or type(kernel).__name__ == "InterpretedFunction"


def rerun_in_fresh_process(request) -> None:
    """Run the current test again in a fresh pytest process with the interpreter on; fail with its output."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid]
    proc = subprocess.run(cmd, cwd=request.config.rootpath, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
