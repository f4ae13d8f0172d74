"""Tiny models x losses x data as listed cases, with dense float64 references built independently.

Every :class:`Case` builds ``(model, x, y)`` in float64 and names its loss; the references never go
through sam-probe's objective or loss objects: each loss is written out again here
(:func:`reference_loss`), the Hessian is formed column by column from double-backward products
(never ``torch.func.jacrev``/``hessian``, whose second derivatives through ``F.layer_norm`` with an
affine weight are wrong in torch 2.13), the GGN as ``Jᵀ H_out J`` from reverse-mode Jacobian rows and
the double-backward output Hessian of the written-out loss, the empirical Fishers from per-sample
(or per-term) gradients taken one at a time.

Operator tests (and solver tests) import :data:`CASES` and parametrise over them.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

IGNORE = -100


# ------------------------------------------------------------------ models
def mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(10)
    return m, torch.randn(20, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (20,), generator=g)


def bn_cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Conv + BatchNorm (eval mode: non-trivial running statistics) + tanh + linear head."""
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)).double()
    m.train()
    m(torch.randn(16, 1, 5, 5, dtype=torch.float64))
    with torch.no_grad():
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.normal_()
    g = torch.Generator().manual_seed(11)
    return m.eval(), torch.randn(12, 1, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)


def regression_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(12)
    return m, torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64)


def multilabel_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(13)
    return m, torch.randn(16, 4, generator=g, dtype=torch.float64), \
        torch.randint(0, 2, (16, 3), generator=g).double()


V, T, D = 7, 5, 4  # vocabulary, sequence length, width of the token models


class TokenTagger(nn.Module):
    """Embedding -> tanh -> causal running mean -> LayerNorm (affine) -> per-token classes ``[B, T, 3]``."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.mix = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, classes)

    def forward(self, input_ids):
        h = torch.tanh(self.mix(self.emb(input_ids)))
        h = h.cumsum(1) / torch.arange(1, input_ids.shape[1] + 1, dtype=h.dtype).view(1, -1, 1)
        return self.head(self.norm(h))


class TinyGPT(nn.Module):
    """A GPT-2-like LM: token + position embeddings, one pre-LayerNorm block (causal attention through
    ``F.scaled_dot_product_attention``, GELU MLP), final LayerNorm and a vocabulary head."""

    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, D), nn.Embedding(T, D)
        self.ln1, self.ln2, self.lnf = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.up, self.down = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.head = nn.Linear(D, V, bias=False)

    def forward(self, input_ids, attention_mask=None):
        B, L = input_ids.shape
        h = self.wte(input_ids) + self.wpe(torch.arange(L))
        q, k, v = self.qkv(self.ln1(h)).reshape(B, L, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(B, L, D))
        h = h + self.down(F.gelu(self.up(self.ln2(h))))
        return self.head(self.lnf(h))


def _perturbed(m: nn.Module, seed: int, scale: float = 0.5) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


def _tokens(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids ``[n, T]`` and an attention mask of ragged lengths (2..T)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    for i, length in enumerate(torch.randint(2, T + 1, (n,), generator=g).tolist()):
        mask[i, length:] = 0
    return ids, mask


def token_tagger() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """``[B, T, 3]`` logits, ``[B, T]`` labels with ignored (``-100``) positions."""
    torch.manual_seed(4)
    m = _perturbed(TokenTagger().double(), 14)
    ids, mask = _tokens(8, 24)
    g = torch.Generator().manual_seed(34)
    labels = torch.randint(0, 3, (8, T), generator=g)
    return m, ids, torch.where(mask.bool(), labels, torch.full_like(labels, IGNORE))


def tiny_gpt() -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor]:
    """Next-token LM data: ids, attention mask, labels ``-100`` on padding."""
    torch.manual_seed(5)
    m = _perturbed(TinyGPT().double(), 15, 0.3)
    ids, mask = _tokens(6, 25)
    return m, {"input_ids": ids, "attention_mask": mask}, torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE))


# ------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """A model, its data and its loss; ``fisher_scale``: ``E[F̂] = fisher_scale · G``."""

    name: str
    build: Callable[[], tuple[nn.Module, Any, torch.Tensor]]
    loss: str
    bn_mode: str = "eval"
    fisher_scale: float = 1.0
    kwargs: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return self.name


def hf_gpt2() -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor]:
    """Hugging Face GPT-2 (260 parameters, padded batch): ``vmap`` cannot trace it (data-dependent control flow)."""
    import hftiny

    m = hftiny.perturb(hftiny.gpt2()).double()
    b = hftiny.token_batch(6, seed=3, labels="lm")
    return m, {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}, b["labels"]


def hf_bert() -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor]:
    """Hugging Face BERT sequence classifier (298 parameters, padded batch)."""
    import hftiny

    m = hftiny.perturb(hftiny.bert()).double()
    b = hftiny.token_batch(8, seed=4, labels="class")
    return m, {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}, b["labels"]


CASES = [
    Case("mlp-ce", mlp, "ce"),
    Case("bn-cnn-ce", bn_cnn, "ce"),
    Case("mlp-mse", regression_mlp, "mse"),
    Case("mlp-bce", multilabel_mlp, "bce", fisher_scale=1 / 3),
    Case("tagger-token-ce", token_tagger, "ce"),
    Case("gpt-lm", tiny_gpt, "lm"),
]
HF_CASES = [Case("hf-gpt2-lm", hf_gpt2, "lm"), Case("hf-bert-ce", hf_bert, "ce")]
if importlib.util.find_spec("transformers") is None:  # pragma: no cover - the test extra installs it
    HF_CASES = []
BY_NAME = {c.name: c for c in CASES + HF_CASES}


def objective(case: Case, **kw):
    """sam-probe's objective of ``case`` (float64)."""
    from sam_probe.core.objective import Objective

    model, x, y = case.build()
    if isinstance(x, dict):
        from sam_probe.core.batches import TensorBatches

        return Objective(model, TensorBatches({**x, "labels": y}), None, case.loss, bn_mode=case.bn_mode,
                         dtype=torch.float64, **kw)
    return Objective(model, x, y, case.loss, bn_mode=case.bn_mode, dtype=torch.float64, **kw)


# -------------------------------------------------------------- references
def terms_of(case: Case, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-term losses ``[B, R]`` of the written-out loss (0 where a position is no term) and the mask."""
    if case.loss == "lm":
        lg, lb = out[:, :-1], y[:, 1:]
        per = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=IGNORE, reduction="none")
        return per.reshape(lb.shape)
    if case.loss == "ce" and out.dim() == 3:
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), ignore_index=IGNORE,
                               reduction="none").reshape(y.shape)
    if case.loss == "ce":
        return F.cross_entropy(out, y, reduction="none").unsqueeze(1)
    if case.loss == "mse":
        return (out - y).pow(2).mean(1, keepdim=True)
    return F.binary_cross_entropy_with_logits(out, y, reduction="none").mean(1, keepdim=True)


def term_count(case: Case, y: torch.Tensor) -> int:
    if case.loss == "lm":
        return int((y[:, 1:] != IGNORE).sum())
    if case.loss == "ce":
        return int((y != IGNORE).sum())
    return int(y.shape[0])


class Reference:
    """Dense float64 matrices of one case (module docstring)."""

    def __init__(self, case: Case):
        self.case = case
        self.model, self.x, self.y = case.build()
        self.names = [n for n, _ in self.model.named_parameters()]
        self.params = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.buffers = dict(self.model.named_buffers())
        self.N = term_count(case, self.y)
        self.P = sum(p.numel() for p in self.params.values())

    def outputs(self, params: dict[str, torch.Tensor], x: Any = None) -> torch.Tensor:
        """``f(x; w)`` in eval mode, attention by the math kernel (the fused ones have no double backward)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        x = self.x if x is None else x
        self.model.eval()
        with sdpa_kernel([SDPBackend.MATH]):
            if isinstance(x, dict):
                out = functional_call(self.model, (params, self.buffers), (), x)
            else:
                out = functional_call(self.model, (params, self.buffers), (x,))
        return out.logits if hasattr(out, "logits") else out

    def _leaves(self) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        leaves = [self.params[n].clone().requires_grad_(True) for n in self.names]
        return leaves, dict(zip(self.names, leaves))

    @staticmethod
    def _flat(gs, leaves) -> torch.Tensor:
        return torch.cat([(g if g is not None else torch.zeros_like(w)).reshape(-1) for g, w in zip(gs, leaves)])

    def hessian(self) -> torch.Tensor:
        """``∇² L`` column by column: one double-backward product per unit vector."""
        leaves, named = self._leaves()
        loss = terms_of(self.case, self.outputs(named), self.y).sum() / self.N
        g = torch.autograd.grad(loss, leaves, create_graph=True)
        cols = []
        for j in range(self.P):
            e = torch.zeros(self.P, dtype=torch.float64)
            e[j] = 1
            parts, o = [], 0
            for w in leaves:
                parts.append(e[o:o + w.numel()].reshape(w.shape))
                o += w.numel()
            cols.append(self._flat(torch.autograd.grad(g, leaves, grad_outputs=parts, retain_graph=True,
                                                       allow_unused=True), leaves))
        return torch.stack(cols, 1)

    def jacobian(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out, J)``: outputs and their ``[out.numel(), P]`` Jacobian, one reverse pass per row."""
        leaves, named = self._leaves()
        out = self.outputs(named)
        flat = out.reshape(-1)
        rows = [self._flat(torch.autograd.grad(flat[r], leaves, retain_graph=True, allow_unused=True), leaves)
                for r in range(flat.numel())]
        return out.detach(), torch.stack(rows)

    def output_hessian(self, out: torch.Tensor) -> torch.Tensor:
        """``∂² Σ ℓ / ∂f²`` of the written-out loss, dense ``[M, M]`` over every output entry."""
        o = out.clone().requires_grad_(True)
        g = torch.autograd.grad(terms_of(self.case, o, self.y).sum(), o, create_graph=True)[0].reshape(-1)
        return torch.stack([torch.autograd.grad(g[r], o, retain_graph=True)[0].reshape(-1)
                            for r in range(g.numel())])

    def ggn(self) -> torch.Tensor:
        out, J = self.jacobian()
        return J.T @ self.output_hessian(out) @ J / self.N

    def empirical_fisher(self, per: str = "sample") -> torch.Tensor:
        """``(1/N) Σ g gᵀ`` with one gradient per sample (``per='sample'``) or per loss term (``'token'``)."""
        leaves, named = self._leaves()
        terms = terms_of(self.case, self.outputs(named), self.y)
        units = terms.sum(1, keepdim=True) if per == "sample" else terms
        EF = torch.zeros(self.P, self.P, dtype=torch.float64)
        for u in units.reshape(-1):
            if u.requires_grad:
                gi = self._flat(torch.autograd.grad(u, leaves, retain_graph=True, allow_unused=True), leaves)
                EF += torch.outer(gi, gi)
        return EF / self.N


def relative_error(A: torch.Tensor, B: torch.Tensor) -> float:
    return float((A - B).norm() / B.norm().clamp_min(1e-300))


def rademacher(P: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (P, n), generator=g) * 2 - 1).double() / math.sqrt(P)
