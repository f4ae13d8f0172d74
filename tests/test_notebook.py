"""``docs/notebooks/quickstart.ipynb`` runs top to bottom with nbclient on the shipped sample runs, in a
kernel of this test's own Python (so it imports this checkout's sam_probe), and ships without outputs."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "notebooks" / "quickstart.ipynb"


def test_the_notebook_ships_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)


@pytest.mark.slow  # a kernel start and the sample runs: ~10 s on 2 idle cores
def test_the_quickstart_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="nbformat does not install here")
    nbclient = pytest.importorskip("nbclient", reason="nbclient does not install here")
    pytest.importorskip("ipykernel", reason="ipykernel does not install here")
    pytest.importorskip("pandas")
    spec = tmp_path / "jupyter" / "kernels" / "sam-probe-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "sam-probe test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, kernel_name="sam-probe-test", timeout=120,
                            resources={"metadata": {"path": str(ROOT / "docs" / "notebooks")}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "top eigenvalues" in text and "Hessian" in text and "GGN" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the figure
    table = next(o["data"]["text/plain"] for o in outputs if "eigenvalue_1" in o.get("data", {}).get("text/plain", ""))
    assert "digits-mlp-sgd" in table and "digits-mlp-sam" in table
