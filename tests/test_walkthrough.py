"""The walkthrough notebooks: each runs headless from the checkout, shows at least one figure, and has the
same cells as its jupytext script (walkthrough/NN_name.py, py:percent), so the two cannot drift apart.

Needs the `docs` extra (matplotlib, jupytext, nbclient, nbformat, ipykernel); skipped without it. The
kernel is this interpreter, with the repository root on PYTHONPATH and matplotlib's inline backend (which
renders with Agg: no display needed).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
jupytext = pytest.importorskip("jupytext")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parent.parent
WALKTHROUGH = ROOT / "walkthrough"
NOTEBOOKS = sorted(WALKTHROUGH.glob("[0-9][0-9]_*.ipynb"))
SCRIPTS = sorted(WALKTHROUGH.glob("[0-9][0-9]_*.py"))
KERNEL = "gemma4-walkthrough"


def test_every_notebook_has_its_script():
    assert len(NOTEBOOKS) >= 6, f"expected at least six notebooks in {WALKTHROUGH}, found {len(NOTEBOOKS)}"
    assert [p.stem for p in NOTEBOOKS] == [p.stem for p in SCRIPTS], "each NN_name.ipynb needs its NN_name.py pair"


def _cells(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_pair_in_sync(path):
    """Same cells, in the same order, in the .ipynb and its py:percent script (run `jupytext --sync`)."""
    nb = nbformat.read(path, as_version=4)
    script = jupytext.read(path.with_suffix(".py"), fmt="py:percent")
    assert _cells(nb) == _cells(script), f"{path.name} and {path.with_suffix('.py').name} differ: jupytext --sync"
    formats = nb.metadata.get("jupytext", {}).get("formats", "")
    assert "py:percent" in formats, f"{path.name} is not paired (jupytext --set-formats ipynb,py:percent)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    """Outputs stay out of git: reviews read the code, CI makes the pictures."""
    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs (jupytext --to ipynb {path.with_suffix('.py').name})"


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
    """A kernelspec for this interpreter, found first on JUPYTER_PATH, with the checkout importable."""
    home = tmp_path_factory.mktemp("jupyter")
    spec = home / "kernels" / KERNEL
    spec.mkdir(parents=True)
    python_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "walkthrough", "language": "python",
        "env": {"PYTHONPATH": python_path, "MPLBACKEND": "module://matplotlib_inline.backend_inline"},
    }))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (str(home), old) if p)
    yield KERNEL
    if old is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = old


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_shows_a_figure(path, kernel_name):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=600, startup_timeout=120,
                                     resources={"metadata": {"path": str(WALKTHROUGH)}})
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    seconds = time.perf_counter() - t0
    figures = sum("image/png" in out.get("data", {}) for c in nb.cells if c.cell_type == "code" for out in c.outputs
                  if out.output_type == "display_data")
    print(f"{path.name}: {seconds:.1f} s, {figures} figures")
    assert figures >= 1, f"{path.name} ran but showed no figure"
