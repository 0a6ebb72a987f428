"""Code generation targets, checked before anything starts, and the machine a device reports.

A target is a TVM target dict (`{"kind": "llvm", "mtriple": ..., "mcpu": ..., "num-cores": N}`),
given as `host`, a preset name or JSON. It is checked at the door: a dict TVM accepts, LLVM
code for a CPU, an architecture LLVM knows and a CPU valid for it. Each RPC server reports its
machine (`DEVICE_INFO`, registered at start-up), so a run whose target's architecture differs
from the device's is refused instead of saving, say, x86 NNPACK timings under an armv7 target.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import sys

from .errors import WorkbenchError
from .threads import resolve_threads

# Named targets for common boards; "host" is detected when used.
TARGET_PRESETS = {
    # Hard-float ABI, as Debian's armhf toolchain links it ("uses VFP register arguments" otherwise).
    "armv7": {"kind": "llvm", "mtriple": "armv7l-linux-gnueabihf", "mattr": ["+neon"], "mfloat-abi": "hard"},
    "aarch64": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
}
CROSS_COMPILERS = {"armv7": "arm-linux-gnueabihf-g++", "aarch64": "aarch64-linux-gnu-g++"}

DEVICE_INFO = "workbench.device_info"

FORMS = ("use 'host', one of " + ", ".join(repr(p) for p in sorted(TARGET_PRESETS))
         + ', or a JSON TVM target dict such as {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "num-cores": 4}')

# Architecture families: code for one runs on a device of the same family only.
_FAMILIES = {"x86_64": "x86_64", "amd64": "x86_64", "x64": "x86_64", "i386": "x86", "i486": "x86",
             "i586": "x86", "i686": "x86", "x86": "x86", "aarch64": "aarch64", "arm64": "aarch64",
             "aarch64_be": "aarch64_be", "riscv64": "riscv64", "riscv32": "riscv32", "ppc64le": "powerpc64le",
             "powerpc64le": "powerpc64le", "powerpc64": "powerpc64", "s390x": "s390x"}


class TargetError(WorkbenchError, ValueError):
    """A target the workbench cannot build for or measure on; the message gives the valid forms."""


def host_target(threads: int | None = None) -> dict:
    from . import tvm_compat

    return {"kind": "llvm", "mcpu": tvm_compat.host_cpu(), "num-cores": resolve_threads(threads)}


def resolve_target(target: str | dict | None, threads: int | None = None) -> tuple[dict, str | None]:
    """(checked target dict, cross compiler or None) for `host`, a preset name, JSON or a dict.

    `threads`, when given, is the target's num-cores (a JSON num-cores that differs is refused).
    """
    cross = None
    if target is None or target == "host":
        from . import tvm_compat

        # num-cores is the device's to give when no thread count is (open_device fills it in).
        return {"kind": "llvm", "mcpu": tvm_compat.host_cpu(), **({"num-cores": threads} if threads else {})}, None
    if isinstance(target, str) and target in TARGET_PRESETS:
        target, cross = dict(TARGET_PRESETS[target]), CROSS_COMPILERS[target]
    elif isinstance(target, str):
        target = _parse_json(target)
    if isinstance(target, str):  # '"host"': JSON text that is a string, not a dict
        raise TargetError(f"target {json.dumps(target)} is a quoted string, not a target dict; name a preset or "
                          f"host without quotes, or {FORMS[4:]}")
    if not isinstance(target, dict):
        raise TargetError(f"target {json.dumps(target)} is not a target dict; {FORMS}")
    target = dict(target)
    if threads is not None:
        given = target.get("num-cores")
        if given is not None and given != threads:
            raise TargetError(f"the target's num-cores ({given!r}) and the thread count ({threads}) differ; "
                              "give one of them, or the same number")
        target["num-cores"] = threads
    check_target(target)
    return target, cross


def _parse_json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise TargetError(f"unknown target {text!r} (not a preset, and not JSON: {err.msg}); {FORMS}") from None


def check_target(target: dict) -> None:
    """Raise TargetError unless TVM accepts `target` and LLVM can generate CPU code for it."""
    kind = target.get("kind")
    if kind is None:
        raise TargetError(f"target {json.dumps(target)} has no 'kind'; {FORMS}")
    if kind != "llvm":
        raise TargetError(f"target kind {kind!r} is not supported: the workbench measures CPUs, whose code "
                          f"TVM generates with kind 'llvm'; {FORMS}")
    cores = target.get("num-cores")
    if cores is not None and (isinstance(cores, bool) or not isinstance(cores, int) or cores < 1):
        raise TargetError(f"the target's num-cores must be a positive integer, got {cores!r}")
    import tvm

    _check_llvm(target)  # first: TVM logs its own complaint about an invalid mcpu to stderr
    _check_mattr_form(target.get("mattr"))
    _check_mattr_known(target)  # before this process makes the target: LLVM warns about unknown features
    try:
        tvm.target.Target(target)
    except Exception as err:  # TVM raises ValueError/TVMError with a long message; keep its last line
        reason = (str(err).strip().splitlines() or ["invalid"])[-1][:300]
        raise TargetError(f"TVM cannot use target {json.dumps(target)}: {reason}; {FORMS}") from None


def _check_llvm(target: dict) -> None:
    # Asked about a triple it does not know, LLVM crashes the process: check the arch first.
    from tvm.target import codegen

    triple = target.get("mtriple") or codegen.llvm_get_system_triple()
    arch = str(triple).split("-")[0]
    if _llvm_target_name(arch) not in set(codegen.llvm_get_targets()):
        raise TargetError(f"mtriple {triple!r}: LLVM cannot generate code for architecture {arch!r}; "
                          "use a triple such as 'aarch64-linux-gnu' or 'armv7l-linux-gnueabihf'")
    cpu = target.get("mcpu")
    if cpu and not codegen.llvm_is_valid_cpu(str(cpu), str(triple)):
        raise TargetError(f"mcpu {cpu!r} is not a CPU of {triple!r} that LLVM knows; "
                          "leave mcpu out (generic code) or name one of that architecture")


def _check_mattr_form(mattr) -> None:
    if mattr is None:
        return
    if not isinstance(mattr, list) or not all(isinstance(f, str) for f in mattr):
        raise TargetError(f"the target's mattr must be a list of features such as [\"+neon\"], got {json.dumps(mattr)}")
    bad = [f for f in mattr if len(f) < 2 or f[0] not in "+-" or any(c.isspace() or c == "," for c in f)]
    if bad:
        raise TargetError(f"mattr entries must be +FEATURE or -FEATURE (e.g. \"+neon\", \"-avx512f\"), got {bad}")


def _check_mattr_known(target: dict) -> None:
    """Refuse an mattr feature LLVM does not know for the target's triple: LLVM would only warn
    (on every compile) and ignore it, and the results would be stored under a target that was not built."""
    mattr = target.get("mattr") or []
    triple = target.get("mtriple") or ""
    if not mattr or any(p.get("mtriple") == target.get("mtriple") and set(mattr) <= set(p.get("mattr", ()))
                        for p in TARGET_PRESETS.values()):
        return  # a preset's features are known good
    names = tuple(f[1:] for f in mattr)
    unknown = [f for f, n in zip(mattr, names) if n not in _enabled_features(triple, names)]
    if unknown:
        from tvm.target import codegen

        shown = triple or codegen.llvm_get_system_triple()
        raise TargetError(f"mattr {unknown}: not a feature LLVM knows for {shown!r}; use LLVM's feature names "
                          "(e.g. \"+avx2\" on x86, \"+neon\" on arm), or leave mattr out")


_FEATURES_PROBE = """
import json, sys
import tvm
from tvm.target import codegen
print(json.dumps(sorted(codegen.llvm_get_cpu_features(tvm.target.Target(json.loads(sys.argv[1]))))))
"""


@functools.lru_cache(maxsize=32)
def _enabled_features(triple: str, names: tuple[str, ...]) -> frozenset:
    """The features LLVM enables for `triple` with every one of `names` asked for: an unknown name
    is missing. Asked in a child process: LLVM writes "not a recognized feature" to this process's
    stderr for each unknown one, some of it only when the process exits."""
    import subprocess

    probe_target = {"kind": "llvm", "mattr": ["+" + n for n in names], **({"mtriple": triple} if triple else {})}
    try:
        done = subprocess.run([sys.executable, "-c", _FEATURES_PROBE, json.dumps(probe_target)], capture_output=True,
                              text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        return frozenset(json.loads(done.stdout.strip().splitlines()[-1]))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        reason = (done.stderr.strip().splitlines() or ["no answer"])[-1] if "done" in locals() else "no answer"
        raise TargetError(f"cannot ask LLVM which features {triple or 'this machine'} has ({reason[:200]}); "
                          "leave mattr out") from None


def _llvm_target_name(arch: str) -> str:
    """The LLVM backend name of a triple's architecture (armv7l -> arm, i686 -> i386, ...)."""
    arch = arch.lower()
    if arch.startswith(("armv", "armeb")) or arch == "arm":
        return "armeb" if arch.startswith("armeb") else "arm"
    if arch.startswith("thumb"):
        return "thumb"
    if arch in ("i486", "i586", "i686", "x86"):
        return "i386"
    if arch in ("arm64", "amd64"):
        return {"arm64": "aarch64", "amd64": "x86_64"}[arch]
    return arch


# ---------------------------------------------------------------- what a device is

def family(arch: str) -> str:
    """The architecture family of a `platform.machine()` value or a triple's first part."""
    arch = str(arch).lower()
    if arch.startswith(("armv", "thumb")) or arch in ("arm", "armhf", "armel"):
        return "arm"
    return _FAMILIES.get(arch, arch)


def target_family(target: dict) -> str:
    """The family the target's code runs on (no mtriple: the host's, as LLVM defaults to it)."""
    triple = target.get("mtriple")
    if not triple:
        from tvm.target import codegen

        triple = codegen.llvm_get_system_triple()
    return family(str(triple).split("-")[0])


EMULATED_ENV = "WORKBENCH_EMULATED"  # set by board.py for the emulated server: how it is emulated
SERVER_ENV = "WORKBENCH_SERVER"  # set by server.listen: which server of a key answered (host:port)


def device_info() -> dict:
    """This machine as a device reports itself: architecture and cores (an RPC server calls it),
    whether it is emulated (its timings are then no board's speed), and which server it is."""
    info = {"machine": platform.machine(), "cores": os.cpu_count() or 1, "system": platform.system()}
    if os.environ.get(EMULATED_ENV):
        info["emulated"] = os.environ[EMULATED_ENV]
    if os.environ.get(SERVER_ENV):
        info["server"] = os.environ[SERVER_ENV]
    return info


def device_info_json() -> str:
    return json.dumps(device_info())


def check_device(target: dict, info: dict, where: str) -> None:
    """Refuse a target whose code the device cannot run, and more threads than it has cores."""
    machine, cores = info.get("machine"), info.get("cores")
    if machine and target_family(target) != family(machine):
        raise TargetError(
            f"target {json.dumps(target)} generates {target_family(target)} code, but {where} runs on "
            f"{machine}: its timings would be saved under the wrong target. Measure a {target_family(target)} "
            "board through --tracker HOST:PORT --key KEY (python -m workbench serve on the board), "
            "or use --target host"
        )
    threads = target.get("num-cores")
    if cores and threads and threads > cores:
        raise TargetError(f"{threads} threads asked for, but {where} has {cores} core(s); "
                          f"pass --threads between 1 and {cores}")


def probe(device) -> dict:
    """The device's own report of its machine, over RPC (empty from a server without the probe)."""
    def ask(session):
        try:
            report = session.get_function(DEVICE_INFO)
        except Exception:  # a plain TVM server: nothing to check against
            return "{}"
        return str(report())

    return json.loads(device.run(ask))
