"""sam-probe: see how SGD, SAM and friends shaped a solution, from its checkpoints.

The Python API (imported lazily, so the CLI starts fast)::

    import sam_probe as sp
    obj = sp.objective("run/step_000400.pt", data="digits")   # loss over the data, from a checkpoint
    sp.top_eigen(obj, k=5)            # certified top-k Hessian eigenpairs (residuals, HVP count)
    sp.hessian_trace(obj)             # Hutch++ / Hutchinson with standard error
    sp.hessian_density(obj)           # stochastic Lanczos quadrature
    sp.sam_sharpness(obj, rho=0.05)   # L(w + e) - L(w)
    sp.ratio_analysis(obj, rho=0.05)  # SAM perturbed/current gradient ratio categories
    sp.alignment(obj, ...)            # chi_k of gradients with the dominant eigenspace
    sp.analyze("sharpness", "run/", top_k=3, data="digits")   # any analysis, as its --json prints it
    sp.analyses.names()               # every declared analysis
    sp.load_results("results/")       # stored results as a pandas DataFrame (one row per result)
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "objective": "api", "analyze": "api", "Objective": "core.objective", "ParamSpace": "core.params",
    "load_checkpoint": "loading.checkpoints", "load_data": "loading.data", "build_model": "loading.models",
    "top_eigen": "core.lanczos", "lanczos": "core.lanczos", "EigenResult": "core.lanczos",
    "hessian_trace": "core.trace", "hutchinson": "core.trace", "hutchpp": "core.trace",
    "hessian_density": "core.density", "slq_density": "core.density",
    "dense_hessian": "core.dense", "dense_eigh": "core.dense",
    "perturbation": "core.perturb", "perturbed_gradient": "core.perturb", "sam_sharpness": "core.perturb",
    "ratio_analysis": "core.ratios", "overlap_analysis": "core.overlap",
    "pack_codes": "core.bitpack", "unpack_codes": "core.bitpack",
    "alignment": "core.alignment", "distance": "core.paths", "interpolate": "core.paths",
    "features": "core.features", "run_pyhessian": "core.pyhessian_backend",
    "curvature_operator": "core.operators", "CurvatureOperator": "core.operators",
    "curvature_trace": "core.trace", "curvature_density": "core.density",
    "per_layer_spectra": "core.per_layer", "subspace_persistence": "core.subspace",
    "subspace_overlap": "core.subspace", "overlap_matrix": "core.subspace",
    "worst_case_sharpness": "core.sharpness_measures", "average_case_sharpness": "core.sharpness_measures",
    "iter_units": "store", "read_unit": "store", "load_results": "frames", "Session": "pipeline.session", "Settings": "settings",
    "AnalysisSession": "pipeline.protocol",
}

_SUBPACKAGES = ("analyses",)  # the registry: sp.analyses.names(), sp.analyses.get("sharpness")

__all__ = ["__version__", *_EXPORTS, *_SUBPACKAGES]


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sam_probe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
