"""An emulated aarch64 board: `python -m workbench board --emulate aarch64 --tracker HOST:PORT`.

A stand-in for a Raspberry Pi running `python -m workbench serve`, built from public packages
and run under qemu-user on this machine:

- qemu-user-static with binfmt_misc (TVM's RPC server starts Python subprocesses, which the
  kernel must hand to qemu by itself);
- an arm64 Python 3.11 sysroot from Debian's packages, downloaded with a private APT
  configuration and unpacked with `dpkg -x` (no chroot, no root needed for this part);
- the aarch64 wheels of the pinned stack from PyPI (`pip install --target --platform`); torch's
  aarch64 wheel only for libtorch_cpu.so (NNPACK), with the two CUDA runtime wheels it links;
- a Cortex-A72 /proc/cpuinfo inside the sysroot: under qemu the process would read the host's
  x86 one (qemu's -L prefix redirects the read), and NNPACK's initialisation crashes on it.

Everything is cached under $WORKBENCH_CACHE (default ~/.cache/workbench)/board-aarch64, one
finished step marked by a stamp naming its inputs, so a second start only starts the server.
Timings measured on it are emulated: the server says so (device_info's "emulated"), and the
records and reports carry it; they are never a board's speed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from .errors import WorkbenchError
from .targets import EMULATED_ENV  # set in the emulated server's environment; device_info reports it

log = logging.getLogger(__name__)

BOARDS = ("aarch64",)
DEBIAN_ARCH = {"aarch64": "arm64"}
# The sysroot's glibc is Debian 12's 2.36: every manylinux tag up to it runs (NVIDIA's wheels carry older ones).
WHEEL_PLATFORMS = {"aarch64": [f"manylinux_2_{minor}_aarch64" for minor in range(36, 16, -1)] + ["manylinux2014_aarch64"]}
PYTHON_VERSION = "3.11"
# Debian packages of the sysroot: the interpreter and the C/C++ runtimes TVM's and torch's libraries link.
DEBIAN_PACKAGES = ("python3.11", "python3.11-venv", "libstdc++6", "libgcc-s1", "libgomp1", "zlib1g",
                   "ca-certificates")
# The board's Python packages: TVM's runtime with its RPC server's needs, numpy for the payloads.
STACK = ("apache-tvm", "apache-tvm-ffi", "numpy", "ml_dtypes", "typing_extensions", "psutil", "cloudpickle")
NNPACK_CARRIER = "torch"  # installed without its dependencies: only libtorch_cpu.so is used
# libtorch_cpu.so of the aarch64 wheel links libcudart and libcupti: these extras of torch's pinned
# cuda-toolkit bring them (small wheels); the rest of CUDA is left out.
CUDA_EXTRAS = ("cudart", "cupti")
REPO = Path(__file__).resolve().parents[1]
STEP_TIMEOUT = 1800  # seconds for one download-and-unpack step (a slow mirror, a large wheel)


class BoardError(WorkbenchError):
    """The emulated board cannot be set up or started here; the message says what is missing."""


def cache_root() -> Path:
    """$WORKBENCH_CACHE, else ~/.cache/workbench: kept between runs, never inside the repo."""
    given = os.environ.get("WORKBENCH_CACHE")
    return Path(given).expanduser() if given else Path.home() / ".cache" / "workbench"


def say(message: str) -> None:
    """A progress line on stderr (the board runs in the foreground of a terminal or CI log)."""
    print(f"board: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- qemu and binfmt

def qemu_binary(arch: str = "aarch64") -> str:
    for name in (f"qemu-{arch}-static", f"qemu-{arch}"):
        found = shutil.which(name)
        if found:
            return found
    raise BoardError(f"qemu-{arch}-static is not installed; as root: apt-get install qemu-user-static binfmt-support "
                     "(or make system-deps)")


BINFMT = Path("/proc/sys/fs/binfmt_misc")


def binfmt_entry(arch: str = "aarch64") -> Path:
    return BINFMT / f"qemu-{arch}"


def binfmt_ready(arch: str = "aarch64") -> bool:
    entry = binfmt_entry(arch)
    try:
        return entry.read_text().splitlines()[0].strip() == "enabled"
    except (OSError, IndexError):
        return False


def ensure_binfmt(arch: str = "aarch64") -> None:
    """Make the kernel run aarch64 programs through qemu: mount binfmt_misc and enable qemu's entry
    (as root), or say in one line what to run where this process may not."""
    qemu_binary(arch)
    if binfmt_ready(arch):
        return
    root = os.geteuid() == 0
    how = (f"as root: mount -t binfmt_misc binfmt_misc {BINFMT} && update-binfmts --enable qemu-{arch}")
    if not (BINFMT / "register").exists():
        if not root:
            raise BoardError(f"binfmt_misc is not mounted, which the emulated board needs; {how}")
        _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], 30,
             f"cannot mount binfmt_misc (a container without the privilege?); {how} on the host")
    if not binfmt_ready(arch):
        if not root or not shutil.which("update-binfmts"):
            raise BoardError(f"qemu-{arch} is not registered with binfmt_misc; {how} "
                             "(update-binfmts comes with binfmt-support)")
        _run(["update-binfmts", "--enable", f"qemu-{arch}"], 30, f"cannot register qemu-{arch} with binfmt_misc; {how}")
    if not binfmt_ready(arch):
        raise BoardError(f"qemu-{arch} is still not enabled in binfmt_misc; {how}")


def _run(argv: list[str], timeout: float, failure: str, env: dict | None = None) -> str:
    """Run a set-up command to its end (bounded); its last line of error output joins `failure`."""
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
    except FileNotFoundError:
        raise BoardError(f"{argv[0]} not found; {failure}") from None
    except OSError as err:  # ENOEXEC: an aarch64 program the kernel has no binfmt entry for
        raise BoardError(f"cannot run {argv[0]} ({err.strerror}); {failure}") from None
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException as err:  # a timeout or Ctrl-C: end its whole group (apt's and pip's helpers too)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        if isinstance(err, subprocess.TimeoutExpired):
            raise BoardError(f"{' '.join(argv[:3])} ... did not finish within {timeout:.0f} s; {failure}") from None
        raise
    if proc.returncode:
        lines = [l for l in (stderr or stdout).strip().splitlines() if l.strip()] or ["no output"]
        raise BoardError(f"{failure} ({argv[0]} exited {proc.returncode}: {lines[-1].strip()[:300]})")
    return stdout


# ---------------------------------------------------------------- the board's files

class EmulatedBoard:
    """The cached files of one emulated board and how to run its Python."""

    def __init__(self, arch: str = "aarch64", root: Path | None = None):
        if arch not in BOARDS:
            raise BoardError(f"--emulate {arch!r}: the workbench emulates {', '.join(BOARDS)} only (PyPI has no "
                             "armv7 wheels of TVM or torch; see the README for a real armv7 board)")
        self.arch = arch
        self.root = Path(root) if root else cache_root() / f"board-{arch}"

    @property
    def sysroot(self) -> Path:
        return self.root / "sysroot"

    @property
    def python(self) -> Path:
        return self.sysroot / "usr" / "bin" / f"python{PYTHON_VERSION}"

    @property
    def site(self) -> Path:
        return self.root / "site"  # the stack's wheels

    @property
    def torch_site(self) -> Path:
        return self.root / "site-torch"  # torch without its dependencies, and the libraries it links

    def ready(self) -> bool:
        return all(self._stamp(name).exists() and self._stamp(name).read_text() == key
                   for name, key in self._steps().items())

    # -- set-up, step by step, each skipped when its stamp matches
    def setup(self) -> float:
        """Everything the board needs, downloaded once; returns the seconds it took. Two boards
        starting at once set up one after the other (a lock on the cache), the second finding it done."""
        started = time.monotonic()
        self.root.mkdir(parents=True, exist_ok=True)
        with _locked(self.root / ".lock"):
            self._setup_steps()
        return time.monotonic() - started

    def _setup_steps(self) -> None:
        steps = self._steps()
        for name, action in (("sysroot", self._make_sysroot), ("cpuinfo", self._write_cpuinfo),
                             ("stack", self._install_stack), ("torch", self._install_torch)):
            stamp = self._stamp(name)
            if stamp.exists() and stamp.read_text() == steps[name]:
                continue
            action()
            stamp.write_text(steps[name])

    def _stamp(self, name: str) -> Path:
        return self.root / f".done-{name}"

    def _steps(self) -> dict[str, str]:
        """Each step's inputs, hashed: a changed pin or package list redoes that step only."""
        pins = pinned_versions()
        def digest(*parts) -> str:
            return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
        return {"sysroot": digest(DEBIAN_PACKAGES, self.arch), "cpuinfo": digest(cortex_a72_cpuinfo(os.cpu_count() or 1)),
                "stack": digest([pins.get(p) for p in STACK], STACK),
                "torch": digest(pins.get(NNPACK_CARRIER), CUDA_EXTRAS)}

    def _make_sysroot(self) -> None:
        if not shutil.which("apt-get") or not shutil.which("dpkg"):
            raise BoardError("apt-get and dpkg are needed to fetch the board's Python from Debian's arm64 packages; "
                             "run the board on Debian (or a Debian container)")
        say(f"downloading Debian's {DEBIAN_ARCH[self.arch]} Python {PYTHON_VERSION} ({', '.join(DEBIAN_PACKAGES)})")
        env = {**os.environ, "APT_CONFIG": str(self._apt_config()), "DEBIAN_FRONTEND": "noninteractive"}
        hint = "check that apt-get update works on this machine (Debian's mirrors reachable)"
        _run(["apt-get", "update", "-q"], STEP_TIMEOUT, f"apt-get update for {DEBIAN_ARCH[self.arch]} failed; {hint}", env)
        _run(["apt-get", "install", "-d", "-y", "-q", "--no-install-recommends", *DEBIAN_PACKAGES], STEP_TIMEOUT,
             f"downloading the {DEBIAN_ARCH[self.arch]} packages failed; {hint}", env)
        debs = sorted((self.root / "apt" / "cache" / "archives").glob("*.deb"))
        if not debs:
            raise BoardError(f"apt-get downloaded no {DEBIAN_ARCH[self.arch]} package; {hint}")
        say(f"unpacking {len(debs)} packages into {self.sysroot}")
        fresh = self.sysroot.with_name("sysroot.partial")
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.mkdir(parents=True)
        for deb in debs:
            _run(["dpkg", "-x", str(deb), str(fresh)], 300, f"cannot unpack {deb.name}")
        shutil.rmtree(self.sysroot, ignore_errors=True)
        fresh.rename(self.sysroot)  # whole or not at all: an interrupted unpack is redone
        if not self.python.exists():
            raise BoardError(f"the unpacked packages hold no {self.python.name}; remove {self.root} and start again")

    def _apt_config(self) -> Path:
        """APT configured for the board's architecture, with its own lists, cache and (empty) dpkg
        status, so every dependency is downloaded and the host's APT state is never touched."""
        apt = self.root / "apt"
        for folder in ("state/lists/partial", "cache/archives/partial"):
            (apt / folder).mkdir(parents=True, exist_ok=True)
        (apt / "state" / "status").touch()
        config = apt / "apt.conf"
        arch = DEBIAN_ARCH[self.arch]
        config.write_text("\n".join([
            f'APT::Architecture "{arch}";', f'APT::Architectures {{ "{arch}"; }};',
            f'Dir::State "{apt / "state"}";', f'Dir::State::status "{apt / "state" / "status"}";',
            f'Dir::Cache "{apt / "cache"}";', 'Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";',
            'APT::Sandbox::User "root";',  # our folders, not _apt's: no privilege drop for downloads
            'APT::Install-Recommends "false";', ""]))
        return config

    def _write_cpuinfo(self) -> None:
        proc = self.sysroot / "proc"
        proc.mkdir(parents=True, exist_ok=True)
        (proc / "cpuinfo").write_text(cortex_a72_cpuinfo(os.cpu_count() or 1))

    def _pip_args(self) -> list[str]:
        platforms = [arg for p in WHEEL_PLATFORMS[self.arch] for arg in ("--platform", p)]
        return ["--quiet", "--disable-pip-version-check", *platforms, "--only-binary=:all:",
                "--python-version", PYTHON_VERSION, "--implementation", "cp"]

    def _pip(self, target: Path, args: list[str], what: str) -> None:
        fresh = target.with_name(target.name + ".partial")
        shutil.rmtree(fresh, ignore_errors=True)
        _run([sys.executable, "-m", "pip", "install", "--no-compile", "--target", str(fresh), *self._pip_args(), *args],
             STEP_TIMEOUT, f"pip could not install the {self.arch} wheels of {what}; check that PyPI is reachable")
        shutil.rmtree(target, ignore_errors=True)
        fresh.rename(target)  # whole or not at all

    def _download(self, dest: Path, args: list[str], what: str) -> None:
        _run([sys.executable, "-m", "pip", "download", "--dest", str(dest), *self._pip_args(), *args], STEP_TIMEOUT,
             f"pip could not download the {self.arch} wheel of {what}; check that PyPI is reachable")

    def _install_stack(self) -> None:
        pins = pinned_versions()
        wanted = [f"{p}=={pins[p]}" if p in pins else p for p in STACK]
        say(f"installing the {self.arch} wheels of {', '.join(wanted)}")
        constraints = REPO / "requirements.lock"
        self._pip(self.site, [*wanted, *(["-c", str(constraints)] if constraints.exists() else [])], "TVM")

    def _install_torch(self) -> None:
        pins = pinned_versions()
        torch = f"{NNPACK_CARRIER}=={pins[NNPACK_CARRIER]}" if NNPACK_CARRIER in pins else NNPACK_CARRIER
        wheels = self.root / "wheels"
        say(f"downloading the {self.arch} wheel of {torch} (it carries NNPACK; large, downloaded once)")
        self._download(wheels, ["--no-deps", torch], torch)
        version = torch.partition("==")[2]
        wheel = max(wheels.glob(f"torch-{version}-*.whl" if version else "torch-*.whl"), key=lambda p: p.stat().st_mtime)
        runtime = cuda_runtime_requirement(wheel)
        cuda = wheels / "cuda"
        shutil.rmtree(cuda, ignore_errors=True)
        say(f"downloading {runtime} (the CUDA runtime libraries libtorch_cpu.so links)")
        self._download(cuda, [runtime], runtime)
        # One install, no dependency resolution: torch's RPATH finds the CUDA libraries beside it.
        say(f"installing {wheel.name} without its dependencies, and the CUDA runtime wheels")
        self._pip(self.torch_site, ["--no-deps", str(wheel), *map(str, sorted(cuda.glob("*.whl")))], "torch")

    # -- running
    def env(self, extra: dict | None = None) -> dict:
        """The emulated Python's environment: the sysroot as qemu's prefix, the wheels and this
        workbench importable, and the mark that says every timing here is emulated."""
        path = os.pathsep.join(map(str, (self.site, self.torch_site, self._source())))
        qemu = Path(qemu_binary(self.arch)).name
        return {**{k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))},
                "QEMU_LD_PREFIX": str(self.sysroot), "PYTHONPATH": path, "PYTHONNOUSERSITE": "1",
                "PYTHONDONTWRITEBYTECODE": "1", EMULATED_ENV: f"{qemu} ({self.arch} user-mode emulation)",
                **(extra or {})}

    def _source(self) -> Path:
        """A folder holding only this workbench package (a link to it): never the host's site-packages,
        whose x86 extensions the emulated Python must not find. One per package location, so boards
        started from two checkouts do not share it."""
        package = Path(__file__).resolve().parent
        folder = self.root / f"src-{hashlib.sha256(str(package).encode()).hexdigest()[:12]}"
        link = folder / package.name
        folder.mkdir(parents=True, exist_ok=True)
        if not (link.is_symlink() and link.resolve() == package):
            link.unlink(missing_ok=True)
            try:
                link.symlink_to(package, target_is_directory=True)
            except FileExistsError:  # a board started at the same moment made the same link
                pass
        return folder

    def check_python(self, timeout: float = 300) -> str:
        """Run the emulated Python once: the sysroot, binfmt and the wheels work (TVM imports)."""
        probe = "import platform, tvm; print(platform.machine(), tvm.__version__)"
        out = _run([str(self.python), "-c", probe], timeout,
                   f"the emulated Python cannot import TVM; remove {self.root} to set the board up again", self.env())
        return out.strip()


@contextlib.contextmanager
def _locked(path: Path):
    import fcntl

    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"another board is setting up {path.parent}; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)  # Ctrl-C still interrupts the wait
        yield


def pinned_versions(lock: Path = REPO / "requirements.lock") -> dict[str, str]:
    """name -> version from requirements.lock (names lower-cased, '_' as '-'), else from the installed
    package's own pins (pyproject's dependencies)."""
    pins = {}
    try:
        lines = lock.read_text().splitlines()
    except OSError:
        from importlib import metadata

        try:
            lines = [r.split(";")[0] for r in metadata.requires("unet-workbench") or []]
        except metadata.PackageNotFoundError:
            lines = []
    for line in lines:
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    for name in list(pins):  # STACK spells some names with '_'
        pins.setdefault(name.replace("-", "_"), pins[name])
    return pins


def cuda_runtime_requirement(wheel: Path) -> str:
    """torch's own pin of cuda-toolkit, with only the extras whose libraries libtorch_cpu.so links."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(name).decode()
    for line in metadata.splitlines():
        requirement = line.partition("Requires-Dist:")[2].split(";")[0].replace(" ", "")
        if requirement.startswith("cuda-toolkit[") and "==" in requirement:
            return f"cuda-toolkit[{','.join(CUDA_EXTRAS)}]=={requirement.split('==', 1)[1]}"
    raise BoardError(f"{wheel.name} does not pin cuda-toolkit; this torch is not the one the board was made for "
                     "(torch 2.13's aarch64 wheel); pin torch==2.13.0 in requirements.lock")


def cortex_a72_cpuinfo(cores: int) -> str:
    """/proc/cpuinfo as a Raspberry Pi 4 (4x Cortex-A72) reports it, with this machine's core count."""
    block = ("processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
             "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\n"
             "CPU revision\t: 3\n\n")
    return "".join(block.format(n=n) for n in range(cores)) + "Hardware\t: BCM2835\nModel\t\t: emulated Cortex-A72\n"


# ---------------------------------------------------------------- serving

def run_board(arch: str, tracker: str, key: str | None = None, threads: int | None = None, port: int = 9090,
              start_timeout: float = 600) -> None:
    """Set the board up (cached), then serve it at the tracker until Ctrl-C or SIGTERM."""
    from .lifeline import spawn_env
    from .rpc import DEFAULT_KEY, KEY_ENV, parse_tracker, probe_tracker, thread_env
    from .threads import resolve_threads

    parse_tracker(tracker)
    probe_tracker(*parse_tracker(tracker))  # a wrong address fails before minutes of set-up
    board = EmulatedBoard(arch)
    ensure_binfmt(arch)
    cached = board.ready()
    say(f"{'cached' if cached else 'setting up'} in {board.root}")
    seconds = board.setup()
    say(f"set up in {seconds:.0f} s")
    if not cached:  # once, after a set-up: a broken sysroot or wheel fails here in one line
        say(f"emulated Python: {board.check_python()}")
    threads = resolve_threads(threads)
    key = key or os.environ.get(KEY_ENV) or DEFAULT_KEY
    env = board.env({**thread_env(threads), KEY_ENV: key, **spawn_env()})
    argv = [str(board.python), "-m", "workbench", "serve", "--tracker", tracker, "--port", str(port),
            "--threads", str(threads)]
    say(f"starting the emulated server (port {port}, {threads} thread(s)); importing TVM under emulation takes a while")
    server = subprocess.Popen(argv, env=env, start_new_session=True)  # its own group: ended whole
    try:
        _await_registration(server, tracker, key, start_timeout)
        say(f"serving {arch} (emulated) at tracker {tracker}; Ctrl-C stops it")
        code = server.wait()
        raise BoardError(f"the emulated server exited with code {code}; see its messages above")
    finally:
        _end_group(server)


def _await_registration(server: subprocess.Popen, tracker: str, key: str, timeout: float) -> None:
    """Wait (bounded) until the emulated server has registered its key at the tracker."""
    from .rpc import Device, parse_tracker

    device = Device(*parse_tracker(tracker), key=key)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise BoardError(f"the emulated server exited with code {server.returncode} before registering; "
                             "see its messages above")
        if device.alive(wait=2):
            return
        time.sleep(1)
    raise BoardError(f"the emulated server did not register at tracker {tracker} within {timeout:.0f} s; "
                     "see its messages above")


def emulation_unavailable(arch: str = "aarch64") -> str | None:
    """Why an emulated board cannot run here, or None: qemu-user installed and binfmt_misc ready.
    As root, binfmt_misc is set up here as the board would (a container may not allow it)."""
    try:
        ensure_binfmt(arch)
    except BoardError as err:
        return str(err)
    return None


def _end_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the server's whole group, then SIGKILL whatever is left (forked session processes)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
