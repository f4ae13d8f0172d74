"""Registries own their names: docs tables, help texts, labels and implementations come from one entry."""
import re
from pathlib import Path

import pytest

from sam_probe.core import names
from sam_probe.core.registry import CURVATURE_REGISTRY, HVP_REGISTRY, LOSS_REGISTRY, Entry, Registry

DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
REGISTRIES = (CURVATURE_REGISTRY, LOSS_REGISTRY, HVP_REGISTRY)


@pytest.mark.parametrize("reg", REGISTRIES, ids=lambda r: r.kind)
def test_every_registered_name_is_documented_by_its_generated_table(reg):
    text = DOCS.read_text(encoding="utf-8")
    start, end = reg.marker()
    block = re.search(re.escape(start) + r"\n(.*?)\n" + re.escape(end), text, re.S)
    assert block, f"docs/metrics.md has no {reg.kind} table (python -m sam_probe.core.registry)"
    assert block.group(1) == reg.markdown(), "stale table: run python -m sam_probe.core.registry"
    for name in reg.names:
        assert f"| `{name}` |" in block.group(1)


@pytest.mark.parametrize("reg", REGISTRIES, ids=lambda r: r.kind)
def test_help_labels_and_implementations_come_from_the_entries(reg):
    text = reg.help("Choose:")
    for e in reg:
        assert f"{e.name} ({e.summary})" in text
        assert reg.label(e.name) == e.label
        if e.target:
            assert callable(e.load())
    assert reg.label("unregistered") == "unregistered"
    assert names.CURVATURES == CURVATURE_REGISTRY.names and names.LOSSES == LOSS_REGISTRY.names
    assert names.HVP_METHODS == HVP_REGISTRY.names


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match=r"unknown curvature 'gnn' \(did you mean 'ggn'"):
        CURVATURE_REGISTRY.get("gnn")
    with pytest.raises(ValueError, match="duplicate"):
        Registry("x", "x", [Entry("a", "A", "a", "a", "a"), Entry("a", "A", "a", "a", "a")])


def test_the_registry_module_is_torch_free():
    import subprocess
    import sys

    code = ("import sys, sam_probe.core.registry, sam_probe.core.names; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
