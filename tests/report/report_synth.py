"""Synthetic result dicts of every analysis, shaped as the store gives them back to ``report``."""
from __future__ import annotations

import math

MLP = {"name": "mlp", "args": {"in_dim": 64, "hidden": [64, 64], "out_dim": 10}}
CNN = {"name": "cnn", "args": {"width": 8}}
DATA = {"data": "digits", "data_args": {}, "split": "train", "max_samples": 500, "seed": 0}


def meta(analysis: str, config: dict, model: dict | None = MLP, **kw) -> dict:
    return {"analysis": analysis, "config": config, "data_spec": DATA, "model_spec": model, "dtype": "float32",
            "bn_mode": "eval", "sam_probe_version": "0.1.0", "torch_version": "2.13.0", "host": "h",
            "command": ["sam-probe", analysis], "sha256": "0" * 64, "checkpoint": "x.pt", **kw}


def source(step_source: str = "content:step", **hparams) -> dict:
    return {"format": "torch-zip", "layout": "key:model", "prefix": "module.", "step_source": step_source,
            "hparams": hparams}


SHARP_CFG = {"top_k": 3, "tol": 1e-3, "which": "LA", "trace": True, "trace_method": "hutch++", "trace_tol": 0.05,
             "density": True, "density_steps": 20, "density_probes": 2, "rho": 0.05, "variant": "l2",
             "backend": "lanczos", "seed": 0}


def sharpness(run: str = "/runs/mlp-late-sam", model: dict = MLP, n_params: int = 8970, steps=range(0, 250, 50),
              switch: int | None = 100, scale: float = 1.0, cfg: dict | None = None, step_source="content:step"):
    out = []
    for s in steps:
        lam = scale * (1 + s / 100)
        hp = {"optimizer": "late-sam", "switch_step": switch} if switch is not None else {"optimizer": "sgd"}
        out.append({
            "path": f"{run}/step_{s:06d}.pt", "step": s, "loss": 2.0 / (1 + s), "accuracy": 0.5 + s / 1000,
            "eigenvalues": [lam, lam / 2, lam / 3], "residuals": [1e-4, 2e-4, 5e-4], "n_hvp": 20,
            "trace": 10 * lam, "trace_se": 0.5, "sam_sharpness": 0.01 * lam, "n_params": n_params, "seconds": 0.1,
            "density": {"grid": [i / 10 for i in range(-5, 40)],
                        "density": [math.exp(-((i / 10) ** 2) * 40) + 1e-19 for i in range(-5, 40)], "sigma": 0.02},
            "per_layer": [{"name": f"layers.{j}.weight", "top_eigenvalue": lam / (j + 1), "residual": 1e-4,
                           "trace": 3 * lam / (j + 1), "trace_se": 0.1, "n_params": 1000 * (j + 1)}
                          for j in range(3)],
            "source": source(step_source, **hp),
            "_meta": meta("sharpness", cfg or SHARP_CFG, model, step=s),
        })
    return out


RATIO_CFG = {"rho": 0.05, "variant": "l2", "m": None, "faithful": False, "edges": [1.2, 1.5, 2.0]}


def ratios(run: str = "/runs/mlp-sam", steps=range(0, 250, 50)):
    out = []
    for s in steps:
        c1 = 0.5 + s / 1000
        fr = {"C1": c1, "C2": 0.9 - c1, "C3": 0.04, "C4": 0.03, "boundary": 0.0, "undefined": 0.03}
        out.append({"path": f"{run}/step_{s:06d}.pt", "step": s, "rho": 0.05, "variant": "l2", "n_params": 1000,
                    "grad_norm": 1.0, "perturbed_grad_norm": 1.1, "fractions": fr,
                    "counts": {k: int(1000 * v) for k, v in fr.items()},
                    "buckets": [{"lo": lo, "hi": hi, "count": 100} for lo, hi in ((1, 1.2), (1.2, 1.5), (1.5, 2.0),
                                                                                   (2.0, None))],
                    "magnitude_split": {"share": 0.6, "lift": 1.1},
                    "_meta": meta("ratios", RATIO_CFG, step=s)})
    return out


def overlap(run: str = "/runs/mlp-sam", n: int = 60):
    steps = list(range(0, 4 * n, 4))  # many checkpoints: the Jaccard tick labels must be thinned
    sizes = [500 + (i % 7) for i in range(n)]
    core = [max(500 - 60 * i, 0) for i in range(n)]  # the persistent core empties: zeros on a log axis
    return [{"run": run, "category": "C1", "n_params": 1000, "steps": steps, "sizes": sizes,
             "fractions": [s / 1000 for s in sizes],
             "anchor": {"step": 8, "overlap": [300] * n, "expected": [250] * n, "lift": [1.2] * n},
             "persistent": {"size": core, "expected": [c / 2 for c in core], "lift": [2.0] * n},
             "ire": {"overlap": [40] * n, "expected": [50] * n, "lift": [0.8] * n, "rank": 0.9},
             "jaccard": [[1.0 if i == j else 0.5 for j in range(n)] for i in range(n)],
             "_meta": meta("overlap", {**RATIO_CFG, "category": "C1", "anchor": 8, "ire_rank": 0.9})}]


def alignment(run: str = "/runs/mlp-sgd", steps=range(0, 250, 50)):
    return [{"path": f"{run}/step_{s:06d}.pt", "step": s, "k": 10, "n_params": 8970, "eta": 0.1, "rho": 0.05,
             "variant": "l2", "eigenvalues": [2.0] * 10,
             "chi": {"full": 0.5, "minibatch": 0.4, "sam": 0.7, "update": 0.2},
             "dL": {"dom": -1e-3, "bulk": -2e-3 / (1 + s), "full": -3e-3 if s else 0.0},
             "dL_pred": {"dom": -1.1e-3, "bulk": -2e-3 / (1 + s), "full": -3e-3},
             "eta_star": 1.0, "eta_lambda_max": 0.2,
             "_meta": meta("alignment", {"k": 10, "rho": 0.05, "variant": "l2", "eta": 0.1, "minibatch_size": 128},
                           step=s)} for s in steps]


def distance(run: str = "/runs/mlp-late-sam", model: dict = MLP, switch: int | None = 100):
    steps = list(range(0, 250, 50))
    d = [3.0, 1.5, 0.0, 0.4, 0.9]  # the reference (step 100) is at distance 0
    hp = {"optimizer": "late-sam", "switch_step": switch} if switch is not None else {}
    return [{"run": run, "steps": steps, "distance": d, "relative": [x / 10 for x in d], "ref_step": 100,
             "escape_rate": 0.01, "escape_by": "step", "escape_steps": [150, 200],
             "sources": [source(**hp) for _ in steps],
             "_meta": meta("distance", {"ref": "100"}, model)}]


def interpolate(a: str = "/runs/mlp-late-sam/step_000100.pt", b: str = "/runs/mlp-late-sam/step_000200.pt"):
    alphas = [-0.2 + 0.05 * i for i in range(29)]
    return [{"a": a, "b": b, "step_a": 100, "step_b": 200, "alphas": alphas,
             "loss": [0.1 + 0.05 * (x - 0.5) ** 2 for x in alphas], "accuracy": [0.9] * len(alphas),
             "loss_a": 0.1125, "loss_b": 0.1125, "barrier": 0.0, "barrier_alpha": 0.0,
             "_meta": meta("interpolate", {"points": 29, "range": [-0.2, 1.2]})}]


def features(run: str = "/runs/diag-sam", image: bool = False):
    d = 16 if image else 10
    steps = [0, 100, 200]
    imp = [[1.0 / (j + 1 + t) for j in range(d)] for t in range(3)]
    out = {"run": run, "method": "coef", "strength_method": "mean-abs", "minor_fraction": 0.5,
           "strength": [2.0 ** -j for j in range(d)], "importance": imp,
           "results": [{"step": s, "minor_mass": 0.3, "dominant_index": 0, "dominant_strength_rank": 0,
                        "spearman_growth_strength": -0.2} for s in steps],
           "_meta": meta("features", {"strength": "mean-abs", "importance": "auto", "minor_fraction": 0.5})}
    if image:
        out["image_shape"] = [4, 4]
        for row in out["results"]:
            row["background_mass"] = 0.1
    return [out]


def subspace(run: str = "/runs/mlp-sgd", n: int = 6):
    steps = list(range(0, 50 * n, 50))
    return [{"run": run, "steps": steps, "k": 5, "chance": 5 / 8970,
             "overlap": [[1.0 if i == j else 0.9 ** abs(i - j) for j in range(n)] for i in range(n)],
             "eigenvalues": [[3.0 - 0.1 * i - 0.2 * j for j in range(5)] for i in range(n)],
             "_meta": meta("subspace", {"k": 5})}]
