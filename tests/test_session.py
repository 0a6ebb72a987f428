"""A notebook's device session: closed explicitly, when dropped, and when its kernel shuts down."""

import gc
import json
import signal
import subprocess
import sys
import time

import pytest
from processes import group_alive

from workbench.errors import WorkbenchError
from workbench.session import DeviceSession, open_session


def _wait_until_gone(groups, timeout: float = 20.0) -> dict[int, list[int]]:
    """Poll until no process of `groups` is alive; return the survivors per group (empty if none)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = {g: pids for g in groups if (pids := group_alive(g))}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def test_a_session_runs_on_its_device_and_close_stops_its_cluster():
    session = open_session(threads=1)
    groups = session.pids
    assert len(groups) == 2  # tracker and one server
    assert all(group_alive(g) for g in groups)
    assert session.device.run(lambda s: s.cpu(0).exist)
    assert "local cluster" in repr(session) and session.tracker in repr(session) and "open" in repr(session)
    assert session.device.key not in repr(session)  # a local cluster's key is its secret

    # A second session on the same tracker is a remote one: it owns no process and stops none.
    with open_session(tracker=session.tracker, key=session.device.key) as remote:
        assert remote.pids == []
        assert remote.device.run(lambda s: s.cpu(0).exist)
        assert "remote tracker" in repr(remote)
    assert remote.closed and all(group_alive(g) for g in groups)

    session.close()
    session.close()  # idempotent
    assert session.closed and "closed" in repr(session)
    for group in groups:
        assert group_alive(group) == [], "an RPC process outlived the closed session"
    assert session.pids == groups  # still listed, so callers can check
    with pytest.raises(WorkbenchError, match="closed"):
        session.device


def test_a_dropped_session_is_closed_by_garbage_collection():
    session = open_session(threads=1)
    assert isinstance(session, DeviceSession)
    groups = session.pids
    del session
    gc.collect()
    assert _wait_until_gone(groups, timeout=10) == {}


HARD_KILLED = """
import json, os, signal
from workbench.session import open_session
session = open_session(threads=1)
print(json.dumps(session.pids), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no finalizer, no atexit: the cluster must notice by itself
"""


def test_a_session_whose_process_is_killed_outright_leaves_no_rpc_process_behind():
    proc = subprocess.run([sys.executable, "-c", HARD_KILLED], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    groups = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(groups) == 2
    survivors = _wait_until_gone(groups, timeout=20)
    assert survivors == {}, f"processes of a killed session's cluster still run: {survivors}"


NOTEBOOK_CELLS = [
    "import json\nfrom workbench.session import open_session",
    "session = open_session(threads=1)\nassert session.device.run(lambda s: s.cpu(0).exist)",
    "with open({pids_file!r}, 'w') as out:\n    json.dump(session.pids, out)",
    "raise RuntimeError('cell fails')",
    "session.close()",
]


def test_a_notebook_whose_cell_fails_leaves_no_rpc_process_behind(tmp_path):
    import nbformat
    import papermill

    pids_file = tmp_path / "pids.json"
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(cell.format(pids_file=str(pids_file))) for cell in NOTEBOOK_CELLS]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    source, output = tmp_path / "session.ipynb", tmp_path / "session-out.ipynb"
    nbformat.write(notebook, str(source))

    # The kernel inherits this environment, PYTHONPATH included, so it imports this checkout.
    with pytest.raises(papermill.PapermillExecutionError, match="cell fails"):
        papermill.execute_notebook(str(source), str(output), kernel_name="python3", progress_bar=False,
                                   cwd=str(tmp_path))

    groups = json.loads(pids_file.read_text())
    assert len(groups) == 2, "the notebook did not record its cluster's process groups"
    survivors = _wait_until_gone(groups, timeout=20)
    assert survivors == {}, f"processes of the notebook's cluster still run after its kernel shut down: {survivors}"
