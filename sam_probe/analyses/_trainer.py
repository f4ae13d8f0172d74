"""What a checkpoint says about the training step it was taken at (shared by ratios and sharpness).

- :func:`step_minibatch`: the samples of the step's own minibatch, for ``ratios --minibatch B``:

  1. ``batch_indices`` saved in the checkpoint's hyper-parameters (a list of sample
     indices into the analysed selection), when it holds ``B`` indices;
  2. the stream ``sam-probe train`` recorded (``hparams.minibatch = {seed, batch_size, n,
     draw}``): draw number ``draw`` of the trainer's seeded epoch permutations
     (:func:`sam_probe.training.draw_at`), when ``batch_size == B`` and the analysed
     selection has the trainer's ``n`` samples (same data, ``--max-samples`` and ``--seed``);
  3. otherwise a seeded draw: the first ``B`` entries of ``randperm(N)`` under
     ``torch.Generator().manual_seed(seed · 1,000,003 + step)`` (``seed`` = ``--seed``).

- :func:`learning_rate`: the step size ``η`` of the checkpoint, from (in this order) the
  user's ``--lr``, an optimizer state saved beside the weights (``param_groups[0]["lr"]``
  of ``optimizer``/``optimizer_state_dict``/``optimizer_states``/``optim``, or
  ``train_state.lr`` of ``sam-probe train``; only in torch files up to 256 MiB, which are
  read a second time for it), the hyper-parameters (``lr``,
  ``learning_rate``), else None.
"""
from __future__ import annotations

from typing import Any

OPTIMIZER_KEYS = ("optimizer_state_dict", "optimizer", "optimizer_states", "optim", "train_state")
HPARAM_LR_KEYS = ("lr", "learning_rate")
SEED_MULT = 1_000_003
MAX_OPTSTATE_BYTES = 256 << 20  # optimizer states are looked for only in files up to 256 MiB (read a second time)


def seeded_draw(n: int, size: int, seed: int, step: int | None):
    """The documented fallback draw (module docstring)."""
    import torch

    g = torch.Generator().manual_seed((int(seed) * SEED_MULT + int(step or 0)) % (2 ** 63))
    return torch.randperm(n, generator=g)[:min(size, n)]


def step_minibatch(ck: Any, n: int, size: int, seed: int, selection: dict[str, Any] | None = None
                   ) -> tuple[Any, dict[str, Any]]:
    """``(indices, description)`` of the step's minibatch of ``size`` samples (module docstring).

    ``selection``: the analysed selection's ``{max_samples, seed}`` (compared with the trainer's)."""
    import torch

    from ..training import draw_at

    hp = ck.hparams or {}
    notes: list[str] = []
    idx = hp.get("batch_indices")
    if isinstance(idx, list) and idx and all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
        if len(idx) == size and all(0 <= i < n for i in idx):
            return torch.tensor(idx, dtype=torch.long), {"size": size, "source": "recorded indices"}
        notes.append(f"the checkpoint's batch_indices ({len(idx)} samples) do not fit --minibatch {size} on "
                     f"{n} samples")
    mb = hp.get("minibatch")
    if isinstance(mb, dict) and all(isinstance(mb.get(k), int) for k in ("seed", "batch_size", "n", "draw")):
        same = mb["n"] == n and mb["batch_size"] == size
        if selection is not None and hp.get("max_samples") is not None:
            same = same and selection.get("max_samples") == hp.get("max_samples") and selection.get("seed") == hp.get("seed")
        if same:
            return draw_at(n, size, mb["seed"], mb["draw"]), {"size": size, "source": "trainer stream",
                                                              "seed": mb["seed"], "draw": mb["draw"]}
        notes.append(f"the trainer's minibatch ({mb['batch_size']} of {mb['n']} samples, --max-samples "
                     f"{hp.get('max_samples')}, --seed {hp.get('seed')}) is not --minibatch {size} of this "
                     f"selection ({n} samples)")
    desc = {"size": min(size, n), "source": "seeded draw", "seed": int(seed), "draw_seed":
            (int(seed) * SEED_MULT + int(ck.step or 0)) % (2 ** 63)}
    if notes:
        desc["note"] = "; ".join(notes) + ": a seeded draw was used instead"
    return seeded_draw(n, size, seed, ck.step), desc


def _lr_in(obj: Any) -> float | None:
    """``param_groups[0]["lr"]`` (or ``lr``) of an optimizer state (a dict, or Lightning's list of them)."""
    if isinstance(obj, list) and obj:
        obj = obj[0]
    if not isinstance(obj, dict):
        return None
    groups = obj.get("param_groups")
    if isinstance(groups, list) and groups and isinstance(groups[0], dict):
        v = groups[0].get("lr")
    else:
        v = obj.get("lr")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else None


def learning_rate(ck: Any, given: float | None = None) -> tuple[float | None, str | None]:
    """``(η, where it came from)``: ``--lr``, ``optimizer state``, ``hyper-parameters`` or ``(None, None)``."""
    import os

    if given is not None:
        return float(given), "--lr"
    keys = " ".join(map(str, ck.extra_keys))
    if str(ck.format).startswith("torch") and ("optim" in keys or "train_state" in keys):
        try:
            if os.path.getsize(ck.path) <= MAX_OPTSTATE_BYTES:
                from ..loading.checkpoints import read_object

                _, obj, _, _ = read_object(ck.path)
                if isinstance(obj, dict):
                    for key in OPTIMIZER_KEYS:
                        v = _lr_in(obj.get(key))
                        if v is not None:
                            return v, f"optimizer state ({key})"
        except Exception:  # noqa: BLE001 - a state we cannot read is simply not used
            pass
    for key in HPARAM_LR_KEYS:
        v = (ck.hparams or {}).get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            return float(v), f"hyper-parameters ({key})"
    return None, None


SAM_OPTIMIZERS = {"sam": "l2", "late-sam": "l2", "usam": "usam"}


def sam_training(ck: Any) -> tuple[str | None, float | None]:
    """``(variant, rho)`` of the SAM update that trained this checkpoint's next step, when the
    hyper-parameters say so (``optimizer`` sam/late-sam after ``switch_step``/usam and ``rho``)."""
    hp = ck.hparams or {}
    opt, rho = hp.get("optimizer"), hp.get("rho")
    if opt not in SAM_OPTIMIZERS or not isinstance(rho, (int, float)) or isinstance(rho, bool) or rho <= 0:
        return None, None
    if opt == "late-sam":
        sw = hp.get("switch_step")
        if not isinstance(sw, int) or ck.step is None or ck.step < sw:
            return None, None
    return SAM_OPTIMIZERS[opt], float(rho)


def eos_fields(ck: Any, session: Any, lr: float | None, result: dict[str, Any]) -> dict[str, Any]:
    """The edge-of-stability keys of a sharpness result (:mod:`sam_probe.core.eos`): ``eta``,
    ``eta_source``, ``eta_lambda_max``, ``lambda_edge`` (2/η) and ``sam_edge`` for SAM-trained checkpoints."""
    from ..core.eos import edge_of_stability

    eta, source = learning_rate(ck, lr)
    ev = result.get("eigenvalues") or []
    lam = ev[0] if ev and result.get("curvature", "hessian") == "hessian" and (result.get("which") or "LA") == "LA" \
        else None
    variant, rho = sam_training(ck)
    gnorm = None
    if eta is not None and variant == "l2":
        import torch

        from ..core import inner

        obj = session.objective(ck)
        with inner.over(obj):  # a model-sharded objective's gradient is this rank's shard
            g = obj.grad_flat()
            gnorm = inner.norm(g.to(torch.float64))
    out = edge_of_stability(eta, lam, sam_rho=rho, sam_variant=variant, grad_norm=gnorm)
    return {"eta": eta, "eta_source": source, **out}
