"""Every notebook runs top to bottom with small parameters (papermill), on a real local cluster."""

from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SMALL = {"widths": [4, 8, 16], "height": 32, "width": 48, "quick": True}

# Per-notebook overrides for a small, fast run.
PARAMETERS = {
    "01_layers_and_roofline.ipynb": SMALL,
    "02_nnpack_algorithms.ipynb": {**SMALL, "work_dir": None},
    "03_tvm_schedules_and_tuning.ipynb": {**SMALL, "work_dir": None, "trials": 4},
    "04_fused_operators.ipynb": {**SMALL, "work_dir": None},
    "05_hybrid_unet.ipynb": {**SMALL, "work_dir": None, "trials": 4},
}


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_notebook_runs(name, tmp_path):
    import papermill

    parameters = dict(PARAMETERS[name])
    if "work_dir" in parameters:
        parameters["work_dir"] = str(tmp_path / "work")  # never touch the user's data/
    assert (NOTEBOOKS / name).exists()
    papermill.execute_notebook(str(NOTEBOOKS / name), str(tmp_path / name), parameters=parameters,
                               cwd=str(NOTEBOOKS), kernel_name="python3", progress_bar=False)


def test_every_notebook_is_exercised():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(PARAMETERS)
