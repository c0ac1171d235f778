"""The base of the errors a user fixes by changing an input: a config value, a bundle, an installed extra.

Their messages say what is wrong and what to do; the command lines print the message alone, without a traceback
(`HYDRA_FULL_ERROR=1` shows it). They are raised before any episode or timed call starts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

TRACEBACK_ENV = "HYDRA_FULL_ERROR"  # Hydra's own switch, honoured by every command of this package


class SetupError(Exception):
    """An input this run cannot use; the message names it and the fix."""


def run_command(main: Callable[[], object], *also: type[Exception]) -> None:
    """Run a command line's body: a SetupError, a ValueError (bad values) or one of `also` ends it with its message
    and exit status 1; Ctrl-C ends it with one line and status 130."""
    try:
        main()
    except (SetupError, ValueError, *also) as e:
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        logging.getLogger("pi05eval").error("%s: %s", type(e).__name__, e)
        raise SystemExit(1) from None
    except KeyboardInterrupt as e:
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        logging.getLogger("pi05eval").warning("%s", str(e) or "interrupted")
        raise SystemExit(130) from None  # the shell's status for a command ended by SIGINT
