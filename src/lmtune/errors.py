"""The one user-facing error type.

Anything a user can get wrong (a config key, a file, a row, a model name) raises `LmtuneError` with one
line that says what is wrong, where, and how to fix it. Only `cli.main` prints it, as `error: ...`,
and exits with code 2; library code never prints and never calls `sys.exit`.
"""


class LmtuneError(Exception):
    """A mistake in the user's input, reported as one line and exit code 2."""

    exit_code = 2
