"""The names core routines accept, in one torch-free place (the command line declares its
choices from these without importing torch).  Curvatures, losses and HVP methods are owned by
their registries (:mod:`sam_probe.core.registry`, with their help texts and docs); the tuples
here are their names."""
from .registry import CURVATURE_REGISTRY, HVP_REGISTRY, LOSS_REGISTRY

VARIANTS = ("l2", "linf", "usam", "asam")  # SAM perturbations (core/perturb.py)
CATEGORIES = ("C1", "C2", "C3", "C4", "boundary", "undefined")  # ratio categories, in code order
STRENGTHS = ("mean-abs", "corr")  # feature strengths (core/features.py)
IMPORTANCES = ("auto", "coef", "column-norm", "saliency")  # feature importances
WHICH = ("LA", "SA", "LM")  # ends of the spectrum (core/lanczos.py)
TRACE_METHODS = ("hutchinson", "hutch++")  # trace estimators (core/trace.py)
CURVATURES = CURVATURE_REGISTRY.names  # curvature operators (core/operators.py)
GROUPINGS = ("tensor", "module")  # per-layer blocks (core/per_layer.py)
HVP_METHODS = HVP_REGISTRY.names  # Hessian-vector products (core/hessian.py)
LOSSES = LOSS_REGISTRY.names  # built-in losses (core/losses.py)
