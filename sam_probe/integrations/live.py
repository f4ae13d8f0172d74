"""An analysis on a live module, between training steps: what the training callbacks run.

:func:`probe` builds an :class:`~sam_probe.core.objective.Objective` of the module on one batch (the
parameters are copied, the module is called through ``torch.func.functional_call``: its weights,
``.grad``, BatchNorm statistics and train/eval flags are left as they were) and returns a flat dict of
numbers.  The global RNG states (CPU and CUDA) are saved and restored around it, so training that draws
random numbers (dropout, shuffling) draws the same ones with or without the probe.

Analyses (``analysis=``) and the keys they return (the callbacks prefix them with ``sam_probe/``):

- ``sharpness``: ``lambda_max`` (the top Hessian eigenvalue; ``eigenvalue_2 .. eigenvalue_k`` with
  ``top_k=k``), ``residual_1`` (its relative residual) and ``sam_sharpness`` (``L(w + e) - L(w)`` at
  radius ``rho``);
- ``lambda_max``: the top eigenvalue alone (no SAM step);
- ``trace``: ``trace`` and ``trace_se`` (Hutch++ to relative tolerance ``trace_tol``);
- ``ratios``: ``fraction.<category>`` of the SAM ratio categories, ``grad_norm``, ``perturbed_grad_norm``;
- ``gradnorm``: ``grad_norm``, ``param_norm``.

Options: ``top_k`` (1), ``tol`` (1e-3, eigen solver), ``rho`` (0.05), ``variant`` (l2), ``trace_tol``
(1e-2), ``max_hvp``, ``seed`` (0), and the objective's ``dtype`` (default: the weights', float32 for
half-precision weights; ``"float64"`` accepted), ``bn_mode`` (eval), ``chunk_size``, ``hvp_method``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

ANALYSES = ("sharpness", "lambda_max", "trace", "ratios", "gradnorm")
OBJECTIVE_OPTIONS = ("dtype", "bn_mode", "chunk_size", "hvp_method")
PROBE_OPTIONS = ("top_k", "tol", "rho", "variant", "trace_tol", "max_hvp", "seed")


def check(analysis: str, options: Mapping[str, Any]) -> None:
    """A ``ValueError`` naming the choices for an unknown analysis or option (raised when the callback is made)."""
    from ..errors import suggest

    if analysis not in ANALYSES:
        raise ValueError(f"analysis={analysis!r}: choose one of {', '.join(ANALYSES)}{suggest(analysis, ANALYSES)}")
    known = (*PROBE_OPTIONS, *OBJECTIVE_OPTIONS)
    for k in options:
        if k not in known:
            raise ValueError(f"unknown option {k!r}{suggest(k, known)}; options: {', '.join(known)}")


def split_batch(data: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch: ``(x, y)`` / ``[x, y]``, a dict (its ``labels`` are the
    targets, as :class:`~sam_probe.core.objective.Objective` reads them) or ``x`` alone."""
    from ..core.batches import DataError, split_item

    try:
        x, y = split_item(data)  # the dataset items' rule: (x, y), (x,), x or a dict
    except DataError:
        raise ValueError(f"a batch of {len(data)} items: give data=(inputs, targets)") from None
    return (dict(x) if isinstance(x, Mapping) else x), y


@contextlib.contextmanager
def kept_rng(device: Any) -> Iterator[None]:
    """The global RNG states of the CPU (and of ``device`` when it is CUDA) restored on exit."""
    import torch

    devices = [device] if getattr(device, "type", None) == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def probe(model: Any, data: Any, analysis: str = "sharpness", loss: Any = None, **options: Any) -> dict[str, float]:
    """``analysis`` (module docstring) of ``model`` on the batch ``data``, as ``{name: number}``."""
    import torch

    import sam_probe as sp

    check(analysis, options)
    x, y = split_batch(data)
    obj_kw = {k: options[k] for k in OBJECTIVE_OPTIONS if k in options}
    if isinstance(obj_kw.get("dtype"), str):  # "float64" -> torch.float64
        dtype = getattr(torch, obj_kw["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype={obj_kw['dtype']!r}: give a torch dtype name such as float64")
        obj_kw["dtype"] = dtype
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    if "dtype" not in obj_kw and first is not None and first.dtype in (torch.float16, torch.bfloat16):
        obj_kw["dtype"] = torch.float32  # half-precision weights are upcast (as the command line does)
    with kept_rng(device), torch.enable_grad():
        obj = sp.Objective(model, x, y, loss, **obj_kw)
        return _run(sp, obj, analysis, options)


def _run(sp: Any, obj: Any, analysis: str, o: Mapping[str, Any]) -> dict[str, float]:
    seed = int(o.get("seed", 0))
    if analysis in ("sharpness", "lambda_max"):
        k = int(o.get("top_k", 1))
        kw = {"max_hvp": o["max_hvp"]} if o.get("max_hvp") else {}
        eig = sp.top_eigen(obj, k=k, tol=float(o.get("tol", 1e-3)), seed=seed, **kw)
        vals = [float(v) for v in eig.eigenvalues]
        out = {"lambda_max": vals[0], **{f"eigenvalue_{i}": v for i, v in enumerate(vals[1:], 2)},
               "residual_1": float(eig.residuals[0])}
        if analysis == "sharpness":
            out["sam_sharpness"] = float(sp.sam_sharpness(obj, rho=float(o.get("rho", 0.05)),
                                                          variant=o.get("variant", "l2")))
        return out
    if analysis == "trace":
        kw = {"max_hvp": int(o["max_hvp"])} if o.get("max_hvp") else {}
        tr = sp.hessian_trace(obj, tol=float(o.get("trace_tol", 1e-2)), seed=seed, **kw)
        return {"trace": float(tr.estimate), "trace_se": float(tr.se)}
    if analysis == "ratios":
        r = sp.ratio_analysis(obj, rho=float(o.get("rho", 0.05)), variant=o.get("variant", "l2"), per_layer=False)
        return {**{f"fraction.{c}": float(v) for c, v in r.fractions.items()}, "grad_norm": float(r.grad_norm),
                "perturbed_grad_norm": float(r.perturbed_grad_norm)}
    from ..analyses.gradnorm import gradient_norms

    g = gradient_norms(obj)
    return {"grad_norm": float(g["grad_norm"]), "param_norm": float(g["param_norm"])}


def every(step: int, n: int, last: int | None) -> bool:
    """Whether a probe is due at optimizer step ``step`` (every ``n`` steps, once per step, not at 0)."""
    return step > 0 and step != last and step % n == 0
