"""``sam-probe train``: a small honest trainer that writes checkpoints sam-probe can analyse."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from ..errors import SpecError
from ..report import console

OPTIMIZERS = ("sgd", "sam", "asam", "usam", "linf-sam", "late-sam")


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` to a temporary name, fsync, then rename (never a half-written file)."""
    import torch

    from ..atomic import atomic_write

    with atomic_write(path, suffix="") as tmp:
        torch.save(payload, tmp)


def train(
    out: Path = typer.Argument(..., help="Run directory to write checkpoints into."),
    model: str = typer.Option("mlp", "--model", "-m", help="Zoo model or pkg.module:factory / file.py:factory."),
    model_arg: list[str] = typer.Option([], "--model-arg", help="Model keyword argument key=value (repeatable)."),
    data: str = typer.Option("digits", "--data", "-d", help="Data spec (see `sam-probe sharpness --help`)."),
    data_arg: list[str] = typer.Option([], "--data-arg", help="Data option key=value (repeatable)."),
    optimizer: str = typer.Option("sgd", "--optimizer", help=f"One of {', '.join(OPTIMIZERS)}."),
    lr: float = typer.Option(0.1, "--lr"),
    steps: int = typer.Option(200, "--steps"),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Minibatch size (0 = full batch)."),
    momentum: float = typer.Option(0.0, "--momentum"),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    rho: float = typer.Option(0.05, "--rho", help="SAM radius."),
    eta: float = typer.Option(0.01, "--eta", help="ASAM's eta."),
    switch_step: Optional[int] = typer.Option(None, "--switch-step", help="late-sam: step at which SGD switches to SAM."),
    samckpt: Optional[str] = typer.Option(None, "--samckpt", help="Ratio-masked SAM: categories to scale, e.g. 1, 12, 34."),
    condition: float = typer.Option(1.0, "--condition", help="Scale c for the masked categories (update = g~*mask*c + g~*(1-mask))."),
    loss: Optional[str] = typer.Option(None, "--loss", help="ce, mse or bce."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples"),
    checkpoint_every: int = typer.Option(20, "--checkpoint-every", help="Write a checkpoint every N steps (and at 0 and the end)."),
    seed: int = typer.Option(0, "--seed"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Train a zoo model with SGD/SAM variants and write checkpoints every N steps."""
    from ..loading.models import parse_kv

    if optimizer not in OPTIMIZERS:
        from ..errors import suggest
        raise SpecError(f"--optimizer {optimizer}: unknown{suggest(optimizer, OPTIMIZERS)}; choose one of {', '.join(OPTIMIZERS)}")
    written = write_run(out, model=model, model_args=parse_kv(model_arg), data=data, data_args=parse_kv(data_arg),
                        optimizer=optimizer, lr=lr, steps=steps, batch_size=batch_size, momentum=momentum,
                        weight_decay=weight_decay, rho=rho, eta=eta, switch_step=switch_step, samckpt=samckpt,
                        condition=condition, loss=loss, max_samples=max_samples, checkpoint_every=checkpoint_every,
                        seed=seed, log=None if quiet else console.err.print)
    if not quiet:
        console.err.print(f"wrote {len(written)} checkpoints to {out}", highlight=False)


def write_run(out: Path, *, model: str, model_args: dict[str, Any], data: str, data_args: dict[str, Any] | None = None,
              optimizer: str = "sgd", lr: float = 0.1, steps: int = 200, batch_size: int = 64, momentum: float = 0.0,
              weight_decay: float = 0.0, rho: float = 0.05, eta: float = 0.01, switch_step: int | None = None,
              samckpt: str | None = None, condition: float = 1.0, loss: str | None = None,
              max_samples: int | None = None, checkpoint_every: int = 20, seed: int = 0,
              log: Any = None) -> list[Path]:
    """Train and write ``OUT/step_NNNNNN.pt`` checkpoints; returns their paths.

    Each checkpoint holds ``model`` (state dict), ``step``, ``optimizer``,
    ``hparams`` (plain types only, incl. the data spec) and ``model_spec``.
    """
    import torch

    from ..loading.data import load_data
    from ..loading.models import build_model
    from ..training import train as run_training

    data_args = dict(data_args or {})
    selection = load_data(data, split="train", max_samples=max_samples, seed=seed, options=data_args)
    torch.manual_seed(seed)
    net = build_model(model, model_args)
    hparams = {"optimizer": optimizer, "lr": lr, "steps": steps, "batch_size": batch_size, "momentum": momentum,
               "weight_decay": weight_decay, "rho": rho, "eta": eta, "switch_step": switch_step, "samckpt": samckpt,
               "condition": condition, "loss": loss, "seed": seed, "data": data, "data_args": data_args,
               "max_samples": max_samples}
    written: list[Path] = []

    def on_checkpoint(step: int, state_dict: dict[str, Any], metrics: dict[str, Any]) -> None:
        path = Path(out) / f"step_{step:06d}.pt"
        save_checkpoint(path, {"model": state_dict, "step": step, "optimizer": optimizer, "hparams": hparams,
                               "model_spec": {"name": model, "args": model_args}, "metrics": metrics})
        written.append(path)
        if log is not None:
            loss_v = metrics.get("loss")
            log(f"step {step:6d}  loss {loss_v:.4f}  -> {path}" if loss_v is not None else f"step {step} -> {path}",
                highlight=False)

    run_training(net, selection, optimizer=optimizer, lr=lr, steps=steps, batch_size=batch_size, momentum=momentum,
                 weight_decay=weight_decay, rho=rho, eta=eta, switch_step=switch_step, samckpt=samckpt,
                 condition=condition, loss=loss, seed=seed, checkpoint_every=checkpoint_every,
                 on_checkpoint=on_checkpoint)
    return written
