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

from .. import distributed, project_config
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
    verbose: bool = False  # --verbose: also each unit's solver memory plan
    tensorboard: Path | None = None  # --tensorboard DIR: scalars of every result to TensorBoard
    wandb: str | None = None  # --wandb PROJECT: to Weights & Biases
    wandb_offline: bool = False


@dataclass
class Common:
    settings: Settings
    output: Output


def _opt(default: Any, *flags: str, help: str, **kw: Any) -> Any:
    return typer.Option(default, *flags, help=help, rich_help_panel=kw.pop("panel", "Model, data and numerics"), **kw)


def _out_opt(default: Any, *flags: str, help: str, panel: str = "Output", metavar: str | None = None) -> Any:
    return typer.Option(default, *flags, help=help, rich_help_panel=panel, metavar=metavar)


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
    "shard_model": (bool, _opt(False, "--shard-model", help="Shard the model and every vector over the ranks with FSDP2 (fd HVPs).", panel="Scale")),
    "key": (Optional[str], _opt(None, "--key", help="Dotted key of the state dict inside the checkpoint (e.g. ema.model).", panel="Checkpoints")),
    "glob": (Optional[str], _opt(None, "--glob", help="In a run directory, only files matching this pattern.", panel="Checkpoints")),
    "trust_checkpoint": (bool, _opt(False, "--trust-checkpoint", help="DANGEROUS: fully unpickle checkpoints (runs any code they contain). Only for files you made.", panel="Checkpoints")),
    "allow_model": (list[str], _opt([], "--allow-model", help="A pkg.module:factory / file.py:factory that checkpoints may name as their model (repeatable); without it a checkpoint may only name a zoo model.", panel="Checkpoints")),
    "base_model": (Optional[str], _opt(None, "--base-model", help="Base model folder or checkpoint of a PEFT LoRA adapter folder.", panel="Checkpoints")),
    "merge_adapter": (bool, _opt(False, "--merge-adapter", help="With --base-model: analyse W + (alpha/r) B A instead.", panel="Checkpoints")),
    "allow_nonfinite": (bool, _opt(False, "--allow-nonfinite", help="Continue when weights hold NaN/Inf.", panel="Checkpoints")),
    "out": (Path, _out_opt(Path("sam_probe_results"), "--out", "-o", help="Results directory (one HDF5 file per unit).")),
    "run_name": (list[str], _out_opt([], "--run-name", help="Label of the run in tables, figures, the store, CSV and JSON (repeatable: one per run in order, or PATH=NAME). Default: the shortest informative trailing part of its path.")),
    "force": (bool, _out_opt(False, "--force", help="Recompute units that are already stored.")),
    "no_store": (bool, _out_opt(False, "--no-store", help="Do not write results to the store.")),
    "json": (bool, _out_opt(False, "--json", help="Print only the JSON result on stdout.")),
    "quiet": (bool, _out_opt(False, "--quiet", "-q", help="No progress or tables.")),
    "no_plot": (bool, _out_opt(False, "--no-plot", help="Do not write plots.")),
    "debug": (bool, _out_opt(False, "--debug", help="Show tracebacks.")),
    "verbose": (bool, _out_opt(False, "--verbose", help="Say where defaults came from, and each unit's memory plan.")),
    "tensorboard": (Optional[Path], _out_opt(None, "--tensorboard", help="Log every result's scalars to TensorBoard files in DIR.", metavar="DIR")),
    "wandb": (Optional[str], _out_opt(None, "--wandb", help="Log scalars as a W&B run of PROJECT (offline without an API key).", metavar="PROJECT")),
    "wandb_offline": (bool, _out_opt(False, "--wandb-offline", help="Write the W&B run offline (`wandb sync` uploads it later).")),
}
BUILTIN_DEFAULTS = {name: ANALYSIS_OPTIONS[name][1].default for name in project_config.OPTION_OF.values()}


PROJECT_ERROR: list[Exception | None] = [None]  # the project config's error, found when the commands were built


def _project_defaults() -> None:
    """The project config's values as the shown defaults of their options (``--help`` reads them
    here); a config that is not valid is reported when a command runs (:func:`apply_project`)."""
    cfg, PROJECT_ERROR[0] = project_config.safe_find()
    for name, value in cfg.values.items():
        info = ANALYSIS_OPTIONS[name][1]
        info.default = Path(value) if name == "out" else value
        info.show_default = True
        file, _, table = str(cfg.where).partition(" [")  # "PATH" or "PATH [tool.sam-probe]"
        where = Path(file).name + (f" [{table}" if table else "")  # the file's name: a long path would be cut off
        info.help = f"{info.help} Project default from {where} (--verbose: its path).".replace("[", "\\[")


_project_defaults()


def _given(name: str, value: Any) -> bool:
    """Whether option ``name`` was given on the command line (click's parameter source; without a
    click context: whether it differs from the default shown)."""
    import importlib

    for module in ("typer._click.globals", "click.globals"):
        try:
            ctx = importlib.import_module(module).get_current_context(silent=True)
        except (ImportError, AttributeError):
            continue
        if ctx is not None and name in ctx.params:
            src = ctx.get_parameter_source(name)
            return src is not None and src.name not in ("DEFAULT", "DEFAULT_MAP")
    return value != ANALYSIS_OPTIONS[name][1].default


def apply_project(values: dict[str, Any]) -> list[str]:
    """``values`` with the project config's defaults (found from the current directory now) for the
    options not given on the command line; returns where each default came from, in words."""
    cfg = project_config.find()  # a config that is not valid: one line, exit 2
    said = []
    for name in project_config.OPTION_OF.values():
        if name not in values or _given(name, values[name]):
            continue
        flag = "--" + name.replace("_", "-")
        if name in cfg.values:
            values[name] = Path(cfg.values[name]) if name == "out" else cfg.values[name]
            said.append(f"{flag} {values[name]} from the project config {cfg.where}")
        else:
            values[name] = BUILTIN_DEFAULTS[name]
    if not cfg.values:
        said.append("no project config (sam-probe.toml or [tool.sam-probe] in pyproject.toml) found from "
                    "the current directory up to the repository root: built-in defaults")
    return said


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
        base_model=_checked_base(values.get("base_model"), bool(values.get("merge_adapter"))),
        merge_adapter=bool(values.get("merge_adapter")),
    )
    output = Output(json=values["json"], quiet=values["quiet"], debug=values["debug"], plot=not values["no_plot"],
                    tensorboard=values.get("tensorboard"), wandb=values.get("wandb"),
                    wandb_offline=bool(values.get("wandb_offline")), verbose=bool(values.get("verbose")))
    if values.get("wandb_offline") and not values.get("wandb"):
        raise SpecError("--wandb-offline: name the project too (--wandb PROJECT)")
    if not distributed.is_main():  # rank 0 alone prints, plots and logs to trackers
        output = Output(json=False, quiet=True, debug=values["debug"], plot=False)
    return Common(settings, output)


def _checked_base(path: str | None, merge: bool) -> str | None:
    """``--base-model`` exists (said before anything heavy is imported); ``--merge-adapter`` needs it."""
    if path is None:
        if merge:
            raise SpecError("--merge-adapter merges an adapter into its base model: give --base-model DIR too")
        return None
    if not Path(path).expanduser().exists():
        raise SpecError(f"--base-model {path}: no such file or folder; give the base model's save_pretrained folder "
                        "or checkpoint")
    return str(Path(path).expanduser())


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
        said = apply_project(values)
        if values.get("verbose") and distributed.is_main():
            from ..report.console import note_line

            for line in said:
                note_line(line)
        return fn(**kwargs, common=build_common(values))

    wrapper.__signature__ = sig.replace(parameters=own + extra)  # type: ignore[attr-defined]
    return wrapper
