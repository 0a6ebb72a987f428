"""Names from a model file made safe for where they go: TVM symbols and Relax variables.

ONNX node names are whatever the exporter chose (`/enc.0.0/Conv`); a symbol or a Relax
parameter name with a dot or a slash breaks the build. Names already safe are kept, so the
workbench's own layer names (`enc0_conv1`) read the same in profiles; changed names get a
short hash so two different names never map to the same symbol.
"""

from __future__ import annotations

import hashlib
import re

_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


def symbol(name: str) -> str:
    """A C identifier for `name`: itself when already one, else a cleaned copy plus a hash."""
    name = str(name)
    if name and not _UNSAFE.search(name) and not name[0].isdigit():
        return name
    cleaned = _UNSAFE.sub("_", name).strip("_") or "x"
    if cleaned[0].isdigit():
        cleaned = "n" + cleaned
    return f"{cleaned}_{hashlib.sha1(name.encode()).hexdigest()[:6]}"
