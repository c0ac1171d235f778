"""The base of the errors a user fixes by changing an input: a config value, a bundle, an installed extra.

Their messages say what is wrong and what to do; the command line prints the message alone, without a traceback
(`HYDRA_FULL_ERROR=1` shows it). They are raised before any episode starts.
"""


class SetupError(Exception):
    """An input this run cannot use; the message names it and the fix."""
