"""The project's one user-facing error type.

Anything a user can cause (a bad prompt, an unknown model, a missing database, an
out-of-range token or neuron) raises :class:`MonitorError` with a message that says
what to do. The CLIs print it as one line and exit 2; the dashboard shows it with
``st.error``. Nothing else should reach a user as a traceback.
"""


class MonitorError(Exception):
    """A problem the user can fix; ``str(err)`` is a one-line instruction."""

    exit_code = 2


def run_command(func, args, interrupted: str = "interrupted") -> int:
    """Run a CLI command: a :class:`MonitorError` becomes one ``error: …`` line on stderr
    and its exit code (2); Ctrl-C prints ``interrupted`` and exits 130. Shared by the
    ``engine``, ``precompute`` and ``cache`` command lines."""
    import sys

    try:
        return func(args)
    except MonitorError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"error: {interrupted}", file=sys.stderr)
        return 130


def at_least(value, minimum, name: str) -> None:
    """Raise :class:`MonitorError` ("``name`` must be at least ``minimum``, got ``value``.") unless
    ``value >= minimum``: the one wording for every numeric option's lower bound."""
    if not value >= minimum:
        raise MonitorError(f"{name} must be at least {minimum}, got {value}.")
