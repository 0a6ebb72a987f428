"""The error contract: everything a user can cause is a WorkbenchError.

The command line prints a WorkbenchError as one line (`error: ...`, exit code 2); anything else
is a bug and surfaces with its traceback. Every message names the problem and what to do.
"""


class WorkbenchError(Exception):
    """A problem the user can fix: a bad model, plan, knob, device, flag or file."""


class UserError(WorkbenchError):
    """A bad command-line argument or a missing prerequisite (a study not run yet, say)."""
