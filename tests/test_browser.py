"""The notebooks' widgets work in JupyterLab, in a real browser (Debian's Chromium, driven by Playwright).

A JupyterLab server from this environment serves a temporary folder; the page runs every cell
with the Lab's own command, then clicks the widgets as a user would.
"""

import nbformat
import pytest

from browser import (CHART_SIZE, ROOT, JupyterLab, change_knob, chart_size, chromium_path, launch_chromium,
                     open_notebook, parameterize, run_all_cells, save_artifacts, wait_chart_grows, wait_text_changes,
                     watch_console)

CHROMIUM = chromium_path()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on this machine: `make system-deps` installs Debian's chromium "
                             "(needs root and apt-get)")

SECOND = 1000  # Playwright counts in milliseconds


@pytest.fixture
def lab(tmp_path):
    root = tmp_path / "lab"
    root.mkdir()
    server = JupyterLab(root, tmp_path / "jupyterlab.log")
    with server:
        yield server
    assert not server.leftovers, f"processes outlived JupyterLab: {server.leftovers}"


@pytest.fixture
def page(request, lab, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright, CHROMIUM)
        try:
            tab = browser.new_page(viewport={"width": 1400, "height": 1000})
            console = watch_console(tab)
            yield tab
            report = getattr(request.node, "rep_call", None)
            if report is None or report.failed:
                for path in save_artifacts(tab, console, tmp_path):
                    print(f"saved {path}")
                print(f"JupyterLab log: {lab.log_path}")
        finally:
            browser.close()


def _write_notebook(path, sources: list[str]):
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)


SMOKE = [
    "import ipywidgets as widgets\nimport plotly.graph_objects as go",
    # One FigureWidget, updated in place (as the composer does).
    "chart = go.FigureWidget(data=[go.Scatter(x=[0], y=[1.0], mode='markers')])\nchart.add_class('wb-chart')\n"
    "fuse = widgets.ToggleButton(description='relu')\nfuse.add_class('wb-fuse')\n"
    "apply = widgets.Button(description='Apply')\napply.add_class('wb-apply')\n"
    "label = widgets.HTML('not run')\nlabel.add_class('wb-time');",
    "def on_apply(_):\n"
    "    n = len(chart.data[0].x)\n"
    "    with chart.batch_update():\n"
    "        chart.data[0].x = list(chart.data[0].x) + [n]\n"
    "        chart.data[0].y = list(chart.data[0].y) + [1.0 + n]\n"
    "    label.value = f'fused={fuse.value} points={n + 1}'\n"
    "apply.on_click(on_apply)\n"
    "box = widgets.VBox([fuse, apply, label, chart])\nbox.add_class('wb-composer')\nbox",
]


def test_widgets_render_in_jupyterlab(lab, page):
    """ipywidgets, plotly's FigureWidget and anywidget render and round-trip offline in the Lab."""
    _write_notebook(lab.root / "smoke.ipynb", SMOKE)
    open_notebook(page, lab, "smoke.ipynb")
    assert run_all_cells(page, 60 * SECOND) == []

    composer = page.locator(".wb-composer")
    composer.wait_for(timeout=30 * SECOND)
    chart, label = composer.locator(".wb-chart"), composer.locator(".wb-time")
    page.wait_for_function(f"root => !!({CHART_SIZE})(root)", arg=chart.element_handle(), timeout=30 * SECOND)
    assert chart_size(chart) == (1, 1)
    assert label.text_content() == "not run"

    composer.locator("button.wb-fuse").click()
    composer.locator("button.wb-apply").click()
    assert wait_text_changes(page, label, "not run", 20 * SECOND) == "fused=True points=2"
    assert wait_chart_grows(page, chart, (1, 1), 20 * SECOND) == (1, 2)


COMPOSER_NOTEBOOK = ROOT / "notebooks" / "04_fused_operators.ipynb"
SMALL = {"widths": [4, 8, 16], "height": 32, "width": 48, "quick": True}


@pytest.mark.skipif(not COMPOSER_NOTEBOOK.exists(), reason="no notebooks/04_fused_operators.ipynb in this tree")
def test_composer_notebook_in_jupyterlab(lab, page, tmp_path):
    """Notebook 04 runs in the Lab; a fusion toggle, a knob and Apply change the code, the time and the chart."""
    parameterize(COMPOSER_NOTEBOOK, lab.root / COMPOSER_NOTEBOOK.name, {**SMALL, "work_dir": str(tmp_path / "work")})
    open_notebook(page, lab, COMPOSER_NOTEBOOK.name)
    # Everything but the last cell, which closes the device the composer measures on (as a user
    # playing with the widgets would: after it, Apply can only say the cluster was stopped).
    assert run_all_cells(page, 150 * SECOND) == []

    composer = page.locator(".wb-composer").first
    composer.wait_for(timeout=30 * SECOND)
    composer.scroll_into_view_if_needed()
    code, time, status, chart = (composer.locator(f".{c}") for c in ("wb-code", "wb-time", "wb-status", "wb-chart"))
    page.wait_for_function(f"root => !!({CHART_SIZE})(root)", arg=chart.element_handle(), timeout=30 * SECOND)
    code_before, time_before, size_before = code.text_content(), time.text_content(), chart_size(chart)
    assert "ms" in time_before, time_before  # the notebook applied one variant already

    composer.locator("button.wb-fuse:not([disabled])").first.click()
    # The first knob: a slider or a dropdown. (Moving ow_bn alone can break vec's rule, which the
    # composer rightly refuses, so it is not the knob to move blindly.)
    name, value = change_knob(page, composer.locator(".wb-knob").first, 10 * SECOND)
    composer.locator("button.wb-apply").click()

    # The time label changes last; a refused variant shows "error: ..." in the status line instead.
    page.wait_for_function("([t, s, before]) => t.textContent !== before || s.textContent.startsWith('error')",
                           arg=[time.element_handle(), status.element_handle(), time_before], timeout=90 * SECOND)
    assert not status.text_content().startswith("error"), status.text_content()
    time_after = time.text_content()
    assert f"{name}={value}" in time_after, (time_after, status.text_content())
    assert "ms" in time_after and "numerics" in time_after, time_after
    assert code.text_content() != code_before
    traces, points = wait_chart_grows(page, chart, size_before, 10 * SECOND)
    assert (traces, points) in {(size_before[0], size_before[1] + 1), (size_before[0] + 1, size_before[1] + 1)}
