"""Project exception for problems a user can cause with their data or arguments.

A `DataError` carries a one-line message that names the file (and line, field or byte) that is
wrong and, where there is one, the fix. The CLIs catch it once at the entry point, print it and
exit with status 2 (see `data_tools._cli`); bugs stay ordinary tracebacks.
"""


class DataError(Exception):
    """A user-caused data problem; the message is one line and names what is wrong."""
