"""The one exception type that `run.py` turns into a one-line error and a non-zero exit."""


class PipelineError(Exception):
    """Bad input or state the user can fix. The message names the file and the problem."""
