"""Append-only results: one JSON object per line, each with the environment it was measured in.

Records cannot tear or double: a run holds the work dir's lock (one writer per work dir), each
record is one write under a lock on the file, a line cut by a kill is set aside before the next
append, and readers skip (and report) what is not a record.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import WorkbenchError
from .paths import expect_kind, make_dir, writable_dir

log = logging.getLogger(__name__)

DEFAULT_WORK_DIR = Path(__file__).resolve().parents[1] / "data"
PACKAGES = ("apache-tvm", "apache-tvm-ffi", "torch", "onnxruntime", "numpy", "xgboost-cpu")
LOCK_NAME = ".workbench.lock"
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # flock unsupported by the filesystem
WORK_DIR_HINT = "pass --work-dir a folder you can write to (it is created if missing)"


class WorkDirBusyError(WorkbenchError):
    """Another run holds the work dir: two runs would share the cores and interleave their records."""


@functools.lru_cache(maxsize=1)
def environment() -> dict:
    """The host: CPU, cores, Python and the versions of what is measured."""
    from importlib import metadata

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "machine": platform.machine(),
            "python": platform.python_version(), "versions": versions}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class WorkDir:
    """Where one study keeps everything: records, tuning databases, the hybrid, the report."""

    root: Path

    @classmethod
    def at(cls, path: str | Path | None = None) -> "WorkDir":
        """The work dir at `path` (default: data/), checked: nothing measured can be lost to a bad path."""
        if path is not None and str(path).strip() == "":
            raise WorkbenchError(f"--work-dir is empty; {WORK_DIR_HINT}, or leave it out for data/")
        # ~ expanded once, here: the folder checked is the folder written to (never a literal ./~).
        return cls(Path(path).expanduser() if path is not None else DEFAULT_WORK_DIR).check()

    def check(self) -> "WorkDir":
        """Raise a WorkbenchError (one line) unless everything here can be written; writes nothing."""
        writable_dir(self.root, "--work-dir", WORK_DIR_HINT)
        hint = "move it away or pass another --work-dir"
        for folder in (self.root / "results", self.tuning, self.hybrid):
            expect_kind(folder, True, hint)
        for file in (self.records.path, self.records.torn_path, self.report, self.root / "study.json",
                     self.root / LOCK_NAME, self.hybrid / "plan.json"):
            expect_kind(file, False, hint)
        return self

    @property
    def records(self) -> "RecordStore":
        return RecordStore(self.root / "results" / "records.jsonl")

    @property
    def tuning(self) -> Path:
        return self.root / "tuning"

    @property
    def hybrid(self) -> Path:
        return self.root / "hybrid"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @contextlib.contextmanager
    def lock(self, command: str, wait: float = 0.0):
        """Hold the work dir for one run: a second run fails at once (or after `wait` seconds) with
        the holder's pid, command and start; a dead holder's lock is free (the kernel drops it)."""
        self.check()
        make_dir(self.root, "--work-dir", WORK_DIR_HINT)
        path = self.root / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise WorkbenchError(f"cannot open the work dir's lock {str(path)!r} ({err.strerror}); "
                                 f"{WORK_DIR_HINT}") from None
        try:
            _acquire(fd, path, wait)
        except BaseException:
            os.close(fd)
            raise
        try:
            holder = {"pid": os.getpid(), "command": command, "argv": sys.argv,
                      "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)  # who holds it, for the next run's message
            self.records.repair()  # a line cut when the last run was killed: set aside before we append
            yield self
        finally:
            os.ftruncate(fd, 0)  # released: the file alone never claims a holder
            os.close(fd)  # closing drops the flock (so does dying)


def _acquire(fd: int, path: Path, wait: float) -> None:
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as err:
            if err.errno in NO_LOCKS:
                log.warning("%s: this filesystem cannot lock files; make sure no other run uses this work dir", path)
                return
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() >= deadline:
            raise WorkDirBusyError(f"work dir {str(path.parent)!r} is in use by {_holder(fd)}; "
                                   "wait for that run to finish, or pass another --work-dir")
        time.sleep(0.2)


def _flock_or_warn(fd: int, path: Path) -> None:
    """Wait for the exclusive lock; on a filesystem without locks (some network and FUSE mounts),
    go on with a warning: the work-dir lock already keeps one run per work dir."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as err:
        if err.errno not in NO_LOCKS:
            raise
        log.debug("%s: no file locks here (%s)", path, err.strerror)


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        pid, command, since = int(info["pid"]), info.get("command", "?"), info.get("since", "?")
    except (ValueError, KeyError, TypeError):
        return "another process (it has not said which yet)"
    alive = "" if _running(pid) else ", no longer running (a child process of it still holds the lock)"
    return f"pid {pid} (`{command}`, since {since}{alive})"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RecordError(WorkbenchError):
    """A records file the workbench cannot read or append to."""


_REPORTED: set = set()  # (path, bad lines) already reported: a reader says it once, not on every read


class RecordStore:
    """A JSON-lines file that only grows; readers pick the latest record per key.

    Appends hold an exclusive flock on the file for the length of one write, so two processes
    (a CLI run and a notebook, say) never interleave or glue lines. No fsync: the threat is a
    killed process, and a write() that returned is in the page cache and survives it; a power cut
    can still cut the last line, which the next append sets aside.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def torn_path(self) -> Path:
        return self.path.with_name(self.path.name + ".torn")

    # -- writing
    def append(self, kind: str, payload: dict, **context) -> dict:
        record = {"kind": kind, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **context,
                  "env": environment(), **payload}
        line = (json.dumps(record, default=_plain) + "\n").encode()
        with self._locked() as fd:
            _write_all(fd, line)  # one write: the whole line or, if killed, a fragment set aside later
        return record

    def repair(self) -> int:
        """Set a torn last line aside (into records.jsonl.torn) and cut the file back to its last
        complete line, so the next record starts on a line of its own; returns the bytes moved."""
        if not self.path.exists():
            return 0
        with self._locked() as fd:
            return self._repair(fd)

    def _repair(self, fd: int) -> int:
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return 0
        end = _last_newline(fd, size) + 1  # 0 if the file holds no complete line
        fragment = os.pread(fd, size - end, end)
        with self.torn_path.open("ab") as torn:
            note = {"set_aside": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "from": str(self.path), "offset": end,
                    "bytes": len(fragment)}
            torn.write(b"# " + json.dumps(note).encode() + b"\n" + fragment + b"\n")
        os.ftruncate(fd, end)
        log.warning("%s: its last line was cut (%d bytes, a run killed mid-write); set aside in %s",
                    self.path, len(fragment), self.torn_path)
        return len(fragment)

    @contextlib.contextmanager
    def _locked(self):
        """The records file open for appending, exclusively locked, its torn tail repaired."""
        make_dir(self.path.parent, "the records folder", WORK_DIR_HINT)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError as err:
                raise RecordError(f"cannot open {str(self.path)!r} for appending ({err.strerror}); "
                                  f"{WORK_DIR_HINT}") from None
            _flock_or_warn(fd, self.path)
            # compact() may have replaced the file while we waited: lock the one now at the path.
            if _same_file(fd, self.path):
                break
            os.close(fd)
        try:
            self._repair(fd)
            yield fd
        finally:
            os.close(fd)

    # -- reading
    def read(self, kind: str | None = None) -> list[dict]:
        """Every record (of `kind`), in order; lines that are not records are skipped and reported once."""
        records, bad = [], []
        for number, record in self._lines():
            if record is None:
                bad.append(number)
            elif kind is None or record.get("kind") == kind:
                records.append(record)
        if bad and (str(self.path), tuple(bad)) not in _REPORTED:
            _REPORTED.add((str(self.path), tuple(bad)))
            shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
            log.warning("%s: skipped %d line(s) that are not records (line %s); they are kept in the file",
                        self.path, len(bad), shown)
        return records

    def _lines(self):
        """(line number, record or None if the line is not a JSON object) for each line."""
        if not self.path.exists():
            return
        if not self.path.is_file():  # a FIFO would block the reader for ever
            raise RecordError(f"{str(self.path)!r} is not a regular file; move it away or pass another --work-dir")
        try:
            data = self.path.read_bytes()
        except OSError as err:
            raise RecordError(f"cannot read {str(self.path)!r} ({err.strerror}); {WORK_DIR_HINT}") from None
        lines = data.split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        for number, line in enumerate(lines, 1):
            yield number, _parse(line)

    def latest(self, kind: str, key: tuple[str, ...], where: dict | None = None) -> dict[tuple, dict]:
        """The newest record of `kind` for each distinct key (e.g. ("layer", "impl")).

        Key and `where` fields may be dotted paths into nested records ("device.target")."""
        found = {}
        for record in self.read(kind):
            if where and any(_field(record, k) != v for k, v in where.items()):
                continue
            found[tuple(_hashable(_field(record, k)) for k in key)] = record
        return found

    # -- checking and compacting
    def duplicates(self, kind: str, key: tuple[str, ...], where: dict | None = None) -> dict[tuple, int]:
        """Keys with more than one record of `kind` (older ones are superseded, never counted by latest)."""
        counts: dict[tuple, int] = {}
        for record in self.read(kind):
            if where and any(_field(record, k) != v for k, v in where.items()):
                continue
            name = tuple(_hashable(_field(record, k)) for k in key)
            counts[name] = counts.get(name, 0) + 1
        return {name: n for name, n in counts.items() if n > 1}

    def compact(self, keys: dict[str, tuple[str, ...]]) -> int:
        """Rewrite the file keeping only the newest record per key for each kind in `keys` (others
        untouched, lines that are not records kept as they are); atomic. Returns the records dropped."""
        if not self.path.exists():
            return 0
        with self._locked():
            lines = self.path.read_bytes().split(b"\n")[:-1]
            newest: dict[tuple, int] = {}
            for index, line in enumerate(lines):
                record = _parse(line)
                if record is not None and record.get("kind") in keys:
                    name = (record["kind"], *(_hashable(_field(record, k)) for k in keys[record["kind"]]))
                    newest[name] = index
            keep = set(newest.values())
            kept = [line for index, line in enumerate(lines)
                    if index in keep or (_parse(line) or {}).get("kind") not in keys]
            temporary = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
            temporary.write_bytes(b"".join(line + b"\n" for line in kept))
            os.replace(temporary, self.path)  # appenders waiting on the old file re-open the new one
        return len(lines) - len(kept)


def _parse(line: bytes) -> dict | None:
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _field(record: dict, path: str):
    value = record
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _hashable(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value


def _last_newline(fd: int, size: int, chunk: int = 1 << 16) -> int:
    """Offset of the last b"\\n" before `size`, or -1."""
    end = size
    while end > 0:
        start = max(0, end - chunk)
        found = os.pread(fd, end - start, start).rfind(b"\n")
        if found >= 0:
            return start + found
        end = start
    return -1


def _write_all(fd: int, data: bytes) -> None:
    while data:  # a regular file takes it in one write; the loop only covers a short write
        written = os.write(fd, data)
        data = data[written:]


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
