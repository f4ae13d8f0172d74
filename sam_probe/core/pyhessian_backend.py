"""Run PyHessian 0.1 on the same model, parameters and data as an :class:`Objective`.

PyHessian is run on a deep copy of ``obj.model`` holding ``obj.params`` and
``obj.buffers`` (in ``obj.dtype``), so the caller's model, ``.grad`` and BatchNorm
buffers are untouched.  Its criterion is the objective's mean loss
``loss.chunk_sum / n`` per batch; with several chunks the chunks are passed as
PyHessian's "dataloader" (it weights batches by size, so the mean is exact).
BatchNorm ``train`` mode is kept through PyHessian's ``model.eval()`` by a wrapper
whose ``train()`` re-enables batch statistics without running-stat updates.
Its global-RNG draws are seeded inside :func:`torch.random.fork_rng`.

Residuals ``||Hv - λv|| / |λ|`` of its eigenpairs are computed here with
``obj.hvp`` (``k`` extra HVPs, counted on ``obj`` only).
"""
from __future__ import annotations

import copy
import importlib
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


LIMITATIONS = [
    "eigenvalues: power iteration with deflation finds the eigenvalues of largest MAGNITUDE, "
    "not the largest algebraic ones; with negative curvature it can return a negative eigenvalue",
    "eigenvalues: its tol is the relative change of the Rayleigh quotient between consecutive "
    "iterations, not a residual; the residuals reported here are computed by sam-probe",
    "eigenvalues: later pairs are deflated against earlier approximate eigenvectors, so their "
    "errors accumulate; no convergence flag is returned",
    "trace: Hutchinson with probes from the global torch RNG (unseeded in PyHessian; seeded here), "
    "stopped on a relative change of the running mean; no standard error (computed here from its samples); "
    "that rule divides by the signed running mean, so it stops at once whenever that mean is negative",
    "density: uses torch.eig, removed from modern torch; not available",
    "it calls model.eval() and writes .grad; it is run here on a deep copy of the model",
]


@dataclass
class PyHessianResult:
    """PyHessian's answers with sam-probe's honest residuals for them."""

    eigenvalues: list[float]
    eigenvectors: Tensor | None  # [P, k] flat, ordered as PyHessian returned them
    residuals: list[float]
    trace: float | None
    trace_se: float | None
    n_hvp_eigen: int
    n_hvp_trace: int
    seconds_setup: float
    seconds_eigen: float
    seconds_trace: float
    limitations: list[str] = field(default_factory=lambda: list(LIMITATIONS))

    def to_dict(self) -> dict:
        return {
            "backend": "pyhessian", "eigenvalues": self.eigenvalues, "residuals": self.residuals,
            "trace": self.trace, "trace_se": self.trace_se, "n_hvp_eigen": self.n_hvp_eigen,
            "n_hvp_trace": self.n_hvp_trace, "seconds_setup": self.seconds_setup,
            "seconds_eigen": self.seconds_eigen, "seconds_trace": self.seconds_trace,
            "limitations": list(self.limitations),
        }


class _Frozen(nn.Module):
    """Wrapper fixing the analysis mode: dropout off, BN per ``bn_mode`` whatever
    ``train()``/``eval()`` PyHessian calls."""

    def __init__(self, inner: nn.Module, bn_mode: str):
        super().__init__()
        self.inner = inner
        self.bn_mode = bn_mode
        self.train(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)

    def train(self, mode: bool = True) -> "_Frozen":
        super().train(False)
        if self.bn_mode == "train":
            for m in self.inner.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.training = True
                    m.track_running_stats = False  # batch statistics, no running-stat updates
        return self


def _model_copy(obj) -> nn.Module:
    model = copy.deepcopy(obj.model).to(device=obj.device, dtype=obj.dtype)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, p in params.items():
            if name in obj.params:
                p.copy_(obj.params[name])
            p.requires_grad_(True)
            p.grad = None
        for name, b in buffers.items():
            if name in obj.buffers:
                b.copy_(obj.buffers[name])
    return _Frozen(model, obj.bn_mode)


def _flat(obj, vec: list[Tensor]) -> Tensor:
    return torch.cat([v.reshape(-1) for v in vec]).to(device=obj.device, dtype=obj.dtype)


def run_pyhessian(obj, top_n: int = 5, *, eigen: bool = True, trace: bool = False, max_iter: int = 100,
                  tol: float = 1e-3, trace_max_iter: int = 100, trace_tol: float = 1e-3, seed: int = 0,
                  residuals: bool = True) -> PyHessianResult:
    """PyHessian's ``eigenvalues(maxIter, tol, top_n)`` and/or ``trace(maxIter, tol)`` on ``obj``.

    HVP counts are PyHessian's own Hessian-vector products; seconds are wall times
    of its calls (``seconds_setup``: building it, incl. its first-order graph).
    """
    ph_module = importlib.import_module("pyhessian.hessian")  # the module (the package attribute is the class)
    PyHessian = ph_module.hessian

    loss, n_total = obj.loss_obj, obj.n_samples

    def criterion(out: Tensor, targets: Tensor) -> Tensor:
        return loss.chunk_sum(out, targets) / out.shape[0]

    model = _model_copy(obj)
    chunks = list(obj.chunks())
    cuda = obj.device.type == "cuda"
    count = [0]
    orig_hvp = ph_module.hessian_vector_product
    orig_dl = PyHessian.dataloader_hv_product

    def counted_hvp(*a, **kw):
        count[0] += 1
        return orig_hvp(*a, **kw)

    def counted_dl(self, v):
        count[0] += 1
        return orig_dl(self, v)

    devices = [obj.device] if cuda else []
    with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        ph_module.hessian_vector_product = counted_hvp
        PyHessian.dataloader_hv_product = counted_dl
        try:
            t0 = time.perf_counter()
            if len(chunks) == 1 and len(chunks[0][0]) == n_total:
                H = PyHessian(model, criterion, data=chunks[0], cuda=cuda)
            else:
                H = PyHessian(model, criterion, dataloader=chunks, cuda=cuda)
            t_setup = time.perf_counter() - t0
            vals: list[float] = []
            vecs = None
            t_eig = t_tr = 0.0
            n_eig = n_tr = 0
            if eigen:
                count[0] = 0
                t0 = time.perf_counter()
                ev, evecs = H.eigenvalues(maxIter=max_iter, tol=tol, top_n=top_n)
                t_eig = time.perf_counter() - t0
                n_eig = count[0]
                vals = [float(x) for x in ev]
                vecs = torch.stack([_flat(obj, v) for v in evecs], 1)
            tr = se = None
            if trace:
                count[0] = 0
                t0 = time.perf_counter()
                samples = H.trace(maxIter=trace_max_iter, tol=trace_tol)
                t_tr = time.perf_counter() - t0
                n_tr = count[0]
                s = torch.tensor(samples, dtype=torch.float64)
                tr = float(s.mean())
                se = float(s.std() / len(s) ** 0.5) if len(s) > 1 else float("inf")
        finally:
            ph_module.hessian_vector_product = orig_hvp
            PyHessian.dataloader_hv_product = orig_dl
            del model
    res: list[float] = []
    if residuals and vecs is not None:
        V = vecs / vecs.norm(dim=0, keepdim=True)
        HV = obj.hvp_block(V)
        lam = torch.tensor(vals, dtype=V.dtype, device=V.device)
        res = ((HV - V * lam).norm(dim=0) / lam.abs()).double().cpu().tolist()
    return PyHessianResult(vals, vecs, res, tr, se, n_eig, n_tr, t_setup, t_eig, t_tr)
