"""The write-up bundle: one folder that holds a finished study and opens offline.

`write_bundle(work_dir, out)` copies the HTML report, the records (JSON lines), the plan and the
study's summary, and writes a summary of the tuning databases, the environment (CPU, SIMD flags,
versions, threads, budget, seeds), `reproduce.sh` with the exact commands, executed notebooks
as HTML (no script is fetched from the network), and `index.html`/`README.md` linking them all.
`diff_bundles(a, b)` compares two bundles: plan changes (each said to be within noise when the
two implementations' intervals overlapped, or clear), per-layer and end-to-end differences with
their intervals, and environment differences.
"""

from __future__ import annotations

import html
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from . import knob_records, stats
from .errors import WorkbenchError
from .measure import usable
from .paths import make_dir
from .records import RecordStore, WorkDir, environment

RECORDS_KIND = "conv_measurement"  # compare.KIND (not imported: compare pulls in the device layer)
RUNOFF_KIND = "runoff"  # runoff.KIND: a conv's close contenders timed again, interleaved
BLOCKS_KIND = "block_measurement"  # blocks.KIND: a conv with its pool or resize+add folded in
E2E_KIND = "end_to_end"  # study.E2E_KIND
FILES = ("report.html", "records.jsonl", "plan.json", "study.json", "tuning.json", "environment.json",
         "reproduce.sh")
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "amx_tile",
              "neon", "asimd", "fphp", "asimdhp", "sve")


class BundleError(WorkbenchError):
    """A work dir with no finished study, or a folder that is not a bundle."""


# ---------------------------------------------------------------- writing

def write_bundle(work_dir: str | Path, out: str | Path, notebooks=()) -> Path:
    """The bundle of the finished study in `work_dir`, written to `out` (created; files replaced).

    `notebooks`: executed .ipynb files (or folders of them) to include as HTML."""
    work = WorkDir.at(work_dir)
    study_file, plan_file = work.root / "study.json", work.hybrid / "plan.json"
    if not study_file.is_file() or not plan_file.is_file():
        raise BundleError(f"{work.root} holds no finished study (no study.json or hybrid/plan.json); run "
                          f"`python -m workbench study --work-dir {work.root}` first")
    out = Path(out).expanduser()
    if out.resolve() == work.root.resolve():
        raise BundleError(f"--out {out} is the work dir itself; give the bundle a folder of its own")
    try:
        summary = json.loads(study_file.read_text())
    except (OSError, ValueError) as err:
        raise BundleError(f"cannot read {study_file} ({type(err).__name__}); run the study again") from None
    files = _notebook_files(notebooks)  # checked before anything is written
    make_dir(out, "the bundle folder --out", "pass --out a folder you can write to")
    shutil.copyfile(plan_file, out / "plan.json")
    shutil.copyfile(study_file, out / "study.json")
    if work.report.is_file():
        shutil.copyfile(work.report, out / "report.html")
    if work.records.path.is_file():
        shutil.copyfile(work.records.path, out / "records.jsonl")
    _write_json(out / "tuning.json", {"databases": tuning_summary(work.tuning),
                                      "layers": tuned_layers(work.records.read("tuning"))})
    _write_json(out / "environment.json", bundle_environment(summary, work.records.read()))
    script = out / "reproduce.sh"
    script.write_text(reproduce_script(summary, work.root, out))
    script.chmod(0o755)
    pages = [notebook_html(path, out / "notebooks") for path in files]
    _write_index(out, summary, pages, notebook_lessons(files))
    return out


def notebook_lessons(files: list[Path]) -> dict[str, list[dict]]:
    """notebook name -> the lessons it showed (lessons.py), for the bundle's index."""
    from .lessons import from_notebook

    return {Path(path).stem: from_notebook(path) for path in files}


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


def tuning_summary(tuning_dir: Path) -> dict:
    """Per target folder: MetaSchedule's workloads and trials (best time per workload), and any
    other JSON-lines database (e.g. a knob tuner's) as a line count. Read as text: no TVM needed."""
    summary = {}
    for folder in sorted(p for p in Path(tuning_dir).glob("*") if p.is_dir()):
        entry: dict = {"workloads": 0, "trials": 0, "best_ms": {}, "other": {}}
        workloads = _json_lines(folder / "database_workload.json")
        entry["workloads"] = len(workloads)
        for line in _json_lines(folder / "database_tuning_record.json"):
            try:
                index, record = line[0], line[1]
                seconds = [s for s in record[1] or [] if isinstance(s, (int, float))]
            except (TypeError, IndexError):
                continue
            entry["trials"] += 1
            if seconds:
                ms = 1e3 * sum(seconds) / len(seconds)
                key = f"workload {index}"
                entry["best_ms"][key] = min(ms, entry["best_ms"].get(key, float("inf")))
        for path in sorted(folder.glob("*.jsonl")):
            entry["other"][path.name] = {"lines": sum(1 for line in path.open("rb") if line.strip())}
        knobs = _knob_summary(folder / "knobs.jsonl")
        if knobs:
            entry["knob_tuner"] = knobs
        summary[folder.name] = entry
    return summary


def _knob_summary(path: Path) -> dict:
    """conv shape -> the knob tuner's trials and its best good trial (implementation, knobs, ms)."""
    shapes: dict = {}
    for record in _json_lines(path):
        if not isinstance(record, dict) or not record.get("workload"):
            continue
        shape = shapes.setdefault(record["workload"], {"trials": 0, "best": None})
        shape["trials"] += 1
        if knob_records.good(record) and (shape["best"] is None or record["median_ms"] < shape["best"]["median_ms"]):
            shape["best"] = {k: record.get(k) for k in ("impl", "knobs", "median_ms", "ci_ms", "emulated")}
    return shapes


def tuned_layers(tuning_records: list[dict]) -> dict:
    """"space:layer" -> trials and best time, from the study's newest tuning record of each (the knob
    tuner's and MetaSchedule's results for one conv are kept apart)."""
    keys = ("trials", "new_trials", "best_ms", "seconds", "best")
    return {f"{r.get('space', 'metaschedule')}:{r['layer']}": {k: r.get(k) for k in keys}
            for r in tuning_records if r.get("layer")}


def _json_lines(path: Path) -> list:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def bundle_environment(summary: dict, records: list[dict]) -> dict:
    """What measured the study: the records' environment, the device, threads, budget and seeds, and
    the CPU's SIMD flags and thread variables of the machine writing the bundle."""
    measured = next((r["env"] for r in records if isinstance(r.get("env"), dict)), None)
    return {
        "measured_with": measured or environment(),
        "device": summary.get("device"),
        "threads": summary.get("threads"),
        "budget": summary.get("budget"),
        "seeds": summary.get("seeds"),
        "command": summary.get("command"),
        "bundle_host": {**environment(), "simd_flags": simd_flags(), "node": platform.node(),
                        "thread_env": {k: v for k, v in os.environ.items()
                                       if k in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")},
                        "git_commit": git_commit()},
    }


def simd_flags() -> list[str]:
    """The CPU's vector-unit flags from /proc/cpuinfo (the ones kernels are compiled for)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.lower().startswith(("flags", "features")):
            flags.update(line.split(":", 1)[1].split())
    return [f for f in SIMD_FLAGS if f in flags]


def git_commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def study_flags(summary: dict) -> list[str]:
    """The `study` flags that reproduce the summary's run: its own command line when it came from
    the CLI (minus --work-dir and --json), else rebuilt from its budget."""
    command = summary.get("command") or []
    if "study" in command:
        flags, skip = [], False
        for arg in command[command.index("study") + 1:]:
            if skip:
                skip = False
            elif arg in ("--work-dir", "--json"):
                skip = arg == "--work-dir"
            elif not arg.startswith("--work-dir="):
                flags.append(arg)
        return flags
    budget = summary.get("budget") or {}
    flags = ["--quick"] if budget.get("quick") else []
    flags += ["--trials", str(budget["trials"])] if "trials" in budget else []
    flags += ["--tune", budget["tune"]] if "tune" in budget else []
    flags += ["--space", budget["space"]] if "space" in budget else []
    return flags + (["--threads", str(summary["threads"])] if summary.get("threads") else [])


def reproduce_script(summary: dict, work_root: Path, out: Path) -> str:
    # The key comes from the environment, quoted, and the script stops at once if it is not set.
    key = '"${WORKBENCH_RPC_KEY:?set WORKBENCH_RPC_KEY to the device key}"'
    flags = " ".join(f.replace("$WORKBENCH_RPC_KEY", key) if "$WORKBENCH_RPC_KEY" in f else shlex.quote(f)
                     for f in study_flags(summary))
    work, bundle = shlex.quote(str(Path(work_root).resolve())), shlex.quote(str(Path(out).resolve()))
    commit = git_commit()
    return "\n".join([
        "#!/bin/sh",
        f"# Reproduces this bundle: run from the workbench repository{f' at commit {commit}' if commit else ''}.",
        "# A fresh work dir measures everything again; the same work dir re-measures only end to end.",
        f"# Seeds: {json.dumps(summary.get('seeds'))}",
        *([] if summary.get("command") else
          [f"# Model: {summary.get('model')} (add --model FILE unless it is the reference UNet)"]),
        "set -e",
        "make venv",
        f".venv/bin/python -m workbench study --work-dir {work} {flags}".rstrip(),
        f".venv/bin/python -m workbench report --work-dir {work} --out {bundle}",
        ""])


NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute_notebooks(work_dir: str | Path, out: str | Path, summary: dict | None = None,
                      notebooks: Path = NOTEBOOKS) -> list[Path]:
    """Run the notebooks (papermill) on the finished study's work dir, at the study's budget (`quick`,
    trials, threads, and its model file when it had one); the executed copies land in `out`. Each
    notebook reuses the study's records and tuning databases, so only what it adds is measured.

    A study of the reference UNet or an ONNX file runs notebooks 01-05; a `--network` study runs
    notebook 06 on that network at its resolution (its int8 part only when the study ran `--int8`)."""
    import papermill

    work = WorkDir.at(work_dir)
    summary = summary if summary is not None else json.loads((work.root / "study.json").read_text())
    command = summary.get("command") or []
    budget = summary.get("budget") or {}
    # The notebooks' `trials` are per tuned layer (the study's are one budget for the model): they
    # keep their own, or the quick one, and resume from the study's databases.
    wanted = {"work_dir": str(work.root.resolve()), "quick": bool(budget.get("quick")),
              "trials": 4 if budget.get("quick") else None, "threads": summary.get("threads"),
              "model_path": str(Path(_flag(command, "--model")).resolve()) if _flag(command, "--model") else None}
    network = _flag(command, "--network")
    if network:  # notebook 06 on this network, reading the study's own work dir
        wanted.update(networks=[network], resolution=int(_flag(command, "--resolution") or 224),
                      int8_networks=[network] if "--int8" in command else [], network_work_dir=str(work.root.resolve()))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    executed = []
    for path in sorted(Path(notebooks).glob("*.ipynb")):
        if path.name.startswith(NETWORKS_NOTEBOOK) != bool(network):
            continue
        declared = notebook_parameters(path)  # only the parameters this notebook has
        parameters = {k: v for k, v in wanted.items() if k in declared and v is not None}
        try:
            papermill.execute_notebook(str(path), str(out / path.name), parameters=parameters,
                                       cwd=str(path.parent), kernel_name="python3", progress_bar=False,
                                       execution_timeout=CELL_TIMEOUT_S)
        except papermill.PapermillExecutionError as err:  # the notebook's own error, in one line
            raise BundleError(f"notebook {path.name} failed in cell {err.exec_count}: {err.ename}: "
                              f"{str(err.evalue).splitlines()[0] if err.evalue else ''} (executed copy: "
                              f"{out / path.name})") from None
        executed.append(out / path.name)
    return executed


CELL_TIMEOUT_S = 3600  # one notebook cell; a hung device call ends the write-up instead of hanging it
NETWORKS_NOTEBOOK = "06_"  # the other networks' notebook: run for a --network study only


def _flag(command: list[str], name: str) -> str | None:
    """The value given to `name` on the study's command line (None when absent)."""
    return command[command.index(name) + 1] if name in command[:-1] else None


def notebook_parameters(path: Path) -> set[str]:
    """The names its `parameters` cell assigns (papermill's own inspection skips lines with comments)."""
    for cell in json.loads(Path(path).read_text())["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            source = "".join(cell["source"])
            return {name for names in re.findall(r"^([A-Za-z_][\w, ]*?)\s*=", source, re.M)
                    for name in (n.strip() for n in names.split(",")) if name}
    return set()


def _notebook_files(notebooks) -> list[Path]:
    files = []
    for item in notebooks or ():
        path = Path(item)
        files += sorted(path.glob("*.ipynb")) if path.is_dir() else [path]
    for path in files:
        if not path.is_file():
            raise BundleError(f"no executed notebook at {path}")
    return files


# Scripts an nbconvert page would fetch from a CDN (require.js, MathJax, mermaid, widget renderers).
_REMOTE_SCRIPT = re.compile(r"<script[^>]*\bsrc\s*=\s*['\"]https?://[^>]*>\s*</script>", re.I | re.S)
_REMOTE_MODULE = re.compile(r"<script[^>]*type\s*=\s*['\"]module['\"][^>]*>(?:(?!</script>).)*?https?://"
                            r"(?:(?!</script>).)*</script>", re.I | re.S)


def notebook_html(path: Path, folder: Path) -> Path:
    """An executed notebook as an HTML page that fetches nothing from the network: CDN scripts
    dropped, plotly figures embedded with plotly.js from a file beside the page (one copy for every
    notebook), widgets shown as their text (their live state needs a kernel)."""
    import nbformat
    from nbconvert import HTMLExporter

    folder.mkdir(parents=True, exist_ok=True)
    notebook = nbformat.read(str(path), as_version=4)
    notebook.metadata.pop("widgets", None)  # megabytes of widget state, useless without a kernel
    first: list = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            data.pop("application/vnd.jupyter.widget-view+json", None)
            figure = data.get("application/vnd.plotly.v1+json")
            if figure is not None and "text/html" not in data:
                data["text/html"] = _figure_html(figure, first)
    if first:
        _plotly_js(folder)
    page, _ = HTMLExporter().from_notebook_node(notebook)
    target = folder / (Path(path).stem + ".html")
    target.write_text(offline_html(page))
    return target


PLOTLY_JS = "plotly.min.js"


def _figure_html(figure: dict, first: list) -> str:
    import plotly.io as pio

    # The library once per page, from the file beside it (written by _plotly_js).
    include = "directory" if not first else False
    first.append(True)
    return pio.to_html(figure, include_plotlyjs=include, full_html=False)


def _plotly_js(folder: Path) -> None:
    from plotly.offline import get_plotlyjs

    path = folder / PLOTLY_JS
    if not path.exists():
        path.write_text(get_plotlyjs())


def offline_html(page: str) -> str:
    return _REMOTE_MODULE.sub("", _REMOTE_SCRIPT.sub("", page))


def remote_scripts(page: str) -> list[str]:
    """Script tags of a page that would load code from the network (an offline page has none)."""
    tags = re.findall(r"<script[^>]*\bsrc\s*=\s*['\"]https?://[^'\"]*", page, re.I)
    modules = re.findall(r"<script[^>]*type\s*=\s*['\"]module['\"][^>]*>(?:(?!</script>).)*?(https?://[^'\"\s]+)",
                         page, re.I | re.S)
    return tags + modules


def _lesson_line(lesson: dict) -> str:
    mark = "holds" if lesson.get("holds") else "DOES NOT HOLD"
    shown = "" if lesson.get("asserted", True) else " (not asserted at this budget)"
    return f"[{mark}{shown}] {lesson.get('claim')} ({lesson.get('evidence')})"


def _write_index(out: Path, summary: dict, pages: list[Path], lessons: dict | None = None) -> None:
    present = [name for name in FILES if (out / name).exists()]
    links = present + [str(p.relative_to(out)) for p in pages]
    lines = [f"# Study bundle: {summary.get('model', '?')}", "",
             f"Hybrid {summary.get('hybrid_ms', float('nan')):.3g} ms on {summary.get('threads')} threads; "
             "open index.html (offline) or the files below.", ""]
    lines += [f"- [{name}]({name})" for name in links]
    notes = summary.get("plan_notes") or []
    if notes:
        lines += ["", "Plan notes (ties and folds):", ""] + [f"- {n}" for n in notes]
    for name, found in (lessons or {}).items():
        lines += ["", f"Lessons of {name}:", ""] + [f"- {_lesson_line(lesson)}" for lesson in found]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    items = "".join(f"<li><a href='{html.escape(n)}'>{html.escape(n)}</a></li>" for n in links)
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    (out / "index.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>Study bundle</title></head><body>"
        f"<h1>Study bundle: {html.escape(str(summary.get('model', '?')))}</h1><ul>{items}</ul>"
        + (f"<h2>Plan notes</h2><ul>{notes_html}</ul>" if notes else "")
        + "".join(f"<h2>Lessons of {html.escape(name)}</h2><ul>"
                  + "".join(f"<li>{html.escape(_lesson_line(lesson))}</li>" for lesson in found) + "</ul>"
                  for name, found in (lessons or {}).items())
        + "</body></html>")


# ---------------------------------------------------------------- reading and comparing

def read_bundle(path: str | Path) -> dict:
    """plan, study summary, environment, conv records and end-to-end records of a bundle."""
    path = Path(path).expanduser()
    if not (path / "plan.json").is_file() or not (path / "study.json").is_file():
        raise BundleError(f"{path} is not a study bundle (no plan.json or study.json); write one with "
                          "`python -m workbench report --work-dir DIR --out BUNDLE`")
    records = RecordStore(path / "records.jsonl").read()
    environment_file = path / "environment.json"
    read = {"plan": _json(path / "plan.json"), "study": _json(path / "study.json"),
            "environment": _json(environment_file) if environment_file.is_file() else {},
            "records": [r for r in records if r.get("kind") == RECORDS_KIND],
            "runoff": [r for r in records if r.get("kind") == RUNOFF_KIND],
            "blocks": [r for r in records if r.get("kind") == BLOCKS_KIND],
            "end_to_end": _latest_e2e(records)}
    rows = read["plan"].get("layers") if isinstance(read["plan"], dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "layer" in r and "impl" in r for r in rows):
        raise BundleError(f"{path / 'plan.json'} is not a plan (a 'layers' list of rows with 'layer' and 'impl'); "
                          "write the bundle again with `python -m workbench report`")
    return read


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BundleError(f"cannot read {path} ({err}); write the bundle again with `python -m workbench report`") \
            from None


def _latest_e2e(records: list[dict]) -> dict:
    latest = {}
    for record in records:
        if record.get("kind") == E2E_KIND and record.get("name"):
            latest[record["name"]] = record
    return latest


def _isolated(records: list[dict]) -> dict:
    """(layer, impl) -> the fastest usable isolated record."""
    found = {}
    for record in usable(records):
        if record.get("fusion"):
            continue
        key = (record["layer"], record["impl"])
        if key not in found or record["median_ms"] < found[key]["median_ms"]:
            found[key] = record
    return found


def _latest_runoff(records: list[dict]) -> dict:
    """(layer, impl) -> its newest runoff record (usable ones)."""
    return {(r["layer"], r["impl"]): r for r in usable(records)}


def _figure(record: dict | None) -> dict | None:
    if record is None:
        return None
    ci = stats.interval(record)
    return {"median_ms": record.get("median_ms"), "ci_ms": list(ci) if ci else None,
            "disturbed": bool(record.get("disturbed"))}


def _ties(plan: dict) -> set[str]:
    """Layers whose implementation was a tie (choice notes; a fold kept for a tie says "kept the 2018 groups")."""
    return {note.split(":", 1)[0] for note in plan.get("notes", [])
            if "tie (intervals overlap); chose" in note}


ENTRY_PARTS = ("impl", "knobs", "fuse", "prologue")


def _entries(plan: dict) -> dict[str, dict]:
    """layer -> its plan entry's parts, a missing part as its empty value (older plans have no knobs)."""
    empty = {"knobs": {}, "fuse": [], "prologue": []}
    return {row["layer"]: {part: row.get(part) or empty.get(part, row.get(part)) for part in ENTRY_PARTS}
            for row in plan["layers"]}


def _folds(entry: dict) -> bool:
    """A plan entry whose conv computes a pool before it or a resize+add after it (beyond its ReLU)."""
    return bool(entry.get("prologue")) or any(op != "relu" for op in entry.get("fuse") or [])


def _fold_ops(entry: dict) -> tuple:
    return tuple(entry.get("prologue") or []), tuple(entry.get("fuse") or [])


def _blocks(records: list[dict]) -> dict:
    """(layer, impl, (prologue, epilogue)) -> the fastest usable folded-block record."""
    found = {}
    for record in usable(records):
        key = (record["layer"], record["impl"], (tuple(record.get("prologue") or []),
                                                 tuple(record.get("epilogue") or [])))
        if record.get("fusion") and (key not in found or record["median_ms"] < found[key]["median_ms"]):
            found[key] = record
    return found


def _verdict(layer: str, old: dict, new: dict | None, timed: list[dict], ties: list[set],
             folded: list[dict] = ()) -> str:
    """Why a plan entry differs: within noise (a tie, or the two implementations' intervals overlapped in
    a run that measured both), clear, or not known (not measured in both, or only knobs or fusion changed)."""
    if new is None:
        return "missing in B"
    if any(layer in t for t in ties):
        return "within noise"
    if old["impl"] == new["impl"]:
        return "same implementation, other " + "/".join(p for p in ENTRY_PARTS[1:] if old[p] != new[p])
    key_a, key_b = (layer, old["impl"]), (layer, new["impl"])
    if _folds(old) or _folds(new):  # a fold's kernel was chosen among the folded blocks' records
        key_a, key_b = (*key_a, _fold_ops(old)), (*key_b, _fold_ops(new))
        timed = folded
    both = [t for t in timed if key_a in t and key_b in t]
    if not both:
        return "not measured in both"
    overlapping = any(not _apart(t[key_a], t[key_b]) for t in both)
    return "within noise" if overlapping else "clear"


def _apart(x: dict, y: dict) -> bool:
    """Two records told apart beyond noise: round by round if one runoff timed both, else by their intervals."""
    if stats.same_runoff([x, y]):
        return stats.slower_in_rounds(x, y) or stats.slower_in_rounds(y, x)
    return not stats.overlap(stats.interval(x), stats.interval(y))


def diff_bundles(a: str | Path, b: str | Path) -> dict:
    """What differs between two bundles (A, then B): plan (implementation, knobs, fusion), per layer,
    end to end, environment."""
    first, second = read_bundle(a), read_bundle(b)
    entries = [_entries(bundle["plan"]) for bundle in (first, second)]
    # A conv's runoff records (the plan chose among them) stand for its sweep records of the same kernels.
    timed = [{**_isolated(bundle["records"]), **_latest_runoff(bundle["runoff"])} for bundle in (first, second)]
    ties = [_ties(bundle["plan"]) for bundle in (first, second)]
    folded = [_blocks(bundle["blocks"]) for bundle in (first, second)]
    changes, layers = [], []
    for layer, old in entries[0].items():
        new = entries[1].get(layer)
        row = {"layer": layer, "a": {**old, **(_figure(timed[0].get((layer, old["impl"]))) or {})},
               "b": {**(new or {"impl": None}), **(_figure(timed[1].get((layer, (new or {}).get("impl")))) or {})}}
        if old != new:
            row["changed"] = [p for p in ENTRY_PARTS if (new or {}).get(p) != old[p]]
            row["verdict"] = _verdict(layer, old, new, timed, ties, folded)
            row["within_noise"] = row["verdict"] == "within noise"
            row["tie_in"] = [name for name, t in zip("ab", ties) if layer in t]
            changes.append(row)
        layers.append(row)
    end_to_end = []
    for name in [n for n in first["end_to_end"] if n in second["end_to_end"]]:
        x, y = first["end_to_end"][name], second["end_to_end"][name]
        end_to_end.append({"name": name, "a": _figure(x), "b": _figure(y),
                           "ratio": y["median_ms"] / x["median_ms"] if x.get("median_ms") and y.get("median_ms")
                           else None,
                           "overlap": stats.overlap(stats.interval(x), stats.interval(y))})
    models = [first["plan"].get("model"), second["plan"].get("model")]
    return {"a": str(a), "b": str(b), "models": models, "same_model": models[0] == models[1],
            "plan_changes": changes, "same_plan": not changes, "layers": layers,
            "end_to_end": end_to_end, "environment": _dict_diff(first["environment"], second["environment"])}


def _flatten(data, prefix="") -> dict:
    if isinstance(data, dict):
        flat = {}
        for key, value in data.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): data}


# Keys that differ between any two runs and say nothing about the environment.
_VOLATILE = ("bundle_host.node", "command")


def _dict_diff(a: dict, b: dict) -> list[dict]:
    x, y = _flatten(a), _flatten(b)
    return [{"key": k, "a": x.get(k), "b": y.get(k)} for k in sorted(set(x) | set(y))
            if x.get(k) != y.get(k) and not k.startswith(_VOLATILE)]


def format_diff(diff: dict) -> str:
    """The diff for a terminal."""
    def figure(side: dict | None) -> str:
        if not side or side.get("median_ms") is None:
            return "-"
        ci = side.get("ci_ms")
        text = f"{side['median_ms']:.3g} ms" + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "")
        return text + (" DISTURBED" if side.get("disturbed") else "")

    lines = [f"A: {diff['a']}", f"B: {diff['b']}", ""]
    if not diff.get("same_model", True):
        lines += [f"WARNING: different models: {diff['models'][0]!r} and {diff['models'][1]!r}", ""]
    if diff["same_plan"]:
        lines.append("plan: the same in both")
    else:
        lines.append(f"plan: {len(diff['plan_changes'])} layer(s) changed")
        shown = {"within noise": "within noise (a tie, or the intervals overlap)",
                 "clear": "CLEAR (intervals apart)"}
        for row in diff["plan_changes"]:
            verdict = shown.get(row["verdict"], row["verdict"])
            lines.append(f"  {row['layer']}: {row['a']['impl']} {figure(row['a'])} -> {row['b']['impl']} "
                         f"{figure(row['b'])} [{', '.join(row['changed'])}]: {verdict}")
    lines += ["", "per layer (chosen implementation: A -> B):"]
    lines += [f"  {row['layer']}: {figure(row['a'])} -> {figure(row['b'])}" for row in diff["layers"]]
    lines += ["", "end to end (A -> B):"]
    for row in diff["end_to_end"]:
        ratio = f"x{row['ratio']:.2f}" if row["ratio"] else ""
        same = "overlap" if row["overlap"] else "apart"
        lines.append(f"  {row['name']}: {figure(row['a'])} -> {figure(row['b'])} {ratio} ({same})")
    lines += ["", "environment:" + ("" if diff["environment"] else " the same")]
    lines += [f"  {row['key']}: {row['a']!r} -> {row['b']!r}" for row in diff["environment"]]
    return "\n".join(lines)
