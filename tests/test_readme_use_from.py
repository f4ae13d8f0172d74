"""README "Use it from…": every ``sam-probe`` line and Python block of the section runs, in order, on the shipped
``sample_runs/`` (linked into a temporary folder, so ``results/`` and ``tables/`` are written there)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from clitools import run_cli

pytest.importorskip("pandas")

ROOT = Path(__file__).resolve().parents[1]
TITLE = "## Use it from…"


def section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(TITLE)
    end = text.find("\n## ", start + len(TITLE))
    return text[start:end if end >= 0 else len(text)]


def blocks(text: str) -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block, in order."""
    return re.findall(r"^```(\w+)\n(.*?)^```", text, flags=re.S | re.M)


def test_the_section_names_every_client():
    text = section()
    langs = [lang for lang, _ in blocks(text)]
    assert langs.count("bash") >= 1 and langs.count("python") >= 3
    for needle in ("sam-probe report", "sp.objective", "sp.Objective(", "sp.load_results", ".to_scipy()",
                   "sp.curvature_operator(", "--tensorboard", "--wandb", "integrations.lightning import SamProbeCallback",
                   "integrations.transformers import", "docs/notebooks/quickstart.ipynb"):
        assert needle in text, needle


@pytest.mark.slow  # the section end to end (trackers and both trainers included): ~35 s on 2 idle cores
def test_every_snippet_runs(tmp_path, monkeypatch, capsys):
    for package in ("tensorboard", "wandb", "lightning", "transformers"):  # the section's trackers and callbacks
        pytest.importorskip(package, reason=f"{package} does not install here")
    (tmp_path / "sample_runs").symlink_to(ROOT / "sample_runs")
    monkeypatch.chdir(tmp_path)
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    ns: dict = {"__name__": "readme"}
    for lang, code in blocks(section()):
        if lang == "bash":
            for line in code.splitlines():
                line = line.split("  #")[0].strip()
                if line.startswith("sam-probe "):
                    res = run_cli(*shlex.split(line)[1:])
                    assert res.code == 0, (line, res.stderr)
        elif lang == "python":
            exec(compile(code, "README.md (Use it from…)", "exec"), ns)  # noqa: S102 - our own README
    assert (tmp_path / "tables" / "sharpness.csv").is_file()
    df = ns["df"]
    assert len(df) == 2 and set(df.run) == {"digits-mlp-sgd", "digits-mlp-sam"}
    sam = df[df.run == "digits-mlp-sam"].iloc[0]
    eig = np.array(ns["eig"].eigenvalues)
    # the float32 store and the float64 notebook objective agree on the same checkpoint and samples
    np.testing.assert_allclose([sam.eigenvalue_1, sam.eigenvalue_2, sam.eigenvalue_3], eig, rtol=1e-3)
    np.testing.assert_allclose(sorted(ns["top"], reverse=True), eig[:2], rtol=1e-8)
    assert ns["res"]["results"][0]["eigenvalues"] == \
        df[df.run == "digits-mlp-sgd"][["eigenvalue_1", "eigenvalue_2", "eigenvalue_3"]].iloc[0].tolist()
    # trackers: the stored results (read back by the second sharpness line) in TensorBoard and W&B offline
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    (event,) = ea.Scalars("digits-mlp-sam/sharpness/eigenvalue_1")
    assert event.step == 400 and event.value == pytest.approx(sam.eigenvalue_1, rel=1e-6)
    assert list((tmp_path / "results" / "wandb").glob("offline-run-*/run-*.wandb"))
    # callbacks: a probe every 4 (Lightning) and 2 (Trainer) steps, logged beside the loss
    assert [h["step"] for h in ns["probe"].history] == [4, 8]
    assert all(h["sam_probe/lambda_max"] > 0 for h in ns["probe"].history)
    rows = [r for r in ns["hf"].state.log_history if "sam_probe/lambda_max" in r]
    assert [r["step"] for r in rows] == [2, 4] and all("loss" in r for r in rows)
