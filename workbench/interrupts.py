"""A Ctrl-C (or SIGTERM) that is not lost on its way through C++.

Python raises KeyboardInterrupt wherever the main thread happens to be, and that can be inside
a TVM call: TVM's RPC client checks for signals while it waits, and the exception can come out
as TVM's own error (a remote function "not found", say). A measurement then records a failure,
revives the device and the sweep goes on, as if Ctrl-C had never been pressed. So the command
line's handlers also note the signal here, and the measuring loops call `check()` between steps:
a noted interrupt is raised again there, whatever became of the first one.
"""

from __future__ import annotations

_NOTED: list[type[BaseException]] = []


def note(kind: type[BaseException] = KeyboardInterrupt) -> None:
    """Remember an interrupt (from a signal handler) until `reset()`."""
    _NOTED.append(kind)


def reset() -> None:
    _NOTED.clear()


def pending() -> bool:
    return bool(_NOTED)


def first() -> type[BaseException]:
    return _NOTED[0] if _NOTED else KeyboardInterrupt


def check() -> None:
    """Raise the first noted interrupt again (the command line stops with it); nothing if none was."""
    if _NOTED:
        raise _NOTED[0]()
