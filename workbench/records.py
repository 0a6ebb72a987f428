"""Append-only results: one JSON object per line, each with the environment it was measured in."""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_WORK_DIR = Path(__file__).resolve().parents[1] / "data"
PACKAGES = ("apache-tvm", "apache-tvm-ffi", "torch", "onnxruntime", "numpy", "xgboost-cpu")


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
        return cls(Path(path) if path else DEFAULT_WORK_DIR)

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


class RecordStore:
    """A JSON-lines file that only grows; readers pick the latest record per key."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, kind: str, payload: dict, **context) -> dict:
        record = {"kind": kind, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **context,
                  "env": environment(), **payload}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:  # one write per record: an interrupt loses at most this line
            f.write(json.dumps(record, default=_plain) + "\n")
        return record

    def read(self, kind: str | None = None) -> list[dict]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interrupt
            if kind is None or record.get("kind") == kind:
                records.append(record)
        return records

    def latest(self, kind: str, key: tuple[str, ...], where: dict | None = None) -> dict[tuple, dict]:
        """The newest record of `kind` for each distinct key (e.g. ("layer", "impl"))."""
        found = {}
        for record in self.read(kind):
            if where and any(record.get(k) != v for k, v in where.items()):
                continue
            found[tuple(record.get(k) for k in key)] = record
        return found


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
