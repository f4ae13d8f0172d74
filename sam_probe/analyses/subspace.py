"""``subspace``: does the dominant eigenspace stop moving?  Top-k eigenspaces of every
checkpoint of a run and their pairwise overlaps (docs/metrics.md, "Subspace overlap")."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.registry import CURVATURE_REGISTRY
from .base import (RUNS, Analysis, Option, basis_where, curvature_options, solver_config, solver_options,
                   warm_start_option)

if TYPE_CHECKING:
    from ..pipeline.protocol import AnalysisSession

ANALYSIS = Analysis(
    name="subspace", version=3, order=45, target=RUNS, shardable=True, unkeyed=("warm_start", "basis_device", "basis_dir"),
    summary="Persistence of the dominant subspace: the certified top-k eigenspace V_t of every checkpoint and "
            "the overlap ||V_s' V_t||_F^2 / k between all pairs, against chance k/P.",
    definitions=(
        ("V_t", "orthonormal top-k eigenvectors of the curvature (--curvature) at step t, certified by residuals"),
        ("overlap", "||V_s' V_t||_F^2 / k: mean squared cosine of the principal angles (1 = same subspace, "
                    "0 = orthogonal)"),
        ("chance", "k / P: the expected overlap of two independent random k-dimensional subspaces"),
        ("with previous", "overlap of each checkpoint's subspace with the previous checkpoint's"),
        ("k_used / gap_warning", "k is taken past a cluster of nearly equal eigenvalues at the boundary (the "
                                 "k-dim eigenspace is not determined there); what stays unresolved is flagged"),
    ),
    json="{steps, k, overlap, chance, eigenvalues, previous, residuals, n_hvp, curvature, k_used, gap, "
         "gap_warning, cluster} "
         "({runs: [...]} for several runs)",
    options=(
        Option("k", 10, ("--k", "-k"), "Dimension of the dominant subspace (top-k eigenvectors)."),
        Option("tol", 1e-3, ("--tol",), "Relative residual ||Av - lambda v|| / |lambda| every pair must reach."),
        Option("max_hvp", None, ("--max-hvp",), "Product budget of each checkpoint's eigen solve.", annotation=int),
        Option("block_size", 1, ("--block-size",), "Lanczos block size: at least the multiplicity of a repeated "
               "eigenvalue finds its whole eigenspace at once."),
        Option("extend_cluster", True, ("--extend-cluster/--no-extend-cluster",), "Take k past a cluster of "
               "nearly equal eigenvalues at the boundary (up to 8 more) so each space is determined; "
               "--no-extend-cluster only flags it."),
        *curvature_options(),
        warm_start_option(),
        *solver_options(),
        Option("save_vectors", True, ("--save-vectors/--no-save-vectors",), "Store every checkpoint's "
               "eigenvectors in the unit (float16, T x P x k x 2 bytes; --no-save-vectors for large models)."),
    ),
    schema={
        "run": "run directory", "paths": "checkpoint files", "steps": "steps", "k": "subspace dimension",
        "overlap": "T x T matrix ||V_s' V_t||_F^2 / k", "chance": "k / P", "previous": "overlap with the "
        "previous checkpoint (null for the first)", "eigenvalues": "top-k eigenvalues per checkpoint",
        "residuals": "their relative residuals", "n_hvp": "products of each checkpoint's solve",
        "n_params": "P", "curvature": CURVATURE_REGISTRY.choices_text(), "warm_start": "solves warm-started",
        "k_requested": "--k", "k_used": "per checkpoint: k, or more when taken past a cluster at the boundary",
        "gap": "per checkpoint: relative gap |lambda_k - lambda_(k+1)| / |lambda_k| at k_used",
        "gap_warning": "per checkpoint: the k_used-dim eigenspace is not determined by the residuals",
        "subspace_bound": "per checkpoint: Davis-Kahan bound on the sine of the angle to the true eigenspace",
        "cluster": "per checkpoint: [lambda_k, lambda_(k+1)] when flagged",
        "eigenvectors": "[T, P, k] float16 (in the store only; not in JSON)",
        "warnings": "why a number is not certified", "seconds": "wall time",
    },
)


def configure(opts: dict[str, Any], settings: Any) -> dict[str, Any]:
    from ..errors import SpecError
    from .base import check_options

    check_options(ANALYSIS, opts)
    if opts["k"] < 1:
        raise SpecError("--k must be >= 1")
    if not opts["tol"] > 0:
        raise SpecError("--tol must be positive")
    if opts["mc_samples"] is not None and opts["mc_samples"] < 1:
        raise SpecError("--mc-samples must be >= 1")
    if opts["block_size"] < 1:
        raise SpecError("--block-size must be >= 1")
    if getattr(settings, "shard_model", False) and opts["curvature"] != "hessian":
        raise SpecError(f"--shard-model with --curvature {opts['curvature']}: a sharded model gives Hessian "
                        "products only; drop --curvature")
    return {"k": opts["k"], "tol": opts["tol"], "max_hvp": opts["max_hvp"], "curvature": opts["curvature"],
            "mc_samples": opts["mc_samples"], "warm_start": opts["warm_start"], "save_vectors": opts["save_vectors"],
            "block_size": opts["block_size"], "extend_cluster": opts["extend_cluster"],
            "seed": settings.seed, **solver_config(opts, settings)}


def compute(cks, session: AnalysisSession, cfg: dict[str, Any]) -> dict[str, Any]:
    """Top-k eigenspaces of every checkpoint (each warm-started from the previous one unless
    ``--no-warm-start``), then the overlap matrix; eigenvectors go to the store as float16."""
    from ..core.operators import curvature_operator
    from ..errors import SpecError

    k = cfg["k"]
    space: list[Any] = []

    def operators():  # built one checkpoint at a time, as the solves consume them
        for ck in cks:
            obj = session.objective(ck)
            if k >= obj.n_params:
                raise SpecError(f"{ck.path}: --k {k} must be below the parameter count {obj.n_params}")
            space[:] = [getattr(obj, "space", None)]
            yield curvature_operator(obj, cfg["curvature"], mc_samples=cfg["mc_samples"], seed=cfg["seed"],
                                     tol=cfg["tol"])

    out = compute_subspace(operators(), [c.step for c in cks], cfg, sharded=bool(session.settings.shard_model),
                           space=space)
    return {"run": str(Path(cks[0].path).parent), "paths": [str(c.path) for c in cks], **out}


def compute_subspace(operators, steps: list, cfg: dict[str, Any], *, sharded: bool = False,
                     space: list | None = None, gather_limit: int | None = None) -> dict[str, Any]:
    """The result of :func:`compute` from the operators of each checkpoint (pure: no files, no terminal).

    ``sharded`` (``--shard-model``): the operators act on shards (every rank calls this alike);
    eigenvectors stay shards, overlaps come from all-reduced Gram matrices, and the stored
    eigenvectors are gathered to rank 0 only when the ``[T, P, k]`` float16 array fits there
    (:func:`~sam_probe.core.sharded_states.fits_on_main`, ``gather_limit`` bytes if given; ``space``
    holds the last objective's :class:`~sam_probe.core.sharded.ShardSpace`, for the layout)."""
    import contextlib

    import numpy as np
    import torch

    from ..core import inner
    from ..core.subspace import subspace_persistence

    k = cfg["k"]
    # checkpoints of different parameter counts: subspace_result refuses to compare them (one-line failure)
    with inner.sharded() if sharded else contextlib.nullcontext():
        res, bases = subspace_persistence(operators, steps, k, tol=cfg["tol"],
                                          max_hvp=cfg["max_hvp"], seed=cfg["seed"], warm_start=cfg["warm_start"],
                                          block_size=cfg.get("block_size", 1),
                                          extend_cluster=8 if cfg.get("extend_cluster", True) else 0,
                                          where=basis_where(cfg))
        vectors = None
        kv = max([k] + [V.shape[1] for V in bases])
        if cfg.get("save_vectors", True):
            from ..core.sharded_states import fits_on_main, gather_full

            nbytes = len(bases) * res.n_params * kv * 2
            if sharded and not fits_on_main(nbytes, gather_limit):
                res.warnings.append(f"eigenvectors not stored: the [T, P, k] float16 array ({nbytes / 2**30:.2f} "
                                    "GiB) does not fit rank 0 (a quarter of its available memory); overlaps are "
                                    "computed on the shards")
            else:
                shapes = space[0].shapes if sharded and space else []
                for t, V in enumerate(bases):
                    full = gather_full(V, shapes) if sharded else V
                    if full is None:  # a rank other than 0: it sent its shard
                        continue
                    if vectors is None:
                        vectors = np.full((len(bases), res.n_params, kv), np.nan, dtype=np.float16)
                    vectors[t, :, :full.shape[1]] = full.to(torch.float16).numpy()
    out = res.to_dict()
    if res.k < k:
        out.setdefault("warnings", []).append(f"only {res.k} of {k} eigenvectors exist at every step; "
                                              f"overlaps use k = {res.k}")
    if not out.get("warnings"):
        out.pop("warnings", None)
    return {**out, "warm_start": cfg["warm_start"], **({"eigenvectors": vectors} if vectors is not None else {})}
