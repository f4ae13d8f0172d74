"""Options shared by the analysis commands, declared once.

``@analysis_options`` adds the model, data, numerics and output options to a
typer command's signature and hands the command a :class:`Common` with a ready
:class:`~sam_probe.settings.Settings`.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from .. import distributed
from ..core.registry import HVP_REGISTRY, LOSS_REGISTRY
from ..errors import SpecError
from ..settings import Settings


@dataclass
class Output:
    """How results are shown: ``json`` (only JSON on stdout), ``quiet``, ``debug``."""

    json: bool = False
    quiet: bool = False
    debug: bool = False
    plot: bool = True


@dataclass
class Common:
    settings: Settings
    output: Output


def _opt(default: Any, *flags: str, help: str, **kw: Any) -> Any:
    return typer.Option(default, *flags, help=help, rich_help_panel=kw.pop("panel", "Model, data and numerics"), **kw)


def _out_opt(default: Any, *flags: str, help: str) -> Any:
    return typer.Option(default, *flags, help=help, rich_help_panel="Output")


# name -> (annotation, typer.Option)
ANALYSIS_OPTIONS: dict[str, tuple[Any, Any]] = {
    "model": (Optional[str], _opt(None, "--model", "-m", help="Zoo model (mlp, cnn, resnet18, wrn-D-W, linear, diag-linear), hf / hf:ClassName (transformers, from the config.json beside the weights), or pkg.module:factory / file.py:factory. Default: the model named in the checkpoint, hf for Hugging Face folders.")),
    "model_arg": (list[str], _opt([], "--model-arg", help="Model keyword argument key=value (repeatable).")),
    "data": (Optional[str], _opt(None, "--data", "-d", help="digits, synthetic-minor-major, FILE.pt/.npz/.h5, cifar10:ROOT, hf:PATH (datasets save_to_disk), torchvision:CLASS:ROOT, or pkg.module:factory / file.py:factory (tensors, Dataset, IterableDataset or DataLoader).")),
    "data_arg": (list[str], _opt([], "--data-arg", help="Data option key=value (repeatable), e.g. d=10.")),
    "split": (str, _opt("train", "--split", help="Data split: train or test.")),
    "max_samples": (Optional[int], _opt(None, "--max-samples", help="Use a seeded random selection of N samples.")),
    "batch_size": (Optional[int], _opt(None, "--batch-size", "-b", help="Chunk size: bounds memory (losses, gradients and HVPs are exact means over the whole selection) and costs time (each HVP runs every chunk: 2.9x unchunked in chunks of 128 on the digits MLP); give it only when the selection does not fit. With --bn-mode train it is the BatchNorm batch and changes results.")),
    "loss": (Optional[str], _opt(None, "--loss", help=LOSS_REGISTRY.help("Loss:")[:-1] + ", or pkg.module:fn / file.py:fn returning one loss per sample. Default: lm for causal LMs, ce for integer targets, mse otherwise.")),
    "hvp": (str, _opt("rev-rev", "--hvp", help=HVP_REGISTRY.help("Hessian-vector products:"))),
    "device": (str, _opt("auto", "--device", help="auto, cpu, cuda or cuda:N.")),
    "dtype": (str, _opt("float32", "--dtype", help="float32 (default: half-precision checkpoints are upcast), float64, or bfloat16/float16: the model runs in half precision, the solvers in float32 (residual tolerances from 2^-5 for bfloat16, 2^-8 for float16; docs/metrics.md).")),
    "bn_mode": (str, _opt("eval", "--bn-mode", help="BatchNorm: eval (running stats) or train (batch stats, running stats never updated).")),
    "seed": (int, _opt(0, "--seed", help="Seed for data selection and random probes.")),
    "max_memory": (Optional[str], _opt(None, "--max-memory", help="Memory budget per process, e.g. 2GB or 512MiB: picks the chunk (unless --batch-size) and vector-block sizes from one probe forward/backward (memory only; results unchanged).", panel="Scale")),
    "distributed": (bool, _opt(False, "--distributed", help="Data parallel over torch.distributed (gloo on CPU, nccl on CUDA); automatic under torchrun. Each rank sums over its shard; rank 0 writes and prints.", panel="Scale")),
    "shard_model": (bool, _opt(False, "--shard-model", help="Shard the model and every parameter-sized vector over the torch.distributed ranks (FSDP2; under torchrun, or a group of one): per-rank memory about (3 + k + c) P / R; Hessian products by finite differences through FSDP's backward (sharpness: top-k, trace, SAM sharpness).", panel="Scale")),
    "key": (Optional[str], _opt(None, "--key", help="Dotted key of the state dict inside the checkpoint (e.g. ema.model).", panel="Checkpoints")),
    "glob": (Optional[str], _opt(None, "--glob", help="In a run directory, only files matching this pattern.", panel="Checkpoints")),
    "trust_checkpoint": (bool, _opt(False, "--trust-checkpoint", help="DANGEROUS: fully unpickle checkpoints (runs any code they contain). Only for files you made.", panel="Checkpoints")),
    "allow_model": (list[str], _opt([], "--allow-model", help="A pkg.module:factory / file.py:factory that checkpoints may name as their model (repeatable); without it a checkpoint may only name a zoo model.", panel="Checkpoints")),
    "allow_nonfinite": (bool, _opt(False, "--allow-nonfinite", help="Continue when weights hold NaN/Inf.", panel="Checkpoints")),
    "out": (Path, _out_opt(Path("sam_probe_results"), "--out", "-o", help="Results directory (one HDF5 file per unit).")),
    "run_name": (list[str], _out_opt([], "--run-name", help="Label of the run in tables, figures, the store, CSV and JSON (repeatable: one per run in order, or PATH=NAME). Default: the shortest informative trailing part of its path.")),
    "force": (bool, _out_opt(False, "--force", help="Recompute units that are already stored.")),
    "no_store": (bool, _out_opt(False, "--no-store", help="Do not write results to the store.")),
    "json": (bool, _out_opt(False, "--json", help="Print only the JSON result on stdout.")),
    "quiet": (bool, _out_opt(False, "--quiet", "-q", help="No progress or tables.")),
    "no_plot": (bool, _out_opt(False, "--no-plot", help="Do not write plots.")),
    "debug": (bool, _out_opt(False, "--debug", help="Show tracebacks.")),
}


def parse_kv(items: list[str]) -> dict[str, Any]:
    from ..loading.kv import parse_kv as _parse

    return _parse(items)


def build_common(values: dict[str, Any]) -> Common:
    settings = Settings(
        model=values["model"], model_args=parse_kv(values["model_arg"]), data=values["data"],
        data_args=parse_kv(values["data_arg"]), split=values["split"], max_samples=values["max_samples"],
        batch_size=values["batch_size"], loss=values["loss"], device=values["device"], dtype=values["dtype"],
        bn_mode=values["bn_mode"], seed=values["seed"], out=values["out"], force=values["force"],
        glob=values["glob"], key=values["key"], trust_checkpoint=values["trust_checkpoint"],
        allow_models=list(values.get("allow_model") or []),
        allow_nonfinite=values["allow_nonfinite"], store=not values["no_store"],
        max_memory=_checked_memory(values.get("max_memory"), values["bn_mode"], values["batch_size"]),
        distributed=bool(values.get("distributed")), shard_model=bool(values.get("shard_model")), hvp=_checked_hvp(values.get("hvp") or "rev-rev"),
        run_names=list(values.get("run_name") or []),
    )
    output = Output(json=values["json"], quiet=values["quiet"], debug=values["debug"], plot=not values["no_plot"])
    if not distributed.is_main():  # rank 0 alone prints and plots
        output = Output(json=False, quiet=True, debug=values["debug"], plot=False)
    return Common(settings, output)


def _checked_hvp(method: str) -> str:
    from ..core.names import HVP_METHODS

    if method not in HVP_METHODS:
        raise SpecError(f"--hvp {method}: choose {HVP_REGISTRY.choices_text()}")
    return method


def _checked_memory(text: str | None, bn_mode: str, batch_size: int | None) -> str | None:
    """``--max-memory`` validated: a size, and not the BatchNorm batch in train mode."""
    if not text:
        return None
    from ..core.memory import parse_memory

    try:
        parse_memory(text)
    except ValueError as exc:
        raise SpecError(f"--max-memory {exc}") from None
    if bn_mode == "train" and not batch_size:
        raise SpecError("--max-memory with --bn-mode train: the chunk is the BatchNorm batch there, so it must not "
                        "depend on memory; pass --batch-size too")
    return text


def analysis_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add :data:`ANALYSIS_OPTIONS` to ``fn``'s signature; ``fn`` receives ``common=Common``."""
    sig = inspect.signature(fn)
    own = [p for p in sig.parameters.values() if p.name != "common"]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann)
             for name, (ann, opt) in ANALYSIS_OPTIONS.items() if name not in sig.parameters]

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in ANALYSIS_OPTIONS if name in kwargs}
        return fn(**kwargs, common=build_common(values))

    wrapper.__signature__ = sig.replace(parameters=own + extra)  # type: ignore[attr-defined]
    return wrapper
