"""Records that cannot tear or double, work dirs checked at the door, an export that does not overwrite.

Real processes throughout: the command line in a subprocess (cwd in a temporary folder, so
anything written outside the work dir shows), a second process holding the work dir's lock,
the session's local RPC cluster for the measurements.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from workbench.model import save_onnx
from workbench.plan import Plan
from workbench.records import LOCK_NAME, RecordStore, WorkDir, WorkDirBusyError

from processes import group_alive

LAYER = "head_conv"  # the small model's 1x1 conv: every candidate, measured in seconds
KEY = ("layer", "impl")


def cli(*args, cwd, timeout=120):
    return subprocess.run([sys.executable, "-m", "workbench", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def listing(root) -> dict:
    """Every path under root (symlinks not followed) with its kind, size and modification time."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            info = os.lstat(path)
            found[os.path.relpath(path, root)] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return found


def one_line_error(proc) -> str:
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert proc.stdout == ""
    return lines[0]


@pytest.fixture(scope="module")
def onnx_file(small_model, tmp_path_factory):
    return save_onnx(small_model, tmp_path_factory.mktemp("model") / "small.onnx")


# ---------------------------------------------------------------- the records file

def test_a_torn_last_line_is_set_aside_and_the_next_record_is_whole(tmp_path):
    store = RecordStore(tmp_path / "results" / "records.jsonl")
    first = store.append("conv_measurement", {"layer": "a", "impl": "x", "median_ms": 1.0})
    whole = json.dumps({**first, "layer": "b"})
    with store.path.open("a") as f:  # what a kill mid-write leaves: half a line, no newline
        f.write(whole[: len(whole) // 2])
    store.append("conv_measurement", {"layer": "c", "impl": "x", "median_ms": 2.0})
    lines = store.path.read_text().splitlines()
    assert [json.loads(line)["layer"] for line in lines] == ["a", "c"]
    assert store.path.read_text().endswith("\n")
    torn = store.torn_path.read_text().splitlines()
    assert torn[0].startswith("# ") and torn[1] == whole[: len(whole) // 2]
    assert [r["layer"] for r in store.read()] == ["a", "c"]


APPEND_FOREVER = """
import sys
from workbench.records import RecordStore
store, blob = RecordStore(sys.argv[1]), "x" * (8 << 20)
print("appending", flush=True)
while True:
    store.append("big", {"blob": blob})
"""


def test_a_writer_killed_mid_write_leaves_a_tail_the_next_append_sets_aside(tmp_path):
    """SIGKILL lands inside an 8 MB write() often enough (the kernel stops a write at a page boundary
    for a fatal signal): the file really ends mid-record, and the next append must not glue onto it."""
    store = RecordStore(tmp_path / "records.jsonl")
    for attempt in range(20):
        store.path.unlink(missing_ok=True)
        writer = subprocess.Popen([sys.executable, "-c", APPEND_FOREVER, str(store.path)], stdout=subprocess.PIPE,
                                  text=True, start_new_session=True)
        assert writer.stdout.readline().strip() == "appending"
        time.sleep(0.2 + 0.03 * attempt)
        os.killpg(writer.pid, signal.SIGKILL)
        writer.wait(timeout=30)
        writer.stdout.close()
        if not store.path.read_bytes().endswith(b"\n"):
            break
    else:
        pytest.fail("20 kills never landed mid-write")
    data = store.path.read_bytes()
    end = data.rfind(b"\n") + 1
    store.append("small", {"n": 1})
    assert [r["kind"] for r in store.read()] == ["big"] * data.count(b"\n") + ["small"]
    assert store.path.read_bytes()[:end] == data[:end]  # the whole records kept as they were
    assert store.torn_path.read_bytes().endswith(b"\n" + data[end:] + b"\n")  # the fragment, set aside whole


def test_a_run_that_starts_sets_a_torn_tail_aside_before_anything_is_appended(tmp_path):
    work = WorkDir.at(tmp_path / "w")
    work.records.append("ceilings", {"peak_gflops": 1.0})
    with work.records.path.open("a") as f:
        f.write('{"kind": "ceil')
    with work.lock("test"):
        assert work.records.path.read_text().endswith("\n")
        assert len(work.records.read()) == 1
    assert '{"kind": "ceil' in work.records.torn_path.read_text()


def test_reading_skips_lines_that_are_not_records_and_says_so_once(tmp_path, caplog):
    store = RecordStore(tmp_path / "records.jsonl")
    store.append("k", {"n": 1})
    with store.path.open("ab") as f:
        f.write(b'[1, 2]\n"text"\n\xff\xfe not utf-8\n{"kind": "k", "n": 2}\n')
    with caplog.at_level(logging.WARNING, logger="workbench.records"):
        assert [r["n"] for r in store.read("k")] == [1, 2]
        assert [r["n"] for r in store.read("k")] == [1, 2]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "skipped 3 line(s)" in warnings[0] and "line 2, 3, 4" in warnings[0]


def test_latest_duplicates_and_compaction_agree_on_one_live_record_per_key(tmp_path):
    store = RecordStore(tmp_path / "records.jsonl")
    for run in range(2):
        for layer in ("a", "b"):
            store.append("conv_measurement", {"layer": layer, "impl": "x", "median_ms": run},
                         device={"target": {"kind": "llvm"}})
    store.append("ceilings", {"peak_gflops": 3.0})
    assert store.duplicates("conv_measurement", KEY) == {("a", "x"): 2, ("b", "x"): 2}
    latest = store.latest("conv_measurement", KEY, {"device.target": {"kind": "llvm"}})
    assert {k: r["median_ms"] for k, r in latest.items()} == {("a", "x"): 1, ("b", "x"): 1}
    assert store.latest("conv_measurement", KEY, {"device.target": {"kind": "arm"}}) == {}
    assert store.compact({"conv_measurement": KEY}) == 2
    assert store.duplicates("conv_measurement", KEY) == {}
    assert [r.get("median_ms") for r in store.read()] == [1, 1, None]  # the newest kept, other kinds untouched
    assert store.latest("conv_measurement", KEY) == latest


# ---------------------------------------------------------------- one writer per work dir

def test_a_second_holder_is_refused_and_a_released_lock_is_free(tmp_path):
    work = WorkDir.at(tmp_path / "w")
    with work.lock("first"):
        holder = json.loads((work.root / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["command"] == "first"
        with pytest.raises(WorkDirBusyError, match=rf"pid {os.getpid()} \(`first`, since "):
            with work.lock("second"):
                pass
    assert (work.root / LOCK_NAME).read_text() == ""  # released: the file claims no holder
    with work.lock("third"):
        pass


HOLD = """
import sys, time
from workbench.records import WorkDir
with WorkDir.at(sys.argv[1]).lock("holder"):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """A real second process holding tmp_path/busy, killed (its whole group) at the end."""
    work = tmp_path / "busy"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(work)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc, work
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()


def test_a_busy_work_dir_is_refused_at_once_and_a_dead_holders_lock_does_not_block(holder, onnx_file, tmp_path):
    proc, work = holder
    before = listing(tmp_path)
    for command in (["compare", "--layers", LAYER, "--quick"], ["tune", "--layers", LAYER, "--trials", "1"],
                    ["study", "--quick"]):
        started = time.monotonic()
        line = one_line_error(cli(*command, "--model", onnx_file, "--work-dir", work, cwd=tmp_path))
        assert time.monotonic() - started < 30  # at once: no cluster started, nothing measured
        assert f"pid {proc.pid} (`holder`, since " in line and "another --work-dir" in line, line
    assert listing(tmp_path) == before
    os.killpg(proc.pid, signal.SIGKILL)  # dies holding it: the file still names it, the kernel freed the lock
    proc.wait(timeout=30)
    assert group_alive(proc.pid) == []
    assert json.loads((work / LOCK_NAME).read_text())["pid"] == proc.pid
    with WorkDir.at(work).lock("after"):
        pass


# ---------------------------------------------------------------- two real runs on one work dir

def test_two_compare_runs_leave_one_record_per_key_even_after_a_torn_write(cluster, onnx_file, tmp_path):
    work = tmp_path / "w"
    args = ["compare", "--model", onnx_file, "--layers", LAYER, "--quick", "--work-dir", work,
            "--tracker", f"127.0.0.1:{cluster.port}", "--key", cluster.key, "--json"]
    first = cli(*args, cwd=tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    store = WorkDir.at(work).records
    lines = store.path.read_text().splitlines()
    assert len(lines) == len(json.loads(first.stdout)) > 5
    # The last record cut by a kill mid-write: the next run must re-measure it on a line of its own.
    cut = lines[-1][: len(lines[-1]) // 2]
    store.path.write_text("\n".join(lines[:-1]) + "\n" + cut)
    second = cli(*args, cwd=tmp_path, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    again = store.path.read_text().splitlines()
    assert len(again) == len(lines) and all(json.loads(line)["kind"] == "conv_measurement" for line in again)
    assert again[:-1] == lines[:-1]  # everything else resumed, not measured twice
    assert json.loads(again[-1])["impl"] == json.loads(lines[-1])["impl"]
    assert cut in store.torn_path.read_text()
    assert store.duplicates("conv_measurement", KEY) == {}
    assert len(store.latest("conv_measurement", KEY)) == len(json.loads(second.stdout)) == len(lines)
    assert "cut" in second.stderr and str(store.torn_path) in second.stderr  # said once, with where it went
    assert {p.name for p in tmp_path.iterdir()} == {"w"}  # nothing outside the work dir


# ---------------------------------------------------------------- export

def test_export_refuses_a_non_empty_folder_and_force_replaces_only_its_files(small_model, onnx_file, tmp_path):
    work = WorkDir.at(tmp_path / "w")
    Plan.from_dict(_valid(small_model)).save(work.hybrid / "plan.json")  # the plan a study of small.onnx saves
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = listing(tmp_path)
    line = one_line_error(cli("export", "--model", onnx_file, "--work-dir", work.root, "--out", out, cwd=tmp_path))
    assert "is not empty (1 entry: keep.txt)" in line and "--force" in line
    assert listing(tmp_path) == before
    proc = cli("export", "--model", onnx_file, "--work-dir", work.root, "--out", out, "--force", "--json",
               cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["hybrid.so", "keep.txt", "meta.json", "model.onnx", "plan.json"]
    assert (out / "keep.txt").read_text() == "mine"
    assert json.loads((out / "meta.json").read_text())["model"] == "small"
    assert {p.name for p in tmp_path.iterdir()} == {"w", "out"}


# ---------------------------------------------------------------- bad inputs: one line, exit 2, nothing written

def _plan(tmp, small_model, text: str | bytes | None = None, data=None):
    """A work dir w/ whose hybrid/plan.json holds `text` (or `data` as JSON, or a valid plan)."""
    path = tmp / "w" / "hybrid" / "plan.json"
    path.parent.mkdir(parents=True)
    if text is None and data is None:
        data = Plan.uniform(small_model).to_dict() | {"model": "small"}
    if data is not None:
        text = json.dumps(data)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _valid(small_model) -> dict:
    return Plan.uniform(small_model).to_dict() | {"model": "small"}


def _edit_first(small_model, **changes) -> dict:
    data = _valid(small_model)
    data["layers"][0] = {**data["layers"][0], **changes}
    return data


COMPARE = ["compare", "--layers", LAYER, "--quick"]
EXPORT = ["export", "--work-dir", "w", "--out", "out"]


def _setup_results_file(tmp, m):
    (tmp / "w").mkdir()
    (tmp / "w" / "results").write_text("")


def _setup_records_dir(tmp, m):
    (tmp / "w" / "results" / "records.jsonl").mkdir(parents=True)


def _setup_records_fifo(tmp, m):
    (tmp / "w" / "results").mkdir(parents=True)
    os.mkfifo(tmp / "w" / "results" / "records.jsonl")


def _setup_lock_dir(tmp, m):
    (tmp / "w" / LOCK_NAME).mkdir(parents=True)


def _setup_tuning_file(tmp, m):
    (tmp / "w").mkdir()
    (tmp / "w" / "tuning").write_text("")


CASES = {
    # name: (setup(tmp, model), command line (the model is added), what the line must say)
    "work dir is a file": (lambda t, m: (t / "w").write_text("x"), COMPARE + ["--work-dir", "w"], "is a file"),
    "work dir under /proc": (None, COMPARE + ["--work-dir", "/proc/workbench-test"], "under /proc"),
    "work dir is /proc/self via a symlink": (lambda t, m: os.symlink("/proc/self", t / "w"),
                                             ["tune", "--layers", LAYER, "--trials", "1", "--work-dir", "w"],
                                             "under /proc"),
    "work dir under /sys": (None, ["tune", "--layers", LAYER, "--trials", "1", "--work-dir", "/sys/wb"], "under /sys"),
    "work dir's parent is a file": (lambda t, m: (t / "f").write_text("x"), ["study", "--quick", "--work-dir", "f/w"],
                                    "cannot be created"),
    "work dir is empty": (None, COMPARE + ["--work-dir", ""], "is empty"),
    "work dir is a broken symlink": (lambda t, m: os.symlink(t / "missing", t / "w"), COMPARE + ["--work-dir", "w"],
                                     "does not exist"),
    "results is a file": (_setup_results_file, COMPARE + ["--work-dir", "w"], "must be a folder"),
    "records file is a folder": (_setup_records_dir, ["study", "--quick", "--work-dir", "w"], "must be a regular file"),
    "records file is a FIFO": (_setup_records_fifo, COMPARE + ["--work-dir", "w"], "special file"),
    "lock file is a folder": (_setup_lock_dir, COMPARE + ["--work-dir", "w"], "must be a regular file"),
    "torn-records file is a folder": (lambda t, m: (t / "w" / "results" / "records.jsonl.torn").mkdir(parents=True),
                                      COMPARE + ["--work-dir", "w"], "records.jsonl.torn' must be a regular file"),
    "work dir is a symlink loop": (lambda t, m: os.symlink("w", t / "w"), COMPARE + ["--work-dir", "w"],
                                   "a symlink loop"),
    "work dir's parent is a symlink loop": (lambda t, m: os.symlink("loop", t / "loop"),
                                            ["study", "--quick", "--work-dir", "loop/w"], "a symlink loop"),
    "tuning is a file": (_setup_tuning_file, ["tune", "--layers", LAYER, "--trials", "1", "--work-dir", "w"],
                         "must be a folder"),
    "plan truncated": (lambda t, m: _plan(t, m, json.dumps(_valid(m))[:60]), EXPORT, "not valid JSON"),
    "plan empty": (lambda t, m: _plan(t, m, ""), EXPORT, "not valid JSON"),
    "plan not UTF-8": (lambda t, m: _plan(t, m, b"\xff\xfe{}"), EXPORT, "cannot read the plan"),
    "plan is a folder": (lambda t, m: (t / "w" / "hybrid" / "plan.json").mkdir(parents=True), EXPORT,
                         "plan.json' must be a regular file but is a folder"),
    "plan is a list": (lambda t, m: _plan(t, m, data=[1, 2]), EXPORT, "not a plan"),
    "plan without layers": (lambda t, m: _plan(t, m, data={"model": "small"}), EXPORT, "not a plan"),
    "plan row without impl": (lambda t, m: _plan(t, m, data=_edit_first(m, impl=None)), EXPORT, "plan entry 0"),
    "plan impl is a number": (lambda t, m: _plan(t, m, data=_edit_first(m, impl=3)), EXPORT, "plan entry 0"),
    "plan fuse is a string": (lambda t, m: _plan(t, m, data=_edit_first(m, fuse="relu")), EXPORT, "'fuse' must be"),
    "plan notes not a list": (lambda t, m: _plan(t, m, data=_valid(m) | {"notes": 5}), EXPORT, "'notes' a list"),
    "plan lists a layer twice": (lambda t, m: _plan(t, m, data=_valid(m) | {"layers": _valid(m)["layers"] * 2}),
                                 EXPORT, "twice"),
    "plan names an unknown impl": (lambda t, m: _plan(t, m, data=_edit_first(m, impl="tvm:nope")), EXPORT,
                                   "unknown implementation id 'tvm:nope'"),
    "plan for another model": (lambda t, m: _plan(t, m, data=_valid(m) | {"model": "other"}), EXPORT,
                               "is for model 'other', not 'small'"),
    "plan misses a conv": (lambda t, m: _plan(t, m, data=_valid(m) | {"layers": _valid(m)["layers"][1:]}), EXPORT,
                           "no entry for conv"),
    "export into a non-empty folder": (lambda t, m: (_plan(t, m), (t / "out").mkdir(), (t / "out" / "a").touch()),
                                       EXPORT, "is not empty"),
    "export into a file": (lambda t, m: (_plan(t, m), (t / "out").write_text("x")), EXPORT, "is a file"),
    "export under /proc": (_plan, ["export", "--work-dir", "w", "--out", "/proc/wb-out"], "under /proc"),
    "export where hybrid.so is a folder": (lambda t, m: (_plan(t, m), (t / "out" / "hybrid.so").mkdir(parents=True)),
                                           EXPORT + ["--force"], "is a folder, where the export writes a file"),
}


def test_a_tilde_work_dir_is_the_home_folder_that_was_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    work = WorkDir.at("~/wb")
    assert work.root == tmp_path / "home" / "wb" and work.records.path.is_relative_to(tmp_path / "home")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "wb").write_text("x")  # what is checked is what is used: the expanded path
    with pytest.raises(Exception, match="'~/wb' is a file|home/wb' is a file"):
        WorkDir.at("~/wb")
    assert not (tmp_path / "~").exists()


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_input_is_one_line_exit_2_and_writes_nothing(name, small_model, onnx_file, tmp_path):
    setup, args, expected = CASES[name]
    if setup:
        setup(tmp_path, small_model)
    before = listing(tmp_path)
    line = one_line_error(cli(*args, "--model", onnx_file, cwd=tmp_path, timeout=60))
    assert expected in line, line
    assert listing(tmp_path) == before
