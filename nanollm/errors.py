"""The one exception type the library raises for problems a user can fix.

Its message is a single line that names the file, key or value at fault and what to do.
The CLI prints it without a traceback and exits non-zero; anything else is a bug.
"""


class NanollmError(Exception):
    """A user-fixable problem: bad input data, a missing file, an unreachable service."""
