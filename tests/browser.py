"""Real-browser helpers: a JupyterLab server in its own process group, and Debian's Chromium.

The server runs from this environment on 127.0.0.1 with a random port and token; its kernels
import the `workbench` of the tree the tests run from. Stopping it ends its kernels too, and
reports any process that outlived it.
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from processes import group_alive

ROOT = Path(__file__).resolve().parents[1]

# As root Chromium needs --no-sandbox; the rest keeps it off the network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def chromium_path() -> str | None:
    """Debian's Chromium (or WORKBENCH_CHROMIUM), None if there is none."""
    found = os.environ.get("WORKBENCH_CHROMIUM") or shutil.which("chromium")
    return found if found and os.access(found, os.X_OK) else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class JupyterLab:
    """A JupyterLab server serving `root`; use as a context manager."""

    def __init__(self, root: Path, log_path: Path, start_timeout: float = 60):
        self.root, self.log_path, self.start_timeout = Path(root), Path(log_path), start_timeout
        self.port, self.token = free_port(), secrets.token_hex(16)
        self.proc: subprocess.Popen | None = None
        self.leftovers: list[str] = []

    def url(self, path: str = "lab") -> str:
        return f"http://127.0.0.1:{self.port}/{path}?token={self.token}"

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def _env(self) -> dict:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        # The user's Jupyter config, settings and workspaces stay out of the test.
        private = self.log_path.parent / "jupyter"
        for name in ("JUPYTER_CONFIG_DIR", "JUPYTER_RUNTIME_DIR", "JUPYTERLAB_SETTINGS_DIR",
                     "JUPYTERLAB_WORKSPACES_DIR"):
            env[name] = str(private / name.lower())
        # No "Jupyter news?" toast (a network fetch, and it covers widgets the test clicks); every cell
        # rendered, so a widget's text is there to read wherever it is on the page.
        settings = private / "jupyterlab_settings_dir" / "@jupyterlab"
        for path, value in (("apputils-extension/notification", {"fetchNews": "false"}),
                            ("notebook-extension/tracker", {"windowingMode": "none"})):
            (settings / path).parent.mkdir(parents=True, exist_ok=True)
            (settings / f"{path}.jupyterlab-settings").write_text(json.dumps(value))
        return env

    def start(self):
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1",
               f"--port={self.port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
               "--LabApp.expose_app_in_browser=True",
               "--allow-root",  # CI runs as root
               # Offline: no news feed, no update check, no extension index.
               "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
               "--LabApp.extension_manager=readonly"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self._env(), cwd=self.root, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self):
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited ({self.proc.returncode}); log: {self.log_path}\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.request("api/status"), timeout=2) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)  # polling the server, not waiting on the page
        raise TimeoutError(f"JupyterLab did not answer in {self.start_timeout} s; log: {self.log_path}\n"
                           f"{self.log_tail()}")

    def request(self, path: str, method: str = "GET") -> urllib.request.Request:
        return urllib.request.Request(f"http://127.0.0.1:{self.port}/{path}", method=method,
                                      headers={"Authorization": f"token {self.token}"})

    def kernels(self) -> list[dict]:
        with urllib.request.urlopen(self.request("api/kernels"), timeout=5) as reply:
            return json.load(reply)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30):
        """Shut the server and its kernels down; whatever outlives it is killed and listed in `leftovers`."""
        if self.proc is None:
            return
        family = _family(self.proc.pid)
        if self.proc.poll() is None:
            try:  # the server's own shutdown ends its kernels first
                urllib.request.urlopen(self.request("api/shutdown", "POST"), timeout=5).close()
            except (urllib.error.URLError, OSError):
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        _, alive = psutil.wait_procs(family, timeout=10)
        alive += [p for p in map(_process, group_alive(self.proc.pid)) if p and p not in alive]
        self.leftovers = [f"{p.pid} {_describe(p)}" for p in alive]
        for proc in alive:
            _kill(proc)
        self.proc = None


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _family(pid: int) -> list[psutil.Process]:
    """The server's descendants: kernels run in sessions of their own, so the group alone misses them."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _signal_group(pgid: int, sig: int):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(proc: psutil.Process):
    try:
        proc.kill()
    except psutil.NoSuchProcess:
        pass


def _describe(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())[:200]
    except psutil.Error:
        return "?"


def parameterize(source: Path, target: Path, parameters: dict):
    """Copy a notebook with papermill's injected-parameters cell after its `parameters` cell."""
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    notebook = parameterize_notebook(load_notebook_node(str(source)), parameters)  # papermill's own reader and cell
    nbformat.write(notebook, target)


# --- the page side (Playwright, sync API) ---

def launch_chromium(playwright, path: str):
    return playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)


def watch_console(page) -> list[str]:
    """The page's console messages and uncaught errors, as they come."""
    lines: list[str] = []
    page.on("console", lambda msg: lines.append(f"{msg.type}: {msg.text}"))
    page.on("pageerror", lambda err: lines.append(f"pageerror: {err}"))
    return lines


def save_artifacts(page, console: list[str], folder: Path) -> list[Path]:
    """A screenshot and the console log, for a failed test."""
    shot, log = folder / "failure.png", folder / "console.log"
    log.write_text("\n".join(console) + "\n")
    try:
        page.screenshot(path=str(shot), full_page=True, timeout=15_000)
    except Exception as err:  # the page may be what broke; the log still helps
        log.write_text(log.read_text() + f"screenshot failed: {err}\n")
        return [log]
    return [shot, log]


_NOTEBOOK_READY = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const kernel = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return !!(kernel && w.context.isReady && kernel.connectionStatus === 'connected' && kernel.status === 'idle');
}"""


def open_notebook(page, lab: JupyterLab, name: str, timeout_ms: int = 90_000):
    """Open a notebook of the server's root and wait until its kernel is connected and idle."""
    page.goto(lab.url(f"lab/tree/{name}"), timeout=timeout_ms)
    page.wait_for_function(_NOTEBOOK_READY, timeout=timeout_ms, polling=250)


_START_RUN = """([command, stopBefore]) => {
  window.__wbRunAll = null;
  const notebook = window.jupyterapp.shell.currentWidget.content;
  if (stopBefore !== null)
    notebook.activeCellIndex = notebook.widgets.findIndex(c => c.model.sharedModel.getSource().includes(stopBefore));
  window.jupyterapp.commands.execute(command)
    .then(ok => { window.__wbRunAll = ok ? 'ok' : 'failed'; }, err => { window.__wbRunAll = 'error: ' + err; });
}"""

_CELL_ERRORS = """() => {
  const errors = [];
  for (const cell of window.jupyterapp.shell.currentWidget.content.widgets) {
    if (cell.model.type !== 'code') continue;
    for (const out of cell.model.outputs.toJSON())
      if (out.output_type === 'error') errors.push(out.ename + ': ' + out.evalue);
  }
  return errors;
}"""


def run_all_cells(page, timeout_ms: int, stop_before: str | None = None) -> list[str]:
    """Run every cell (or every cell above the first whose source holds `stop_before`) with the Lab's own
    command; the errors the cells raised (empty if none)."""
    command = "notebook:run-all-cells" if stop_before is None else "notebook:run-all-above"
    page.evaluate(_START_RUN, [command, stop_before])
    page.wait_for_function("() => window.__wbRunAll !== null", timeout=timeout_ms, polling=250)
    errors = page.evaluate(_CELL_ERRORS)
    outcome = page.evaluate("() => window.__wbRunAll")
    return errors if errors or outcome == "ok" else [outcome]


CHART_SIZE = """root => {
  const gd = root.matches('.js-plotly-plot') ? root : root.querySelector('.js-plotly-plot');
  if (!gd || !gd.data) return null;
  const points = gd.data.reduce((n, t) => n + ((t.x || t.y || []).length || 0), 0);
  return [gd.data.length, points];
}"""


def chart_size(locator) -> tuple[int, int] | None:
    """(traces, points) drawn by the plotly chart inside `locator`, None before it is drawn."""
    size = locator.evaluate(CHART_SIZE)
    return tuple(size) if size else None


def wait_text_changes(page, locator, before: str, timeout_ms: int) -> str:
    """Wait until the element's text is no longer `before`; its new text."""
    page.wait_for_function("([el, before]) => el.textContent !== before", arg=[locator.element_handle(), before],
                           timeout=timeout_ms, polling=200)
    return locator.text_content()


def wait_chart_grows(page, locator, before: tuple[int, int], timeout_ms: int) -> tuple[int, int]:
    """Wait until the chart draws more traces or points than `before`; its new size."""
    grown = ("([root, before]) => { const s = (" + CHART_SIZE + ")(root);"
             " return !!s && (s[0] > before[0] || s[1] > before[1]); }")
    page.wait_for_function(grown, arg=[locator.element_handle(), list(before)], timeout=timeout_ms, polling=200)
    return chart_size(locator)


_KNOB_NAME = """el => [...el.classList].find(c => c.startsWith('wb-knob-')).slice('wb-knob-'.length)"""


def change_knob(page, control, timeout_ms: int) -> tuple[str, str]:
    """Move a knob control (a Dropdown's select, or a slider by keyboard) to another value: (name, value)."""
    name = control.evaluate(_KNOB_NAME)
    select = control.locator("select")
    if select.count():
        current = select.input_value()
        values = select.locator("option").evaluate_all("options => options.map(o => o.value)")
        choice = next(v for v in values if v != current)
        select.select_option(value=choice)
        return name, select.locator(f"option[value='{choice}']").text_content()
    handle, readout = control.locator(".noUi-handle"), control.locator(".widget-readout")
    before = readout.text_content()
    at_end = handle.get_attribute("aria-valuenow") == handle.get_attribute("aria-valuemax")
    handle.focus()
    handle.press("ArrowLeft" if at_end else "ArrowRight")
    return name, wait_text_changes(page, readout, before, timeout_ms)
