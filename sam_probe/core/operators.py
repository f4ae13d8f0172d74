"""Curvature operators: symmetric ``P × P`` matrices of an objective, only ever applied to blocks.

With ``L(w) = (1/N) Σ_i ℓ(f(x_i; w), y_i)`` (``N`` = ``obj.denominator``), ``J_i = ∂f(x_i)/∂w``
and ``H_ℓ,i = ∂²ℓ/∂f²`` at ``f_i`` (docs/metrics.md, "Curvature operators"):

- ``hessian``: ``H = ∇²L(w)`` (the objective's own HVPs, kept graph included);
- ``ggn``: ``G = (1/N) Σ_i J_iᵀ H_ℓ,i J_i`` (PSD for convex ``ℓ``), applied as
  ``v ↦ J v`` (``jvp``), then ``H_ℓ``, then ``Jᵀ`` (``vjp``) per chunk, never forming ``J``.
  ``H_ℓ`` in closed form for ``ce`` (``diag(p) - p pᵀ`` over the class dimension 1),
  ``mse`` (``2/C · I``, ``C`` output entries per sample, the mean over outputs of
  :func:`~sam_probe.core.objective.per_sample_loss_sum`) and ``bce``
  (``diag(s(1-s)) / C``, ``s = σ(f)``); for any other loss by double backward of
  ``obj.loss_sum_from_outputs`` in output space;
- ``fisher``: ``F̂ = (1/N) Σ_i J_iᵀ [(1/S) Σ_s q_is q_isᵀ] J_i`` with
  ``q_is = ∂ℓ(f_i, ŷ_is)/∂f`` for ``S = mc_samples`` labels ``ŷ_is`` drawn from the
  model's predictive distribution (seeded by global sample index, so chunking and
  sharding do not change the draws): categorical ``softmax(f)`` for ``ce`` (then
  ``E[q qᵀ] = H_ℓ`` and ``E[F̂] = G``), ``N(f, C/2 · I)`` for ``mse`` (for which ``ℓ`` is
  the negative log-likelihood; ``E[F̂] = G``), Bernoulli ``σ(f)`` for ``bce``
  (``ℓ`` = NLL / C, so ``E[F̂] = G / C``; equal for one output);
- ``ef``: ``EF = (1/N) Σ_i g_i g_iᵀ``, ``g_i = ∇_w ℓ(f(x_i), y_i)``, from per-sample
  gradients (``torch.func.vmap(grad)``, chunked) kept in memory when they fit
  ``cache_bytes`` (then one product is two matrix products), otherwise applied as
  ``J_iᵀ q_i q_iᵀ J_i`` with ``q_i = ∂ℓ_i/∂f_i`` (exact also when BatchNorm in train
  mode couples the samples of a chunk, where single-sample gradients would not be).

Every product is the sum over this rank's chunks, all-reduced when sharded, divided by
``obj.denominator``.  :meth:`CurvatureOperator.restrict` gives the diagonal block of
named parameter tensors (or a flat slice), ``[S, S]`` of the same matrix.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from .names import CURVATURES  # noqa: F401 - re-exported
_NOISE_BLOCK = 1024  # samples per seeded noise block of the MC Fisher (chunking-invariant draws)


# ------------------------------------------------------------------ base
class CurvatureOperator:
    """A symmetric ``P × P`` matrix seen through :meth:`matmat` (``[P, b] -> [P, b]``).

    ``n_matvec`` counts the vectors it was applied to; ``name`` says which matrix
    (``hessian``, ``ggn``, ``fisher``, ``ef``, ``ggn[fc1.weight]`` for a block, ...);
    :meth:`context` is entered by the solvers around all their products (the Hessian
    keeps its gradient graph inside it).
    """

    def __init__(self, name: str, P: int, dtype: torch.dtype, device: torch.device, space=None):
        self.name = name
        self.curvature = name.split("[", 1)[0]
        self.P = int(P)
        self.dtype = dtype
        self.device = torch.device(device)
        self.space = space  # ParamSpace of the full operator (None for blocks and plain matrices)
        self.n_matvec = 0

    @property
    def n_params(self) -> int:
        return self.P

    def _matmat(self, V: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def matmat(self, V: Tensor) -> Tensor:
        """``A V`` for ``V`` of shape ``[P, b]`` (or ``[P]``), counted in :attr:`n_matvec`."""
        if V.dim() == 1:
            return self.matmat(V.reshape(-1, 1))[:, 0]
        if V.dim() != 2 or V.shape[0] != self.P:
            raise ValueError(f"V must be [P={self.P}, b], got {tuple(V.shape)}")
        V = V.to(device=self.device, dtype=self.dtype)
        out = self._matmat(V)
        self.n_matvec += V.shape[1]
        return out

    __call__ = matmat

    def context(self) -> contextlib.AbstractContextManager:
        """Entered around a solver's products (nothing to keep by default)."""
        return contextlib.nullcontext()

    def restrict(self, sel: str | Sequence[str] | slice | Tensor, label: str | None = None) -> "BlockOperator":
        """The diagonal block ``A[S, S]``: ``S`` = the entries of the named parameter
        tensor(s), a flat ``slice`` or an index tensor; its products cost one product of ``A``."""
        index, default = _index_of(self, sel)
        return BlockOperator(self, index, label or default)


def _index_of(op: CurvatureOperator, sel) -> tuple[Tensor, str]:
    if isinstance(sel, slice):
        idx = torch.arange(op.P)[sel]
        return idx, f"{idx[0].item() if len(idx) else 0}:{idx[-1].item() + 1 if len(idx) else 0}"
    if isinstance(sel, Tensor):
        idx = sel.reshape(-1).long().cpu()
        return idx, f"{len(idx)} entries"
    names = [sel] if isinstance(sel, str) else list(sel)
    if op.space is None:
        raise ValueError(f"{op.name}: restrict by parameter name needs an operator on a parameter space")
    slices = op.space.slices()
    unknown = [n for n in names if n not in slices]
    if unknown or not names:
        raise ValueError(f"unknown parameter tensors {unknown}; known: {', '.join(slices)}")
    idx = torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in names])
    return idx, ",".join(names)


class BlockOperator(CurvatureOperator):
    """``A[S, S]`` of a parent operator: ``U ↦ (A E U)[S]`` with ``E`` the embedding of ``S``."""

    def __init__(self, parent: CurvatureOperator, index: Tensor, label: str):
        if len(index) == 0:
            raise ValueError("empty block")
        super().__init__(f"{parent.name}[{label}]", len(index), parent.dtype, parent.device)
        self.curvature = parent.curvature
        self.parent = parent
        self.index = index.to(parent.device)
        self.label = label

    def _matmat(self, U: Tensor) -> Tensor:
        V = torch.zeros(self.parent.P, U.shape[1], dtype=self.dtype, device=self.device)
        V[self.index] = U
        return self.parent.matmat(V)[self.index]

    def context(self):
        return self.parent.context()


class MatrixOperator(CurvatureOperator):
    """A dense symmetric matrix as an operator (tests, references)."""

    def __init__(self, A: Tensor, name: str = "matrix"):
        super().__init__(name, A.shape[0], A.dtype, A.device)
        self.A = A

    def _matmat(self, V: Tensor) -> Tensor:
        return self.A @ V


# ------------------------------------------------------------- Hessian
class HessianOperator(CurvatureOperator):
    """``H = ∇²L(w)`` through ``obj.hvp_block``; :meth:`context` is ``obj.reuse_graph()``."""

    def __init__(self, obj, reuse_graph: bool = True):
        super().__init__("hessian", obj.space.size, obj.dtype, obj.device, obj.space)
        self.obj = obj
        self.reuse_graph = reuse_graph

    def _matmat(self, V: Tensor) -> Tensor:
        return self.obj.hvp_block(V)

    def context(self):
        return self.obj.reuse_graph() if self.reuse_graph else contextlib.nullcontext()


# ------------------------------------------------------ output-space helpers
def _leaves(tree) -> list[Tensor]:
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(tree) if isinstance(t, Tensor)]


def _per_sample_dot(q, JV) -> Tensor:
    """``[b, B]``: per sample, ``Σ`` over every output entry (all leaves) of ``q ⊙ JV[v]``."""
    from torch.utils._pytree import tree_leaves

    tot = None
    for a, u in zip(tree_leaves(q), tree_leaves(JV)):
        d = (a.unsqueeze(0) * u).reshape(u.shape[0], u.shape[1], -1).sum(-1)
        tot = d if tot is None else tot + d
    return tot


def _scaled(coef: Tensor, q):
    """The pytree ``coef[v, i] · q_i`` with a leading vector dimension."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda a: coef.reshape(*coef.shape, *([1] * (a.dim() - 1))) * a.unsqueeze(0), q)


def _batch_size(tree) -> int:
    return int(_leaves(tree)[0].shape[0])


class _OutputSpaceOperator(CurvatureOperator):
    """``(1/N) Σ_chunks Jᵀ M J`` for an output-space matrix ``M`` of each chunk (subclasses).

    Per chunk: one forward with ``vjp`` (``u ↦ Jᵀ u``), ``vmap`` of ``jvp`` for ``J V``, ``M``,
    ``vmap`` of the ``vjp``.  Inside :meth:`context`, an objective of one chunk keeps that
    forward graph between products (like the Hessian's kept graph): then ``J V`` is the
    transpose of ``u ↦ Jᵀ u`` (a double backward) and a product runs no forward at all.
    """

    def __init__(self, name: str, obj):
        super().__init__(name, obj.space.size, obj.dtype, obj.device, obj.space)
        self.obj = obj
        self.vector_block = getattr(obj, "vector_block", None)
        self._keep = False
        self._graph: tuple | bool | None = None  # (x, y, out, pull, push) of the single chunk; False: several

    def _output_product(self, out, y, JV, offset: int, x=None):  # pragma: no cover - abstract
        """``M JV`` for ``JV`` with a leading vector dimension ``b``; ``offset`` = global index of the chunk's first sample."""
        raise NotImplementedError

    @contextlib.contextmanager
    def _kept(self) -> Iterator[None]:
        prev = self._keep
        self._keep = True
        try:
            yield
        finally:
            self._keep = prev
            if not prev:
                self._graph = None

    def context(self):
        return self._kept()

    def _single_chunk_graph(self):
        if self._graph is None:
            from torch.func import vjp
            from torch.utils._pytree import tree_map

            obj = self.obj
            chunks = list(obj.chunks())
            if len(chunks) != 1:
                self._graph = False
            else:
                x, y = chunks[0]
                with obj.mode():
                    out, pull = vjp(lambda q: obj.outputs(q, x), obj.params)
                _, push = vjp(pull, tree_map(torch.zeros_like, out))
                self._graph = (x, y, out, pull, push)
        return self._graph

    def _matmat(self, V: Tensor) -> Tensor:
        vb = self.vector_block
        if vb and V.shape[1] > vb:
            return torch.cat([self._matmat(V[:, s:s + vb]) for s in range(0, V.shape[1], vb)], dim=1)
        from torch.func import jvp, vjp, vmap

        obj, space = self.obj, self.obj.space
        p = obj.params
        Vd = space.unflatten(V.T.contiguous())  # {name: [b, *shape]}
        acc = torch.zeros(V.shape[1], self.P, dtype=self.dtype, device=self.device)
        offset = getattr(obj, "lo", 0)
        kept = self._single_chunk_graph() if self._keep else None
        if kept:
            x, y, out, pull, push = kept
            JV = vmap(lambda v: push((v,))[0])(Vd)
            acc += space.flatten_batched(vmap(pull)(self._output_product(out, y, JV, offset, x))[0])
        else:
            with obj.mode():
                for x, y in obj.chunks():
                    def f(q, x=x):
                        return obj.outputs(q, x)

                    out, pull = vjp(f, p)
                    JV = vmap(lambda v: jvp(f, (p,), (v,))[1])(Vd)
                    acc += space.flatten_batched(vmap(pull)(self._output_product(out, y, JV, offset, x))[0])
                    offset += _batch_size(out)
        return (obj._reduce(acc) / obj.denominator).T.contiguous()


# ------------------------------------------------------------------ GGN
def output_hessian_product(loss: str, out: Tensor, U: Tensor) -> Tensor:
    """``H_ℓ U`` in closed form for ``loss`` in ``ce``, ``mse``, ``bce``; ``U`` = ``[b, *out.shape]``."""
    if loss == "ce":
        p = torch.softmax(out, dim=1)
        return p * (U - (p * U).sum(dim=2, keepdim=True))
    C = out[0].numel()
    if loss == "mse":
        return U * (2.0 / C)
    if loss == "bce":
        s = torch.sigmoid(out)
        return U * (s * (1 - s) / C)
    raise ValueError(f"no closed-form output Hessian for loss {loss!r}")


CLOSED_FORMS = ("ce", "mse", "bce")


class GGNOperator(_OutputSpaceOperator):
    """``G = (1/N) Σ_i J_iᵀ H_ℓ,i J_i`` (module docstring); ``closed_form=False`` forces the
    autograd output Hessian (double backward of the loss in output space) for any loss."""

    def __init__(self, obj, closed_form: bool | None = None):
        super().__init__("ggn", obj)
        ok = obj.loss_name in CLOSED_FORMS
        self.closed_form = ok if closed_form is None else bool(closed_form)
        if self.closed_form and not ok:
            raise ValueError(f"no closed-form output Hessian for loss {obj.loss_name!r}")

    def _output_product(self, out, y, JV, offset, x=None):
        if self.closed_form and isinstance(out, Tensor):
            return output_hessian_product(self.obj.loss_name, out, JV)
        from torch.func import grad, jvp, vmap

        g = grad(lambda o: self.obj.loss_sum_from_outputs(o, y, x))
        return vmap(lambda u: jvp(g, (out,), (u,))[1])(JV)


# --------------------------------------------------------------- Fishers
def _noise(seed: int, lo: int, hi: int, S: int, M: int, kind: str, dtype, device) -> Tensor:
    """``[hi - lo, S, M]`` draws for global samples ``lo..hi-1``: uniform (``kind='u'``) or
    standard normal (``'n'``), from seeded generators per block of 1024 global samples."""
    import numpy as np

    parts = []
    for blk in range(lo // _NOISE_BLOCK, (hi - 1) // _NOISE_BLOCK + 1):
        state = int(np.random.SeedSequence([int(seed), blk, M, S]).generate_state(1, np.uint64)[0]) & (2 ** 63 - 1)
        gen = torch.Generator().manual_seed(state)
        shape = (_NOISE_BLOCK, S, M)
        z = torch.rand(shape, generator=gen, dtype=torch.float64) if kind == "u" else \
            torch.randn(shape, generator=gen, dtype=torch.float64)
        s, e = max(lo, blk * _NOISE_BLOCK) - blk * _NOISE_BLOCK, min(hi, (blk + 1) * _NOISE_BLOCK) - blk * _NOISE_BLOCK
        parts.append(z[s:e])
    return torch.cat(parts).to(device=device, dtype=dtype)


def sampled_output_gradients(loss: str, out: Tensor, noise: Tensor) -> Tensor:
    """``q_s = ∂ℓ(f, ŷ_s)/∂f`` for labels drawn from the predictive distribution: ``[S, *out.shape]``.

    ``noise``: ``[B, S, M]`` uniforms (``ce``, ``bce``) or normals (``mse``), ``M = out[0].numel()``."""
    B = out.shape[0]
    M = out[0].numel()
    S = noise.shape[1]
    if loss == "ce":
        p = torch.softmax(out.detach(), dim=1)
        C = p.shape[1]
        pl = p.movedim(1, -1).reshape(B, -1, C)  # [B, R, C]
        R = pl.shape[1]
        u = noise[:, :, :R].permute(1, 0, 2)  # [S, B, R]
        cum = pl.cumsum(-1)
        lab = torch.searchsorted(cum.expand(S, B, R, C).contiguous(), u.unsqueeze(-1).contiguous()).squeeze(-1)
        lab = lab.clamp_max(C - 1)
        q = pl.unsqueeze(0) - torch.nn.functional.one_hot(lab, C).to(pl.dtype)  # [S, B, R, C]
        return q.reshape(S, *p.movedim(1, -1).shape).movedim(-1, 2)
    z = noise.permute(1, 0, 2).reshape(S, *out.shape)
    if loss == "mse":  # ŷ = f + sqrt(M/2) ε, ℓ = ||f - ŷ||² / M  ->  q = -sqrt(2/M) ε
        return -(2.0 / M) ** 0.5 * z
    if loss == "bce":
        s = torch.sigmoid(out.detach())
        return (s.unsqueeze(0) - (z < s.unsqueeze(0)).to(s.dtype)) / M
    raise ValueError(f"the fisher needs a predictive distribution; loss {loss!r} has none here "
                     f"(ce, mse, bce); use ggn or ef")


class FisherOperator(_OutputSpaceOperator):
    """MC Fisher ``F̂`` with ``mc_samples`` seeded labels per sample (module docstring)."""

    def __init__(self, obj, mc_samples: int = 1, seed: int = 0):
        super().__init__("fisher", obj)
        if obj.loss_name not in CLOSED_FORMS:
            raise ValueError(f"the fisher needs a predictive distribution; loss {obj.loss_name!r} has none "
                             f"(supported: {', '.join(CLOSED_FORMS)}); use ggn or ef")
        if mc_samples < 1:
            raise ValueError("mc_samples must be >= 1")
        self.mc_samples = int(mc_samples)
        self.seed = int(seed)

    def output_gradients(self, out: Tensor, offset: int) -> Tensor:
        """The sampled ``q`` of one chunk, ``[S, *out.shape]`` (same draws at every product)."""
        B, M = out.shape[0], out[0].numel()
        kind = "n" if self.obj.loss_name == "mse" else "u"
        z = _noise(self.seed, offset, offset + B, self.mc_samples, M, kind, out.dtype, out.device)
        return sampled_output_gradients(self.obj.loss_name, out, z)

    def _output_product(self, out, y, JV, offset, x=None):
        q = self.output_gradients(out, offset)
        B = out.shape[0]
        qf, jf = q.reshape(q.shape[0], B, -1), JV.reshape(JV.shape[0], B, -1)
        coef = torch.einsum("sbm,vbm->svb", qf, jf)  # q_is · (J v)_i
        return torch.einsum("svb,sbm->vbm", coef, qf).reshape(JV.shape) / self.mc_samples


class EmpiricalFisherOperator(_OutputSpaceOperator):
    """``EF = (1/N) Σ_i g_i g_iᵀ`` (module docstring).

    ``per_sample``: ``None`` (default) keeps per-sample gradients when they fit
    ``cache_bytes`` and no BatchNorm runs in train mode; ``True`` requires them;
    ``False`` always uses the output-space form.
    """

    def __init__(self, obj, per_sample: bool | None = None, cache_bytes: int = 2 ** 28):
        super().__init__("ef", obj)
        itemsize = torch.empty(0, dtype=obj.dtype).element_size()
        n_local = getattr(obj, "n_local", None)
        coupled = getattr(obj, "bn_mode", "eval") == "train" and any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in obj.model.modules()) \
            if hasattr(obj, "model") else False
        fits = n_local is not None and n_local * self.P * itemsize <= cache_bytes
        if per_sample and coupled:
            raise ValueError("per-sample gradients with BatchNorm in train mode would change the batch "
                             "statistics; use per_sample=False")
        self.per_sample = (fits and not coupled) if per_sample is None else bool(per_sample)
        self._G: list[Tensor] | None = None

    def per_sample_gradients(self) -> list[Tensor]:
        """``[B, P]`` per-sample gradients ``g_i`` of every local chunk (``vmap(grad)``), cached."""
        if self._G is None:
            from torch.func import grad, vmap
            from torch.utils._pytree import tree_map

            obj = self.obj

            def one(p, xi, yi):
                xb = tree_map(lambda t: t.unsqueeze(0), xi)
                yb = tree_map(lambda t: t.unsqueeze(0), yi)
                return obj.loss_sum_from_outputs(obj.outputs(p, xb), yb, xb)

            g = vmap(grad(one), in_dims=(None, 0, 0))
            with obj.mode():
                self._G = [obj.space.flatten_batched(g(obj.params, x, y)).detach() for x, y in obj.chunks()]
        return self._G

    def context(self):
        return super().context() if not self.per_sample else contextlib.nullcontext()

    def _matmat(self, V: Tensor) -> Tensor:
        if not self.per_sample:
            return super()._matmat(V)
        acc = torch.zeros(self.P, V.shape[1], dtype=self.dtype, device=self.device)
        for G in self.per_sample_gradients():
            acc += G.T @ (G @ V)
        return self.obj._reduce(acc) / self.obj.denominator

    def _output_product(self, out, y, JV, offset, x=None):
        from torch.func import grad
        from torch.utils._pytree import tree_map

        q = grad(lambda o: self.obj.loss_sum_from_outputs(o, y, x))(tree_map(torch.Tensor.detach, out))
        return _scaled(_per_sample_dot(q, JV), q)


# -------------------------------------------------------------- by name
def curvature_operator(obj, name: str = "hessian", *, mc_samples: int = 1, seed: int = 0,
                       reuse_graph: bool = True, **kwargs: Any) -> CurvatureOperator:
    """The operator ``name`` (one of :data:`CURVATURES`) of an objective.

    ``mc_samples``/``seed``: the MC Fisher's labels; ``reuse_graph``: the Hessian keeps its
    gradient graph inside :meth:`CurvatureOperator.context`; further ``kwargs`` go to the
    operator class (``closed_form`` for ``ggn``, ``per_sample``/``cache_bytes`` for ``ef``).
    """
    if name == "hessian":
        return HessianOperator(obj, reuse_graph=reuse_graph, **kwargs)
    if name == "ggn":
        return GGNOperator(obj, **kwargs)
    if name == "fisher":
        return FisherOperator(obj, mc_samples=mc_samples, seed=seed, **kwargs)
    if name == "ef":
        return EmpiricalFisherOperator(obj, **kwargs)
    raise ValueError(f"unknown curvature {name!r}; choose one of {', '.join(CURVATURES)}")


def as_operator(x) -> CurvatureOperator:
    """An operator as is; an objective as its Hessian operator (what the solvers accept)."""
    if isinstance(x, CurvatureOperator):
        return x
    if hasattr(x, "hvp_block") and hasattr(x, "space"):
        return HessianOperator(x)
    raise TypeError(f"expected a CurvatureOperator or an Objective, got {type(x).__name__}")
