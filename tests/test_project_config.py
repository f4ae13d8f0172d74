"""The project config (``sam-probe.toml`` / ``[tool.sam-probe]``): found up to the repository root,
validated in one line, shown in ``--help`` as the defaults (no torch imported), overridden by flags."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clitools import run_cli
from sam_probe import project_config
from sam_probe.errors import SpecError

ROOT = Path(__file__).resolve().parents[1]


def _project(tmp_path: Path, text: str, name: str = "sam-probe.toml") -> Path:
    (tmp_path / ".git").mkdir(exist_ok=True)  # the repository root: the search stops here
    (tmp_path / name).write_text(text)
    sub = tmp_path / "src" / "deep"
    sub.mkdir(parents=True, exist_ok=True)
    return sub


def test_found_from_a_subfolder_with_paths_relative_to_the_file(tmp_path):
    (tmp_path / "models.py").write_text("")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.pt").write_text("")
    sub = _project(tmp_path, 'out = "results"\nmodel = "models.py:make"\ndata = "data/train.pt"\nmax-samples = 40\n')
    cfg = project_config.find(sub)
    assert cfg.path == tmp_path / "sam-probe.toml" and cfg.where == str(tmp_path / "sam-probe.toml")
    assert cfg.values == {"out": str(tmp_path / "results"), "model": f"{tmp_path / 'models.py'}:make",
                          "data": str(tmp_path / "data" / "train.pt"), "max_samples": 40}
    # zoo names and built-in data stay names, even beside a folder of that name
    (tmp_path / "mlp").mkdir()
    (tmp_path / "sam-probe.toml").write_text('model = "mlp"\ndata = "digits"\n')
    assert project_config.find(sub).values == {"model": "mlp", "data": "digits"}


def test_pyproject_table_sam_probe_toml_first_and_the_git_root_bounds_the_search(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.sam-probe]\nmax-samples = 7\n')  # above the repository
    repo = tmp_path / "repo"
    repo.mkdir()
    sub = _project(repo, '[project]\nname = "x"\n', name="pyproject.toml")  # a pyproject without the table
    assert project_config.find(sub).path is None  # the repository root stops the search
    (repo / "pyproject.toml").write_text('[project]\nname = "x"\n[tool.sam-probe]\nmax-samples = 5\n')
    cfg = project_config.find(sub)
    assert cfg.values == {"max_samples": 5} and cfg.where.endswith("pyproject.toml [tool.sam-probe]")
    (repo / "sam-probe.toml").write_text("max-samples = 9\n")
    assert project_config.find(sub).values == {"max_samples": 9}  # sam-probe.toml before pyproject.toml


@pytest.mark.parametrize("text,words", [
    ("max_samples = 40\n", ["unknown key 'max_samples'", "did you mean 'max-samples'"]),
    ("epochs = 3\n", ["unknown key 'epochs'", "the keys are out, model, data, max-samples"]),
    ('max-samples = "40"\n', ["key 'max-samples' must be a positive integer"]),
    ("max-samples = true\n", ["key 'max-samples' must be a positive integer"]),
    ("max-samples = 0\n", ["key 'max-samples' must be a positive integer"]),
    ("model = 3\n", ["key 'model' must be a non-empty one-line string"]),
    ('out = ""\n', ["key 'out' must be a non-empty one-line string"]),
    ("model = [\n", ["not valid TOML"]),
    ("[tool.sam-probe]\nmodel = { a = 1 }\n", ["unknown key 'tool'"]),
])
def test_invalid_configs_are_one_line_naming_the_file_and_key(tmp_path, text, words):
    sub = _project(tmp_path, text)
    with pytest.raises(SpecError) as ei:
        project_config.find(sub)
    msg = str(ei.value)
    assert "\n" not in msg and str(tmp_path / "sam-probe.toml") in msg
    for w in words:
        assert w in msg, msg


def test_oversized_and_binary_files_are_refused_unread(tmp_path):
    sub = _project(tmp_path, "# " + "x" * (project_config.MAX_BYTES + 10) + "\n")
    with pytest.raises(SpecError, match="larger than"):
        project_config.find(sub)
    (tmp_path / "sam-probe.toml").write_bytes(b"model = \"\xff\"\n")
    with pytest.raises(SpecError, match="not UTF-8"):
        project_config.find(sub)
    (tmp_path / "pyproject.toml").write_text('[tool]\nsam-probe = 3\n')
    (tmp_path / "sam-probe.toml").unlink()
    with pytest.raises(SpecError, match="must be a table"):
        project_config.find(sub)


def test_commands_use_the_config_flags_override_it_and_verbose_says_where(tmp_path, monkeypatch, tiny_runs):
    sub = _project(tmp_path, 'max-samples = 40\nout = "results"\n')
    monkeypatch.chdir(sub)
    ck = sorted(tiny_runs["sgd"].glob("*.pt"))[-1]
    res = run_cli("gradnorm", ck, "--json", "--no-plot", "--verbose")
    assert res.code == 0, res.stderr
    assert res.json()["results"][0]["n_samples"] == 40
    assert list((tmp_path / "results").rglob("*.h5"))  # --out from the config, relative to its file
    assert f"--max-samples 40 from the project config {tmp_path / 'sam-probe.toml'}" in res.stderr
    assert f"--out {tmp_path / 'results'} from the project config" in res.stderr
    flag = run_cli("gradnorm", ck, "--json", "--no-plot", "--no-store", "--max-samples", "30", "--verbose")
    assert flag.json()["results"][0]["n_samples"] == 30  # the flag wins
    assert "--max-samples" not in flag.stderr.replace("--max-samples 30", "")
    quiet = run_cli("gradnorm", ck, "--json", "--no-plot", "--no-store")
    assert "project config" not in quiet.stderr  # said only with --verbose
    (tmp_path / "sam-probe.toml").write_text("max-samples = -1\n")
    bad = run_cli("gradnorm", ck, "--no-plot", "--no-store")
    assert bad.code == 2 and bad.stderr.strip().count("\n") == 0
    assert "sam-probe.toml" in bad.stderr and "max-samples" in bad.stderr


def _help(cwd: Path, *argv: str) -> tuple[int, str, list[str]]:
    code = ("import sys, json, io, contextlib\nfrom sam_probe.cli import main\nbuf = io.StringIO()\nrc = 0\n"
            "with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):\n"
            "    try:\n        main(%r)\n    except SystemExit as e:\n        rc = e.code or 0\n"
            "print(json.dumps([rc, buf.getvalue(), sorted(m for m in ('torch', 'h5py', 'matplotlib') "
            "if m in sys.modules)]))" % (list(argv),))
    env = {"PYTHONPATH": str(ROOT), "COLUMNS": "100", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=cwd,
                         env=env).stdout
    rc, text, heavy = json.loads(out.strip().splitlines()[-1])
    return rc, text, heavy


def test_help_shows_the_project_defaults_without_importing_torch(tmp_path):
    sub = _project(tmp_path, 'max-samples = 123\nmodel = "cnn"\n')
    rc, text, heavy = _help(sub, "sharpness", "--help")
    assert rc == 0 and heavy == []
    flat = " ".join(text.replace("│", " ").split())
    assert "[default: 123]" in flat and "[default: cnn]" in flat
    assert "Project default from" in flat and "sam-probe.toml" in flat  # (a long path is wrapped)
    (tmp_path / "sam-probe.toml").write_text("max-sample = 3\n")
    rc, text, heavy = _help(sub, "sharpness", "--help")
    assert rc == 2 and "unknown key 'max-sample'" in text and heavy == []
    rc, text, _ = _help(sub, "--version")
    assert rc == 0  # commands that do not read the config still run
