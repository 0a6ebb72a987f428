"""Reproducible choices and the write-up bundle: two measured runs of a small model choose the same
implementation wherever the winner was clear, a resumed run measures nothing again and gives the
same plan, and the bundle diff names exactly the layers that changed, as flips within noise."""

import json

import pytest

from workbench import bundle, compare, runoff, stats
from workbench.__main__ import main
from workbench.kernels.registry import all_candidates
from workbench.measure import TimingConfig
from workbench.plan import choices, choose_plan
from workbench.records import WorkDir
from workbench.report import Section, write_report

# NNPACK's algorithms and strategies (no compilation, often within noise of each other) and TVM's default.
IMPLS = ("nnpack:wt8x8:compute", "nnpack:wt8x8:precompute", "nnpack:ft8x8:compute", "nnpack:ft8x8:precompute",
         "nnpack:implicit_gemm:compute", "nnpack:ft16x16:precompute", "tvm:default")
TIMING = TimingConfig(number=1, repeat=5, min_repeat_ms=10)


def _measure(model, device, store=None) -> list[dict]:
    candidates = [c for c in all_candidates(2) if c.impl in IMPLS]
    return compare.compare(model, device, candidates=candidates, timing=TIMING, store=store, progress=False)


def _study_dir(root, model, records) -> tuple[WorkDir, object]:
    """A work dir holding what a study leaves of its per-layer stage: records, plan, summary, report."""
    import plotly.graph_objects as go

    work = WorkDir.at(root)
    if not work.records.path.exists():
        for record in records:
            work.records.append(compare.KIND, record)
    plan = choose_plan(model, records, fuse=False)
    plan.save(work.hybrid / "plan.json")
    (work.root / "study.json").write_text(json.dumps({"model": model.name, "hybrid_ms": 1.0, "threads": 2,
                                                      "budget": {"quick": True}, "plan_notes": plan.notes}))
    write_report(work.report, "study", [Section("per layer", [compare.table(records), go.Figure(go.Bar(y=[1, 2]))])])
    return work, plan


def test_two_runs_agree_where_the_winner_is_clear_and_the_diff_says_so(small_model, device, tmp_path, capsys):
    first = _measure(small_model, device, WorkDir.at(tmp_path / "a").records)
    second = _measure(small_model, device)  # independent: nothing reused
    picks = [choices(small_model, records) for records in (first, second)]
    clear = [name for name in picks[0] if not picks[0][name].tie and not picks[1][name].tie
             and not any(c.record.get("disturbed") or (c.runner_up or {}).get("disturbed")
                         for c in (picks[0][name], picks[1][name]))]
    for name in clear:  # a clear winner measured undisturbed twice is the same implementation
        assert picks[0][name].record["impl"] == picks[1][name].record["impl"], name
    for pick in picks:  # every choice is the fastest, or a tie broken by the rule and noted
        for name, choice in pick.items():
            assert choice.record is choice.fastest or (choice.tie and choice.record in choice.tied)

    work_a, plan_a = _study_dir(tmp_path / "a", small_model, first)
    work_b, plan_b = _study_dir(tmp_path / "b", small_model, second)
    assert all(note in plan_a.notes for note in (c.note for c in picks[0].values() if c.tie))

    # Resumed in the same work dir: nothing measured again, the same plan.
    lines = work_a.records.path.read_bytes().count(b"\n")
    again = _measure(small_model, device, work_a.records)
    assert work_a.records.path.read_bytes().count(b"\n") == lines
    assert choose_plan(small_model, again, fuse=False).layers == plan_a.layers

    out_a, out_b = bundle.write_bundle(work_a.root, tmp_path / "bundle_a"), tmp_path / "bundle_b"
    assert main(["report", "--work-dir", str(work_b.root), "--out", str(out_b), "--json"]) == 0
    capsys.readouterr()
    for name in ("index.html", "README.md", "report.html", "records.jsonl", "plan.json", "environment.json",
                 "tuning.json", "reproduce.sh"):
        assert (out_a / name).is_file(), name
    assert bundle.remote_scripts((out_a / "report.html").read_text()) == []  # opens offline
    environment = json.loads((out_a / "environment.json").read_text())
    assert environment["measured_with"]["versions"]["apache-tvm"] and environment["threads"] == 2
    assert "python -m workbench study --work-dir" in (out_a / "reproduce.sh").read_text()

    diff = bundle.diff_bundles(out_a, out_b)
    changed = {name for name in plan_a.layers if plan_a.impl(name) != plan_b.impl(name)}
    assert {row["layer"] for row in diff["plan_changes"]} == changed
    tied = {name for pick in picks for name, choice in pick.items() if choice.tie}
    assert all(row["within_noise"] for row in diff["plan_changes"] if row["layer"] in tied)
    assert diff["same_plan"] == (not changed)
    assert main(["report", "--compare", str(out_a), str(out_b), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan_changes"] == json.loads(json.dumps(diff["plan_changes"]))
    assert main(["report", "--compare", str(out_a), str(out_a)]) == 0
    assert "plan: the same in both" in capsys.readouterr().out


def test_the_runoff_times_close_contenders_in_rounds_and_resumes(small_model, device, tmp_path):
    candidates = [c for c in all_candidates(2) if c.impl in IMPLS]
    store = WorkDir.at(tmp_path / "w").records
    records = compare.compare(small_model, device, candidates=candidates, timing=TIMING, store=store, progress=False)
    final = runoff.run_runoffs(small_model, device, records, candidates, TIMING, store, progress=False)
    layers = {r["layer"] for r in final}
    assert layers  # NNPACK's strategies of one algorithm are close on every conv of this model
    picks = choices(small_model, records + final)
    for layer in layers:
        mine = [r for r in final if r["layer"] == layer]
        assert stats.same_runoff(mine) and sorted(r["impl"] for r in mine) == mine[0]["contenders"]
        assert all(len(r["repeats_ms"]) == runoff.rounds_for(TIMING) and r["numerics_ok"] for r in mine)
        assert picks[layer].record.get("runoff")  # the plan chose among the runoff's records
    lines = store.path.read_bytes().count(b"\n")
    again = runoff.run_runoffs(small_model, device, records, candidates, TIMING, store, progress=False)
    assert store.path.read_bytes().count(b"\n") == lines  # resumed: nothing timed again
    assert choose_plan(small_model, records + again).layers == choose_plan(small_model, records + final).layers


def test_report_without_a_study_is_one_line_exit_2(tmp_path, capsys):
    assert main(["report", "--work-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "bundle")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no finished study" in err and "\n" not in err
    assert main(["report", "--compare", str(tmp_path), str(tmp_path)]) == 2
    assert "not a study bundle" in capsys.readouterr().err


def test_tuning_summary_reads_metaschedule_files_and_other_databases(tmp_path):
    folder = tmp_path / "llvm-x-1234"
    folder.mkdir()
    (folder / "database_workload.json").write_text('["1", {}]\n["2", {}]\n')
    (folder / "database_tuning_record.json").write_text(
        '[0, [[], [0.002, 0.004], {}, []]]\n[0, [[], [0.001], {}, []]]\n[1, [[], null, {}, []]]\n')
    (folder / "knobs.jsonl").write_text('{"a": 1}\n{"a": 2}\n\n')
    summary = bundle.tuning_summary(tmp_path)["llvm-x-1234"]
    assert summary["workloads"] == 2 and summary["trials"] == 3
    assert summary["best_ms"] == {"workload 0": pytest.approx(1.0)}
    assert summary["other"] == {"knobs.jsonl": {"lines": 2}}


def test_offline_html_drops_scripts_from_the_network():
    page = ("<script src='https://cdn.example/require.js'></script><script>var a = 1;</script>"
            "<script type=\"module\">import m from 'https://cdn.example/mermaid.mjs';</script>")
    assert len(bundle.remote_scripts(page)) == 2
    clean = bundle.offline_html(page)
    assert bundle.remote_scripts(clean) == [] and "var a = 1;" in clean


def test_executed_notebooks_become_offline_pages_and_their_lessons_reach_the_index(small_model, tmp_path):
    import nbformat
    import plotly.graph_objects as go

    from workbench.lessons import MIME, Lesson

    work, _ = _study_dir(tmp_path / "w", small_model, [])
    lesson = Lesson("the widest conv is the densest", True, "enc2_conv2 at 20 FLOP/byte")
    figure = go.Figure(go.Bar(y=[1, 2])).to_plotly_json()
    cell = nbformat.v4.new_code_cell("lessons.show(...)", outputs=[
        nbformat.v4.new_output("display_data", {"text/plain": lesson.line(), MIME: [vars(lesson)]}),
        nbformat.v4.new_output("display_data", {"application/vnd.plotly.v1+json": json.loads(json.dumps(
            figure, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))})])
    notebook = nbformat.v4.new_notebook(cells=[cell])
    notebook.metadata["widgets"] = {"state": "x" * 1000}
    nbformat.write(notebook, str(tmp_path / "01_demo.ipynb"))
    out = bundle.write_bundle(work.root, tmp_path / "bundle", notebooks=[tmp_path / "01_demo.ipynb"])
    page = (out / "notebooks" / "01_demo.html").read_text()
    assert bundle.remote_scripts(page) == [] and "Plotly.newPlot" in page and 'src="plotly.min.js"' in page
    assert (out / "notebooks" / "plotly.min.js").stat().st_size > 1_000_000 and "x" * 1000 not in page
    index = (out / "index.html").read_text()
    assert "notebooks/01_demo.html" in index and "[holds] the widest conv is the densest" in index
    assert "Lessons of 01_demo" in (out / "README.md").read_text()


def test_a_bundle_folder_that_cannot_be_written_is_one_line(small_model, tmp_path, capsys):
    work, _ = _study_dir(tmp_path / "w", small_model, [])
    (tmp_path / "file").write_text("not a folder")
    assert main(["report", "--work-dir", str(work.root), "--out", str(tmp_path / "file" / "bundle")]) == 2
    assert "cannot create the bundle folder" in capsys.readouterr().err
    assert main(["report", "--work-dir", str(work.root), "--out", str(tmp_path / "b"), "--notebooks",
                 str(tmp_path / "missing.ipynb")]) == 2
    assert "no executed notebook" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_the_notebooks_parameters_are_read_from_their_parameters_cell():
    for path in bundle.NOTEBOOKS.glob("*.ipynb"):
        names = bundle.notebook_parameters(path)
        if path.name.startswith(bundle.NETWORKS_NOTEBOOK):  # run for a --network study, on that network
            assert {"networks", "resolution", "int8_networks", "network_work_dir", "quick", "threads"} <= names
            continue
        assert {"model_path", "quick", "threads"} <= names, path.name  # what execute_notebooks passes
        assert "work_dir" in names or path.name.startswith("01_"), path.name


def test_the_diff_sees_knobs_and_fusion_and_says_when_it_cannot_tell(tmp_path, capsys):
    from workbench.__main__ import main

    def write(name, rows, notes=()):
        root = tmp_path / name
        root.mkdir()
        (root / "plan.json").write_text(json.dumps({"model": "m", "layers": rows, "notes": list(notes)}))
        (root / "study.json").write_text("{}")
        (root / "records.jsonl").write_text("")
        return root

    a = write("a", [{"layer": "c1", "impl": "tvm:hand_tuned", "knobs": {"schedule": "winograd_4"}},
                    {"layer": "c2", "impl": "tvm:winograd_4", "fuse": ["relu"]},
                    {"layer": "c3", "impl": "tvm:winograd_4"}])
    b = write("b", [{"layer": "c1", "impl": "tvm:hand_tuned", "knobs": {"schedule": "direct_nchwc"}},
                    {"layer": "c2", "impl": "tvm:winograd_4", "fuse": []},
                    {"layer": "c3", "impl": "tvm:winograd_6"}])
    diff = bundle.diff_bundles(a, b)
    verdicts = {row["layer"]: (row["changed"], row["verdict"]) for row in diff["plan_changes"]}
    assert verdicts == {"c1": (["knobs"], "same implementation, other knobs"),
                        "c2": (["fuse"], "same implementation, other fuse"),
                        "c3": (["impl"], "not measured in both")}  # no records: no verdict on noise
    assert not diff["same_plan"] and not any(row["within_noise"] for row in diff["plan_changes"])
    (b / "plan.json").write_text("{not json")
    assert main(["report", "--compare", str(a), str(b)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot read") and "plan.json" in err[0]
