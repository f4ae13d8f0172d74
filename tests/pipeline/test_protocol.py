"""Analyses use only the AnalysisSession protocol, and Session implements every member of it."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

from sam_probe.pipeline.protocol import AnalysisSession
from sam_probe.pipeline.session import Session

ANALYSES = Path(__file__).resolve().parents[2] / "sam_probe" / "analyses"


def _members(cls) -> set[str]:
    return {n for n in vars(cls) if not n.startswith("_")} | set(getattr(cls, "__annotations__", {}))


def test_analyses_ask_the_session_only_for_protocol_members():
    allowed = _members(AnalysisSession)
    used: dict[str, set[str]] = {}
    for path in ANALYSES.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "session":
                used.setdefault(node.attr, set()).add(path.name)
            if isinstance(node, ast.ImportFrom) and node.module and "pipeline" in node.module:
                assert node.module.endswith("protocol"), (path.name, node.module)  # no reach past the protocol
    assert used, "the analyses use a session"
    assert set(used) <= allowed, {k: v for k, v in used.items() if k not in allowed}


def test_session_implements_the_protocol_with_the_same_signatures():
    for name in _members(AnalysisSession) - {"settings"}:
        want = inspect.signature(getattr(AnalysisSession, name))
        have = inspect.signature(getattr(Session, name))
        params = [p for p in have.parameters if p != "self"]
        assert params == [p for p in want.parameters if p != "self"], name
