"""``sam-probe train``: a small honest trainer that writes checkpoints sam-probe can analyse.

Fresh runs build the model (``--model``, seeded by ``--seed``, weights times
``--init-scale``); ``--resume CKPT`` continues a checkpoint instead: one written by
``train`` (its model, data, hyper-parameters, minibatch stream and momentum buffer are
taken from it; any option given on the command line replaces the saved one, e.g.
``--optimizer sam`` to switch an SGD run to SAM), or a plain state dict with the
model named by ``--model`` (a fresh minibatch stream seeded by ``--seed``, no momentum
history).  ``--steps`` is the last step of the run, so a resumed run ends where an
uninterrupted one would, bit for bit.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from ..errors import SpecError
from ..report import console

OPTIMIZERS = ("sgd", "sam", "asam", "usam", "linf-sam", "late-sam")

# the trainer's defaults (options left open on the command line take a resumed checkpoint's value, else these)
DEFAULTS: dict[str, Any] = {
    "model": "mlp", "data": "digits", "optimizer": "sgd", "lr": 0.1, "steps": 200, "batch_size": 64,
    "momentum": 0.0, "weight_decay": 0.0, "rho": 0.05, "eta": 0.01, "switch_step": None, "samckpt": None,
    "condition": None, "random_mask": False, "project": None, "k": 10, "eigen_every": 10, "eigen_tol": 1e-3,
    "loss": None, "max_samples": None, "seed": 0, "init_scale": 1.0,
}
# hyper-parameters a resumed checkpoint passes on (unless given again); saved under HP_NAME where the
# option's name could be mistaken for a model factory's argument (saved hyper-parameters fill those)
HP_NAME = {"k": "project_k"}
INHERITED = ("optimizer", "lr", "steps", "batch_size", "momentum", "weight_decay", "rho", "eta", "switch_step",
             "samckpt", "condition", "random_mask", "project", "k", "eigen_every", "eigen_tol", "loss", "max_samples",
             "seed")


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` to a temporary name, fsync, then rename (never a half-written file)."""
    import torch

    from ..atomic import atomic_write

    with atomic_write(path, suffix="") as tmp:
        torch.save(payload, tmp)


def train(
    out: Path = typer.Argument(..., help="Run directory to write checkpoints into."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Zoo model or pkg.module:factory / "
                                        "file.py:factory (default mlp; with --resume: the checkpoint's)."),
    model_arg: list[str] = typer.Option([], "--model-arg", help="Model keyword argument key=value (repeatable)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Data spec (see `sam-probe sharpness --help`; "
                                       "default digits; with --resume: the checkpoint's)."),
    data_arg: list[str] = typer.Option([], "--data-arg", help="Data option key=value (repeatable)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue this checkpoint (written by train, or "
                                          "a plain state dict with --model): options left open keep its values."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help=f"One of {', '.join(OPTIMIZERS)} "
                                            "(default sgd; with --resume switches the optimizer)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (default 0.1)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Last step of the run (default 200; a resumed run "
                                        "continues up to it)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Minibatch size (0 = full batch; "
                                             "default 64)."),
    momentum: Optional[float] = typer.Option(None, "--momentum", help="Heavy-ball momentum (default 0)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="L2 weight decay (default 0)."),
    rho: Optional[float] = typer.Option(None, "--rho", help="SAM radius (default 0.05)."),
    eta: Optional[float] = typer.Option(None, "--eta", help="ASAM's eta (default 0.01)."),
    switch_step: Optional[int] = typer.Option(None, "--switch-step", help="late-sam: step at which SGD switches to SAM."),
    samckpt: Optional[str] = typer.Option(None, "--samckpt", help="Ratio-masked SAM (the notebook's SAMECKPT): "
                                          "categories of r = g~/g, e.g. 1, 12, 234; the update is g~ on them and g "
                                          "elsewhere, or with --condition c: g~*c on them and g~ elsewhere."),
    condition: Optional[float] = typer.Option(None, "--condition", help="Scale c of the masked categories "
                                              "(update = g~*mask*c + g~*(1-mask))."),
    random_mask: Optional[bool] = typer.Option(None, "--random-mask/--category-mask", help="Control: a uniformly "
                                               "random mask of the same size as the category mask, every step."),
    project: Optional[str] = typer.Option(None, "--project", help="dom or bulk: project every update on the top-k "
                                          "Hessian eigenspace of the training loss, or on its complement (Song et "
                                          "al.'s Dom-SGD / Bulk-SGD)."),
    k: Optional[int] = typer.Option(None, "--k", help="--project: dimension of the dominant space (default 10)."),
    eigen_every: Optional[int] = typer.Option(None, "--eigen-every", help="--project: recompute the certified "
                                              "eigenvectors every N steps (default 10)."),
    eigen_tol: Optional[float] = typer.Option(None, "--eigen-tol", help="--project: relative residual every "
                                              "eigenpair must reach (default 1e-3)."),
    init_scale: Optional[float] = typer.Option(None, "--init-scale", help="Multiply the starting weights "
                                               "(parameters, not buffers) by this factor (default 1)."),
    loss: Optional[str] = typer.Option(None, "--loss", help="ce, mse or bce."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples"),
    checkpoint_every: int = typer.Option(20, "--checkpoint-every", help="Write a checkpoint every N steps (and at "
                                         "the first and last step)."),
    checkpoint_steps: Optional[str] = typer.Option(None, "--checkpoint-steps", help="Dense windows instead of "
                                                   "--checkpoint-every: START:STOP:EVERY or single steps, comma-"
                                                   "separated, e.g. 0:50:1,50:400:10."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Init and minibatch order (default 0)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Train a model with SGD/SAM variants (or continue a checkpoint) and write checkpoints."""
    from ..loading.models import parse_kv

    if optimizer is not None and optimizer not in OPTIMIZERS:
        from ..errors import suggest
        raise SpecError(f"--optimizer {optimizer}: unknown{suggest(optimizer, OPTIMIZERS)}; choose one of {', '.join(OPTIMIZERS)}")
    given: dict[str, Any] = {"optimizer": optimizer, "lr": lr, "steps": steps, "batch_size": batch_size, "momentum": momentum,
             "weight_decay": weight_decay, "rho": rho, "eta": eta, "switch_step": switch_step, "samckpt": samckpt,
             "condition": condition, "random_mask": random_mask, "project": project, "k": k,
             "eigen_every": eigen_every, "eigen_tol": eigen_tol, "loss": loss, "max_samples": max_samples,
             "seed": seed, "init_scale": init_scale}
    given = {key: v for key, v in given.items() if v is not None}
    log = None if quiet else console.err.print
    if resume is not None:
        written = resume_run(out, resume, model=model, model_args=parse_kv(model_arg), data=data,
                             data_args=parse_kv(data_arg) if data_arg else None, checkpoint_every=checkpoint_every,
                             checkpoint_steps=checkpoint_steps, log=log, **given)
    else:
        written = write_run(out, model=model or DEFAULTS["model"], model_args=parse_kv(model_arg),
                            data=data or DEFAULTS["data"], data_args=parse_kv(data_arg),
                            checkpoint_every=checkpoint_every, checkpoint_steps=checkpoint_steps, log=log, **given)
    if not quiet:
        console.err.print(f"wrote {len(written)} checkpoints to {out}", highlight=False)


def write_run(out: Path, *, model: str, model_args: dict[str, Any], data: str, data_args: dict[str, Any] | None = None,
              checkpoint_every: int = 20, checkpoint_steps: str | None = None, log: Any = None,
              start: Any = None, weights: dict[str, Any] | None = None, resumed_from: str | None = None,
              **options: Any) -> list[Path]:
    """Train and write ``OUT/step_NNNNNN.pt`` checkpoints; returns their paths.

    ``options``: the trainer's options (:data:`DEFAULTS` fill the rest).  Each checkpoint
    holds ``model`` (state dict), ``step``, ``optimizer``, ``hparams`` (plain types only,
    incl. the data spec and ``minibatch``: the seed, size, selection size and draw number
    of the minibatch the step from this checkpoint uses), ``model_spec``, ``metrics`` and
    ``train_state`` (``draws``, ``momentum_buffer``, ``lr``: what ``--resume`` needs).
    ``start``/``weights``: a resumed run's :class:`~sam_probe.training.TrainState` and
    state dict (:func:`resume_run`).
    """
    import torch

    from ..loading.data import load_data
    from ..loading.models import build_model
    from ..training import TrainState, parse_checkpoint_steps
    from ..training import train as run_training

    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown training options {sorted(unknown)}")
    o = {**DEFAULTS, **options}
    data_args = dict(data_args or {})
    selection = load_data(data, split="train", max_samples=o["max_samples"], seed=o["seed"], options=data_args)
    torch.manual_seed(o["seed"])
    net = build_model(model, model_args)
    if weights is not None:  # matched by resume_run: every parameter is there; optional buffers may be absent
        missing = [n for n, _ in net.named_parameters() if n not in weights]
        if missing:
            raise SpecError(f"--resume: the checkpoint lacks parameters {missing[:5]}")
        net.load_state_dict(weights, strict=False)
    if o["init_scale"] != 1.0:
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(o["init_scale"])
    wanted = parse_checkpoint_steps(checkpoint_steps, o["steps"])
    hparams = {HP_NAME.get(key, key): o[key] for key in DEFAULTS if key not in ("model", "data")}
    hparams.update(data=data, data_args=data_args, n_train=len(selection))
    if checkpoint_steps:
        hparams["checkpoint_steps"] = str(checkpoint_steps)
    if resumed_from is not None:
        hparams.update(resumed_from=str(resumed_from), start_step=int(start.step))
    written: list[Path] = []
    state = TrainState()
    bs = o["batch_size"]

    def on_checkpoint(step: int, state_dict: dict[str, Any], metrics: dict[str, Any]) -> None:
        path = Path(out) / f"step_{step:06d}.pt"
        buf = state.momentum_buffer
        hp = {**hparams, "minibatch": {"seed": o["seed"], "batch_size": bs, "n": len(selection), "draw": state.draws}}
        save_checkpoint(path, {"model": state_dict, "step": step, "optimizer": o["optimizer"], "hparams": hp,
                               "model_spec": {"name": model, "args": model_args}, "metrics": metrics,
                               "train_state": {"draws": state.draws, "lr": o["lr"],
                                               "momentum_buffer": None if buf is None else buf.detach().cpu().clone()}})
        written.append(path)
        if log is not None:
            loss_v = metrics.get("loss")
            log(f"step {step:6d}  loss {loss_v:.4f}  -> {path}" if loss_v is not None else f"step {step} -> {path}",
                highlight=False)

    train_kw = {key: o[key] for key in ("optimizer", "lr", "steps", "batch_size", "momentum", "weight_decay", "rho",
                                        "eta", "switch_step", "samckpt", "condition", "random_mask", "project", "k",
                                        "eigen_every", "eigen_tol", "loss", "seed")}
    run_training(net, selection, **train_kw, checkpoint_every=checkpoint_every, checkpoint_steps=wanted,
                 start=start, state=state, on_checkpoint=on_checkpoint)
    return written


def resume_run(out: Path, ckpt: Path, *, model: str | None, model_args: dict[str, Any], data: str | None,
               data_args: dict[str, Any] | None, checkpoint_every: int = 20, checkpoint_steps: str | None = None,
               log: Any = None, **given: Any) -> list[Path]:
    """Continue ``ckpt`` (module docstring): what the checkpoint saved, unless given again."""
    import torch

    from ..loading.checkpoints import load_checkpoint, read_object
    from ..loading.data import is_builtin_data
    from ..loading.matching import match_state
    from ..loading.models import build_model, is_builtin_model
    from ..training import TrainState

    ck = load_checkpoint(ckpt)
    bad = ck.nonfinite()
    if bad:
        raise SpecError(f"{ckpt}: non-finite weights in {', '.join(list(bad)[:4])}; cannot continue this checkpoint")
    saved_spec = ck.model_spec or {}
    if model is None:
        model = saved_spec.get("name")
        if not model:
            raise SpecError(f"{ckpt}: the checkpoint does not name its model; pass --model (and --model-arg)")
        if not is_builtin_model(str(model)):
            raise SpecError(f"{ckpt}: the checkpoint names its model {str(model)[:80]!r}, not a built-in one; "
                            "sam-probe never runs code named inside a checkpoint: pass --model yourself")
        saved_args = saved_spec.get("args") or {}
        model_args = {**(saved_args if isinstance(saved_args, dict) else {}), **model_args}
    saved = {HP_NAME.get(key, key): key for key in INHERITED}
    from_train = ck.hparams.get("optimizer") in OPTIMIZERS and isinstance(ck.hparams.get("data"), str)
    hp = {key: ck.hparams[name] for name, key in saved.items() if name in ck.hparams} if from_train else {}
    if data is None:
        data = ck.hparams.get("data") if from_train else None
        if not isinstance(data, str) or not is_builtin_data(data):
            raise SpecError(f"{ckpt}: pass --data (the checkpoint names no built-in data)")
    if data_args is None:
        saved_args = ck.hparams.get("data_args") if from_train and data == ck.hparams.get("data") else None
        data_args = dict(saved_args) if isinstance(saved_args, dict) else {}
    options = dict(hp)
    options.update(given)
    # a switch of optimizer drops the old one's masking/switch settings unless given again
    if "optimizer" in given and given["optimizer"] != hp.get("optimizer"):
        for key in ("switch_step", "samckpt", "condition", "random_mask"):
            if key not in given:
                options.pop(key, None)
    options.setdefault("init_scale", 1.0)
    probe = build_model(model, model_args)
    matched = match_state(probe, ck.state, ck.stripped_prefixes)
    weights = {**matched.params, **matched.buffers}
    weights = {n: t for n, t in weights.items() if n in probe.state_dict()}
    step = int(ck.step or 0)
    draws, buf = 0, None  # a plain state dict, or another stream: a fresh stream seeded by --seed
    mb: dict[str, Any] = ck.hparams["minibatch"] if isinstance(ck.hparams.get("minibatch"), dict) else {}
    full = {**DEFAULTS, **options}
    same_stream = from_train and all(hp.get(key, DEFAULTS[key]) == full[key] for key in ("seed", "batch_size",
                                                                                         "max_samples")) \
        and data == ck.hparams.get("data") and data_args == (ck.hparams.get("data_args") or {})
    if same_stream:
        draws = int(mb["draw"]) if isinstance(mb.get("draw"), int) else step  # older train checkpoints: draw = step
        _, obj, _, _ = read_object(ckpt)
        ts = obj.get("train_state") if isinstance(obj, dict) else None
        b = ts.get("momentum_buffer") if isinstance(ts, dict) else None
        if isinstance(b, torch.Tensor) and b.numel() == sum(p.numel() for p in probe.parameters()):
            buf = b.detach().clone()
    start = TrainState(step=step, draws=draws, momentum_buffer=buf)
    if log is not None:
        log(f"resuming {ckpt} at step {step} ({'same minibatch stream' if same_stream else 'new minibatch stream'}"
            f"{', momentum buffer restored' if buf is not None else ''})", highlight=False)
    return write_run(out, model=model, model_args=model_args, data=data, data_args=data_args,
                     checkpoint_every=checkpoint_every, checkpoint_steps=checkpoint_steps, log=log, start=start,
                     weights=weights, resumed_from=str(ckpt), **options)
