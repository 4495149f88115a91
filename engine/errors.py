"""The project's one user-facing error type.

Anything a user can cause (a bad prompt, an unknown model, a missing database, an
out-of-range token or neuron) raises :class:`MonitorError` with a message that says
what to do. The CLIs print it as one line and exit 2; the dashboard shows it with
``st.error``. Nothing else should reach a user as a traceback.
"""


class MonitorError(Exception):
    """A problem the user can fix; ``str(err)`` is a one-line instruction."""

    exit_code = 2
