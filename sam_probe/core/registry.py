"""Registries of the names the core accepts: each curvature operator, loss and Hessian-vector
product method is declared once, here, with everything said about it elsewhere.

An :class:`Entry` carries a name, an axis/table label, a one-line summary (``--help`` texts
and result schemas are built from it), its definition and notes (the tables of
``docs/metrics.md`` are generated from them: :meth:`Registry.markdown`, checked by a test)
and where its implementation lives (``"module:Class"`` inside :mod:`sam_probe.core`, imported
on first use so that this module, and every ``--help``, stays free of torch).

Adding a curvature operator is one class and one entry of :data:`CURVATURE_REGISTRY`::

    Entry("name", "Label", "what it is (help)", "definition", "notes", "module:Class")

then ``python -m sam_probe.core.registry docs/metrics.md`` regenerates the docs tables.
"""
from __future__ import annotations

import difflib
import importlib
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class Entry:
    """One registered name.

    ``label``: how axes and tables name it; ``summary``: one line for help texts and schemas;
    ``definition`` / ``notes``: its row in the docs table; ``target``: ``"module:Attr"`` of the
    implementation (relative to :mod:`sam_probe.core`; empty for names without one);
    ``options``: keyword arguments the implementation is called with for this name."""

    name: str
    label: str
    summary: str
    definition: str
    notes: str
    target: str = ""
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def load(self) -> Any:
        """The implementation (imports its module on first use)."""
        if not self.target:
            raise LookupError(f"{self.name!r} has no implementation to load")
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(f"sam_probe.core.{module}"), attr)


class Registry:
    """An ordered set of :class:`Entry` of one kind (``curvature``, ``loss``, ``hvp``)."""

    def __init__(self, kind: str, column: str, entries: list[Entry]):
        self.kind = kind
        self.column = column  # the docs table's first column header
        self._entries = {e.name: e for e in entries}
        if len(self._entries) != len(entries):
            raise ValueError(f"duplicate {kind} names")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str) -> Entry:
        """The entry ``name``; an unknown name raises ``ValueError`` listing the choices."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            close = difflib.get_close_matches(str(name), self.names, n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            raise ValueError(f"unknown {self.kind} {name!r}{hint}; choose one of {', '.join(self.names)}") from None

    def labels(self) -> dict[str, str]:
        """``{name: label}`` (axis names)."""
        return {e.name: e.label for e in self}

    def label(self, name: str) -> str:
        """The label of ``name``, or ``name`` itself when it is not registered (old results)."""
        e = self._entries.get(name)
        return e.label if e is not None else str(name)

    def choices_text(self, last: str = "or") -> str:
        """``'a, b, c or d'``."""
        n = list(self.names)
        return n[0] if len(n) == 1 else f"{', '.join(n[:-1])} {last} {n[-1]}"

    def help(self, lead: str = "") -> str:
        """``'<lead> a (summary a), b (summary b) or c (summary c).'`` for a ``--help`` text."""
        parts = [f"{e.name} ({e.summary})" for e in self]
        body = parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} or {parts[-1]}"
        return f"{lead} {body}.".strip()

    def markdown(self) -> str:
        """The docs table of this registry (``docs/metrics.md`` holds it between markers)."""
        rows = [f"| {self.column} | definition | notes |", "|---|---|---|"]
        rows += [f"| `{e.name}` | {e.definition} | {e.notes} |" for e in self]
        return "\n".join(rows)

    def marker(self) -> tuple[str, str]:
        return f"<!-- registry:{self.kind} (generated: python -m sam_probe.core.registry) -->", \
            f"<!-- /registry:{self.kind} -->"


# ------------------------------------------------------------- curvatures
CURVATURE_REGISTRY = Registry("curvature", "`--curvature`", [
    Entry("hessian", "Hessian", "the Hessian of the mean loss",
          "`H = ∇²L(w)`", "may be indefinite; products by `--hvp` (see Hessian-vector products)",
          "hessian:HessianOperator"),
    Entry("ggn", "GGN", "generalised Gauss-Newton J'H_l J",
          "`G = (1/N) Σ_i J_iᵀ H_ℓ,i J_i`",
          "PSD for convex `ℓ`; `H_ℓ` of each loss in closed form (see Losses), else by double backward in "
          "output space. Applied as `J v` (jvp), `H_ℓ`, `Jᵀ` (vjp).",
          "ggn:GGNOperator"),
    Entry("fisher", "Fisher", "MC Fisher, labels drawn from the model",
          "`F̂ = (1/N) Σ_t J_tᵀ [(1/S) Σ_s q_ts q_tsᵀ] J_t` over loss terms `t`, `q_ts = ∂ℓ_t(f_t, ŷ_ts)/∂f`",
          "`S = --mc-samples` labels `ŷ` per loss term drawn (seeded per sample) from the model's predictive "
          "distribution of the loss (see Losses); `E[F̂] = G` for `ce`, `lm`, `mse`, `G / C` for `bce`. "
          "`F̂` is a sample: its sampling error is estimated from independent draws (see MC Fisher error).",
          "fisher:FisherOperator"),
    Entry("ef", "empirical Fisher", "empirical Fisher, gradients of the observed labels per sample",
          "`EF = (1/N) Σ_i g_i g_iᵀ`, `g_i = ∇_w Σ_{t ∈ i} ℓ_t`",
          "one gradient per *sample* (a sequence's summed token losses for token losses); from per-sample "
          "gradients (`vmap(grad)`) kept in memory when they fit and trace, else as `J_iᵀ q_i q_iᵀ J_i` "
          "(exact, also for BatchNorm in train mode and models `vmap` cannot trace). PSD, rank ≤ #samples.",
          "empirical_fisher:EmpiricalFisherOperator"),
    Entry("ef-token", "empirical Fisher (per token)", "empirical Fisher, one gradient per loss term (token)",
          "`EF_t = (1/N) Σ_t g_t g_tᵀ`, `g_t = ∇_w ℓ_t`",
          "one gradient per *loss term*: per token for `lm` and token-level `ce`, equal to `ef` for per-sample "
          "losses; as `Σ_t J_tᵀ q_t q_tᵀ J_t` in output space. PSD, rank ≤ N.",
          "empirical_fisher:EmpiricalFisherOperator", MappingProxyType({"terms": "token"})),
    Entry("hessian-ggn", "H − GGN", "the Hessian minus the GGN (the functional Hessian)",
          "`H − G = (1/N) Σ_i Σ_c (∂ℓ_i/∂f_c) ∇²_w f_c(x_i)`",
          "the curvature the GGN drops (Singh et al. 2021's functional Hessian); zero for models linear in "
          "`w`, indefinite otherwise. One Hessian and one GGN product per vector.",
          "hessian_minus_ggn:HessianMinusGGNOperator"),
])

# ------------------------------------------------------------------ losses
LOSS_REGISTRY = Registry("loss", "`--loss`", [
    Entry("ce", "cross-entropy", "cross-entropy on logits, per sample or per labelled token",
          "`ℓ = −log softmax(f)_y`: one term per labelled sample (`[B, C]` logits), per labelled token "
          "(`[B, T, C]` logits, `[B, T]` labels) or per pixel (`[B, C, ...]` maps); labels `-100` ignored",
          "`H_ℓ = diag(p) − p pᵀ` over the class axis (the last for tokens, 1 otherwise), zero for ignored "
          "labels; Fisher labels `ŷ ~ softmax(f)` per term",
          "losses:CrossEntropy"),
    Entry("mse", "mean squared error", "mean over output entries of (f - y)^2, per sample",
          "`ℓ = (1/C) Σ_c (f_c − y_c)²` per sample (`C` output entries)",
          "`H_ℓ = 2/C · I`; Fisher `ŷ ~ N(f, C/2 · I)` (for which `ℓ` is the negative log-likelihood)",
          "losses:MeanSquaredError"),
    Entry("bce", "binary cross-entropy", "binary cross-entropy on logits, mean over output entries",
          "`ℓ = (1/C) Σ_c BCE(σ(f_c), y_c)` per sample",
          "`H_ℓ = diag(s(1−s)) / C`, `s = σ(f)`; Fisher `ŷ_c ~ Bernoulli(s_c)`; `ℓ` is the NLL / C, so "
          "`E[F̂] = G / C`",
          "losses:BinaryCrossEntropy"),
    Entry("lm", "next-token cross-entropy", "next-token cross-entropy of a language model",
          "`ℓ_t = −log softmax(f_t)_{y_{t+1}}`: one term per predicted token (logits `[B, T, V]`, labels "
          "`[B, T]`, or the token ids; attention-masked and `-100` labels ignored)",
          "as `ce` per token with labels shifted by one (the last position has no term); output products "
          "hold `O(B·T·V)` once",
          "losses:NextToken"),
    Entry("model", "the model's own loss", "the loss the model returns itself",
          "the model's returned mean loss times its term count (samples, labelled tokens, or predicted "
          "tokens for causal LMs)",
          "Hessian only: the GGN, Fisher and EF need a loss of the outputs",
          "losses:ModelOwnLoss"),
])

# -------------------------------------------------- Hessian-vector products
HVP_REGISTRY = Registry("hvp", "`--hvp`", [
    Entry("rev-rev", "double backward", "double backward",
          "`Hv = ∇_w (∇_w L · v)`: one reverse pass through the gradient's graph",
          "exact; inside a solve the gradient graph is kept between products", "hessian:RevRevProducts"),
    Entry("fwd-rev", "forward-over-reverse", "forward-over-reverse, for ops without a reverse second derivative",
          "`Hv = ∂_ε ∇_w L(w + εv)` by `jvp` of `grad`", "exact; needs forward-mode derivatives",
          "hessian:FwdRevProducts"),
    Entry("fd", "finite differences", "finite differences of gradients, for models without double backward",
          "`Hv ≈ (∇L(w + εv) − ∇L(w − εv)) / 2ε`, Richardson-extrapolated over `ε` and `ε/2`",
          "first derivatives only (fused attention, activation checkpointing, custom ops); `ε` per dtype; "
          "each product carries an error estimate (see Hessian-vector products)",
          "hessian:FiniteDifferenceProducts"),
    Entry("auto", "automatic", "rev-rev, or fd when the model has no double backward",
          "`rev-rev` when one probe product succeeds, else `fd`", "the choice is stated in one line", ""),
])


# -------------------------------------------------------------------- docs
def write_docs(path: str, registries: tuple[Registry, ...] | None = None) -> bool:
    """Replace each registry's marked block in ``path`` by its current table; ``True`` if it changed."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    new = text
    for reg in registries or (CURVATURE_REGISTRY, LOSS_REGISTRY, HVP_REGISTRY):
        start, end = reg.marker()
        rx = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
        if not rx.search(new):
            raise ValueError(f"{path}: no {start} ... {end} block")
        m = rx.search(new)
        assert m is not None
        new = new[:m.start()] + f"{start}\n{reg.markdown()}\n{end}" + new[m.end():]
    if new != text:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(new)
    return new != text


if __name__ == "__main__":  # pragma: no cover
    for p in sys.argv[1:] or ["docs/metrics.md"]:
        print(f"{p}: {'updated' if write_docs(p) else 'up to date'}")
