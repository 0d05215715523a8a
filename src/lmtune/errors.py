"""The one user-facing error type.

Anything a user can get wrong (a config key, a file, a row, a model name) raises `LmtuneError` with one
line that says what is wrong, where, and how to fix it. Only `cli.main` prints it, as `error: ...`,
and exits with code 2; library code never prints and never calls `sys.exit`.
"""


class LmtuneError(Exception):
    """A mistake in the user's input, reported as one line and exit code 2."""

    exit_code = 2


def require(module: str, extra: str, what: str = "") -> None:
    """Raise a one-line `LmtuneError` naming the extra to install when `module` cannot be imported.
    Called before anything slow (a model load) happens, so a missing package costs a second, not a run."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise LmtuneError(f"{what or 'this'} needs the package '{module}', which is not installed: "
                          f"pip install 'lmtune[{extra}]'")
