"""How the command lines end: on an error a user fixes by changing an input (a config value, a bundle, an installed
extra: `SetupError`), and on Ctrl-C or SIGTERM (`Terminated`).

Setup errors say what is wrong and what to do, and are raised before any episode or timed call starts; the command
lines print the message alone, without a traceback (`HYDRA_FULL_ERROR=1` shows it).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

TRACEBACK_ENV = "HYDRA_FULL_ERROR"  # Hydra's own switch, honoured by every command of this package


class SetupError(Exception):
    """An input this run cannot use; the message names it and the fix."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is (the command's exit status tells them apart)."""


def run_command(main: Callable[[], object], *also: type[Exception]) -> None:
    """Run a command line's body: a SetupError, a ValueError (bad values) or one of `also` ends it with its message
    and exit status 1. Ctrl-C or SIGTERM (`kill`, `timeout`, a scheduler) ends it with one line and the shell's status
    for that signal (130, 143)."""

    def terminate(signum: int, frame: object) -> None:
        raise Terminated

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminate) if in_main_thread else None
    try:
        main()
    except (SetupError, ValueError, KeyboardInterrupt, *also) as e:
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        log = logging.getLogger("pi05eval")
        if not isinstance(e, KeyboardInterrupt):
            log.error("%s: %s", type(e).__name__, e)
            raise SystemExit(1) from None
        log.warning("%s", str(e) or "interrupted")
        raise SystemExit(128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)) from None
    finally:
        if in_main_thread and previous is not None:  # None: a handler not set from Python, which stays
            signal.signal(signal.SIGTERM, previous)
