"""The one exception type whose message is shown to the user as a single line, without a traceback."""


class DfakdError(Exception):
    """A user-facing error: bad input, a missing file, a failed precondition. Its message names the key,
    file or value at fault and what is allowed."""
