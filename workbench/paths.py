"""Where the workbench may write: folders checked before any device starts, so a bad path fails
at once with one line instead of after the first measurement (whose result would be lost)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from .errors import WorkbenchError

# Kernel and device filesystems: writing there fails late, or worse, does something.
VIRTUAL = (Path("/proc"), Path("/sys"), Path("/dev"))


class PathError(WorkbenchError):
    """A folder the workbench cannot use for its output: a file, read-only, virtual or unreachable."""


def writable_dir(path: str | Path, what: str, hint: str) -> Path:
    """`path` as a folder the workbench can create or write into, checked without writing anything.

    `what` names the folder in the message (e.g. "--work-dir"), `hint` says what to do instead.
    """
    if path is None or str(path).strip() == "":
        raise PathError(f"{what} is empty; {hint}")
    path = Path(path).expanduser()
    try:
        resolved = path.resolve()  # through symlinks: a link into /proc is /proc
    except (RuntimeError, OSError) as err:  # a symlink loop (RuntimeError on Python 3.11, OSError later)
        raise PathError(f"{what} {str(path)!r} cannot be resolved ({_loop_or(err)}); {hint}") from None
    for virtual in VIRTUAL:
        if resolved == virtual or virtual in resolved.parents:
            raise PathError(f"{what} {str(path)!r} is under {virtual}, a kernel filesystem; {hint}")
    if path.is_symlink() and not path.exists():
        raise PathError(f"{what} {str(path)!r} is a symlink to {os.readlink(path)!r}, which does not exist; {hint}")
    existing = _nearest_existing(resolved)
    if not existing.is_dir():
        detail = "is a file" if existing == resolved else f"cannot be created: {str(existing)!r} is a file"
        raise PathError(f"{what} {str(path)!r} {detail}, not a folder; {hint}")
    if not os.access(existing, os.W_OK | os.X_OK):
        detail = "is not writable" if existing == resolved else f"cannot be created in {str(existing)!r} (not writable)"
        raise PathError(f"{what} {str(path)!r} {detail}; {hint}")
    return path


def _loop_or(err: BaseException) -> str:
    if isinstance(err, RuntimeError) or getattr(err, "errno", None) == errno.ELOOP:
        return "a symlink loop"
    return getattr(err, "strerror", None) or str(err)


def _nearest_existing(path: Path) -> Path:
    """`path` itself if it exists (file or folder), else its nearest existing ancestor."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor)


def expect_kind(path: Path, folder: bool, hint: str) -> None:
    """If `path` exists it must be a folder (folder=True) or a regular file; a FIFO would block a reader."""
    if not path.exists() and not path.is_symlink():
        return
    if folder and not path.is_dir():
        raise PathError(f"{str(path)!r} must be a folder but is {_kind(path)}; {hint}")
    if not folder and not path.is_file():
        raise PathError(f"{str(path)!r} must be a regular file but is {_kind(path)}; {hint}")


def _kind(path: Path) -> str:
    if path.is_symlink() and not path.exists():
        return "a broken symlink"
    if path.is_dir():
        return "a folder"
    return "a file" if path.is_file() else "a special file (FIFO, socket or device)"


def make_dir(path: Path, what: str, hint: str) -> Path:
    """Create `path` (and its parents); an OS refusal becomes one clear line."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PathError(f"cannot create {what} {str(path)!r} ({err.strerror or err}); {hint}") from None
    return path
