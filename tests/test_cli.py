"""CLI conventions: instant --help (no heavy imports), --version, completion, flags, aliases."""
from __future__ import annotations

import json
import subprocess
import sys

from clitools import run_cli
from sam_probe import __version__

HEAVY = ("torch", "scipy", "seaborn", "matplotlib", "h5py")


def _commands_in_one_process(argvs: list[list[str]], modules: tuple[str, ...]) -> tuple[list, list[str], str]:
    """Run the commands ``argvs`` in turn in one fresh process: their exit codes, which of ``modules`` are
    imported afterwards, and the process's stderr."""
    code = ("import sys, json\nfrom sam_probe.cli import main\ncodes = []\nfor argv in %r:\n    try:\n"
            "        main(argv)\n        codes.append(0)\n    except SystemExit as e:\n        codes.append(e.code)\n"
            "sys.stdout = sys.__stdout__\nprint(json.dumps([codes, sorted(m for m in %r if m in sys.modules)]))"
            % (argvs, modules))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600)
    codes, loaded = json.loads(out.stdout.strip().splitlines()[-1])
    return codes, loaded, out.stderr


def _modules_after(*argv: str) -> list[str]:
    return _commands_in_one_process([list(argv)], HEAVY)[1]


def test_help_and_version_import_nothing_heavy():
    from sam_probe.analyses import names

    assert _modules_after("--help") == []
    assert _modules_after("--version") == []
    for cmd in (*names(), "inspect", "report", "batch", "train", "merge"):
        assert _modules_after(cmd, "--help") == [], cmd


def test_default_analyses_on_digits_import_neither_dynamo_nor_scikit_learn(tiny_runs, tmp_path):
    """Start-up: ``torch.func``'s ``grad``/``jvp`` import ``torch._dynamo`` (seconds) and scikit-learn takes
    seconds more; the default ``sharpness`` (a warm-started pair), ``ratios`` and ``alignment`` on digits
    need neither (README, Performance)."""
    ck = sorted(str(p) for p in tiny_runs["sam"].glob("*.pt"))
    opts = ["--out", str(tmp_path / "out"), "--quiet", "--no-plot"]
    runs = [["sharpness", ck[1], ck[2], *opts], ["ratios", ck[2], *opts], ["alignment", ck[2], *opts]]
    codes, heavy, err = _commands_in_one_process(runs, ("torch._dynamo", "sklearn"))
    assert codes == [0, 0, 0], err[-2000:]
    assert heavy == []


def test_version_and_completion_options():
    res = run_cli("--version")
    assert res.code == 0 and res.stdout.strip() == f"sam-probe {__version__}"
    assert "--install-completion" in run_cli("--help").stdout


def test_every_command_help_defines_its_quantities_and_points_to_the_docs():
    from sam_probe.analyses import all_analyses

    for a in all_analyses():
        text = run_cli(a.name, "--help").stdout
        assert "docs/metrics.md" in text, a.name
        for term, _ in a.definitions:
            assert term.split()[0] in text, (a.name, term)
    assert "<bool>" not in run_cli("sharpness", "--help").stdout  # switches show no type
    ratios = run_cli("ratios", "--help").stdout
    assert all(c in ratios for c in ("C1", "C2", "C3", "C4", "lift", "IRE mask"))


def test_m_sharpness_is_the_option_and_m_a_hidden_alias(tiny_runs):
    text = run_cli("sharpness", "--help").stdout
    assert "--m-sharpness" in text and "--m " not in text
    ck = tiny_runs["sgd"] / "step_000020.pt"
    base = ["--max-samples", "40", "--top-k", "0", "--no-store", "--json"]
    new = run_cli("sharpness", ck, "--m-sharpness", "10", *base).json()["results"][0]
    old = run_cli("sharpness", ck, "--m", "10", *base).json()["results"][0]
    whole = run_cli("sharpness", ck, *base).json()["results"][0]
    assert new["m"] == old["m"] == 10 and new["sam_sharpness"] == old["sam_sharpness"] != whole["sam_sharpness"]


def test_inspect_takes_several_paths_and_runs(tiny_runs):
    res = run_cli("inspect", tiny_runs["sgd"], tiny_runs["sam"] / "step_000010.pt", "--json")
    assert res.code == 0
    assert len(res.json()["checkpoints"]) == 4


def test_renamed_options_show_the_new_flag_and_keep_the_old_one_hidden(tiny_runs):
    import re

    def flags(cmd: str) -> set[str]:
        return set(re.findall(r"--[a-z][a-z-]*", run_cli(cmd, "--help").stdout))

    assert "--step-size" in flags("alignment") and "--eta" not in flags("alignment")
    assert "--escape-window" in flags("distance") and "--k" not in flags("distance")
    base = ["--ref", "0", "--no-store", "--json"]
    new = run_cli("distance", tiny_runs["sgd"], "--escape-window", "1", *base).json()
    old = run_cli("distance", tiny_runs["sgd"], "--k", "1", *base).json()
    default = run_cli("distance", tiny_runs["sgd"], *base).json()
    assert new["escape_steps"] == old["escape_steps"] != default["escape_steps"]


def test_error_messages_spell_every_setting_as_its_flag():
    """A neutral error names settings by Python name; the command line renders each as the flag it has."""
    from sam_probe.analyses import all_analyses
    from sam_probe.commands.options import ANALYSIS_OPTIONS
    from sam_probe.errors import CLI, opt, render
    from sam_probe.settings import Settings

    shared = {d for _, o in ANALYSIS_OPTIONS.values() for d in o.param_decls}
    for field in Settings.__dataclass_fields__:
        assert render(opt(field), CLI) in shared, field
    for a in all_analyses():
        for o in a.options:
            assert render(opt(o.name), CLI) == o.flag, (a.name, o.name)


def test_ci_runs_the_readmes_test_command_with_the_linters():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    command = root.joinpath(".ci", "run").read_text().strip().splitlines()[-1]
    assert command in root.joinpath("README.md").read_text()
    assert "ruff check sam_probe && mypy sam_probe && python -m pytest" in command
    assert '"ruff' in root.joinpath("pyproject.toml").read_text() and '"mypy' in root.joinpath("pyproject.toml").read_text()
