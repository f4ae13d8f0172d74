"""What an analysis is: declared once, as plain data, and found by the registry.

An analysis module in :mod:`sam_probe.analyses` holds one :class:`Analysis`
named ``ANALYSIS`` and the functions it names:

- ``configure(opts, settings) -> config``: checks the analysis's own options
  (a :class:`~sam_probe.errors.SpecError` per problem) and returns the config
  that, with :attr:`Analysis.version`, keys the stored units;
- ``compute(ck, session, config, carry) -> result`` for ``target="checkpoints"``
  (one unit per checkpoint; ``carry`` passes state to the next checkpoint in step
  order), ``compute(cks, session, config) -> result`` for ``target="runs"`` (one
  unit per run), or ``execute(session, targets, config) -> outcomes`` for anything
  else (``interpolate``'s pairs, ``overlap``'s units built on other units).

The command line (``sam-probe NAME``), ``batch``'s command list, ``report``'s
order and the Python API (:func:`sam_probe.analyze`) are all derived from these
declarations.  Nothing here imports torch: ``sam-probe --help`` builds every
command from the declarations alone.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from ..core.names import CURVATURES, VARIANTS
from ..core.registry import CURVATURE_REGISTRY

CHECKPOINTS, RUNS, PAIR = "checkpoints", "runs", "pair"
METRICS_DOC = "docs/metrics.md"


@dataclass(frozen=True)
class Option:
    """One command-line option of an analysis.

    ``name`` is the Python name (``top_k``); ``flags`` the command-line spellings
    (``--top-k``, ``-k``); ``hidden_flags`` are accepted but not shown (old
    spellings kept for scripts). ``view`` options only change what is printed;
    they are not part of the stored unit's key. ``annotation`` defaults to the
    type of ``default`` (give it for ``None`` defaults).
    """

    name: str
    default: Any
    flags: tuple[str, ...]
    help: str
    annotation: Any = None
    hidden_flags: tuple[str, ...] = ()
    view: bool = False
    choices: tuple[str, ...] = ()
    flag_value: Any = None  # the value when the flag is given without one (``--per-layer`` = ``tensor``)

    @property
    def type(self) -> Any:
        if self.annotation is not None:
            return self.annotation
        return type(self.default) if self.default is not None else str

    @property
    def flag(self) -> str:
        """The main long flag, e.g. ``--top-k``."""
        return next(f for f in self.flags if f.startswith("--")).split("/")[0]


@dataclass(frozen=True)
class Analysis:
    """The declaration of one analysis (see the module docstring)."""

    name: str
    version: int  # bump whenever the analysis's numbers change: stored units of older versions are not reused
    order: int  # position in listings (report, batch, --help)
    summary: str  # one line: what it shows
    target: str  # CHECKPOINTS, RUNS or PAIR
    options: tuple[Option, ...]
    schema: dict[str, str]  # result key -> what it holds (the JSON contract)
    definitions: tuple[tuple[str, str], ...] = ()  # (quantity, one-line definition) printed in --help
    json: str = ""  # the JSON printed, in one line (README and --help)
    view: str = ""  # module in sam_probe.report with show() / plot(); default: the analysis name
    module: str = ""  # module with configure/compute/execute; default: sam_probe.analyses.<name>
    view_defaults: dict[str, Any] = field(default_factory=dict)  # view options `report` passes
    unkeyed: tuple[str, ...] = ()  # config entries that change cost, not results (e.g. warm starts): not in unit keys
    shardable: bool = False  # runs with --shard-model (every vector a shard of an FSDP2 model: core/sharded.py)
    streamed: bool = False  # target RUNS: compute gets the checkpoints without their tensors (read them one at a time)

    @property
    def view_module(self) -> str:
        return f"sam_probe.report.{self.view or self.name}"

    @property
    def impl(self) -> Any:
        """The module with ``configure`` and ``compute``/``execute`` (imported on first use)."""
        return importlib.import_module(self.module or f"sam_probe.analyses.{self.name.replace('-', '_')}")

    def view_impl(self) -> Any:
        return importlib.import_module(self.view_module)

    def compute_options(self) -> tuple[Option, ...]:
        return tuple(o for o in self.options if not o.view)

    def help_text(self) -> str:
        """The command's ``--help``: the summary, one line per quantity, where to read more."""
        lines = [self.summary]
        if self.definitions:
            lines.append("")
            lines += [f"{term}: {text}" for term, text in self.definitions]
        if self.json:
            lines += ["", f"JSON: {self.json}"]
        lines += ["", f"Definitions: {METRICS_DOC} in the sam-probe repository."]
        return "\n".join(lines)


# ------------------------------------------------------------ result contracts
UNIT_KEYS = {
    CHECKPOINTS: {"path": "checkpoint file", "step": "training step",
                  "source": "format, layout, prefix and step source", "n_samples": "samples of the data used",
                  "seconds": "wall time of the unit"},
    RUNS: {"sources": "each checkpoint's format, layout, prefix and step source",
           "n_samples": "samples of the data used", "seconds": "wall time of the unit"},
    PAIR: {"sources": "each checkpoint's format, layout, prefix and step source",
           "n_samples": "samples of the data used", "seconds": "wall time of the unit"},
}  # what the unit runner adds to every result of a target kind (sam_probe/pipeline/units.py)
COMMAND_KEYS = {"run": "the run's label (--run-name or a short path suffix)", "run_dir": "the run's directory"}


def declared_keys(analysis: Analysis) -> dict[str, str]:
    """Every key a result of ``analysis`` may hold: its ``schema``, the unit runner's keys for its
    target (:data:`UNIT_KEYS`) and the keys the command adds (:data:`COMMAND_KEYS`)."""
    return {**UNIT_KEYS.get(analysis.target, {}), **COMMAND_KEYS, **analysis.schema}


def schema_of(result_type: Any) -> dict[str, str]:
    """An analysis's ``schema`` from its ``Result`` ``TypedDict``: each key's ``Annotated`` text."""
    from typing import get_type_hints

    hints = get_type_hints(result_type, include_extras=True)
    out = {}
    for key, hint in hints.items():
        meta = getattr(hint, "__metadata__", ())
        if not meta or not isinstance(meta[0], str):
            raise TypeError(f"{result_type.__name__}.{key}: annotate it as Annotated[type, 'what it holds']")
        out[key] = meta[0]
    return out


def json_of(result_type: Any, target: str) -> str:
    """An analysis's one-line JSON (``json``, ``--help`` and the README row) from its ``Result``:
    nested ``TypedDict`` keys spelled ``key{a, b}`` (``key[{a, b}]`` for lists of them)."""
    import typing

    def sketch(t: Any) -> str:
        keys = []
        for key, hint in typing.get_type_hints(t, include_extras=True).items():
            inner = getattr(hint, "__origin__", hint) if hasattr(hint, "__metadata__") else hint
            args = typing.get_args(inner)
            if typing.is_typeddict(inner):
                keys.append(f"{key}{{{sketch(inner)}}}")
            elif typing.get_origin(inner) is list and args and typing.is_typeddict(args[0]):
                keys.append(f"{key}[{{{sketch(args[0])}}}]")
            else:
                keys.append(key)
        return ", ".join(keys)

    body = sketch(result_type)
    if target == CHECKPOINTS:
        return f"results[{{path, step, {body}, seconds}}]"
    return f"{{{body}}}" + (" ({runs: [...]} for several runs)" if target == RUNS else "")


# ------------------------------------------------------------ shared options
def perturbation_options(rho: float = 0.05, rho_help: str = "SAM radius rho of the perturbation.") -> tuple[Option, ...]:
    """The SAM perturbation options every analysis that perturbs declares alike."""
    return (
        Option("rho", rho, ("--rho",), rho_help),
        Option("variant", "l2", ("--variant",), "Perturbation: l2 (rho g/||g||), linf (rho sign g), usam (rho g) "
               "or asam (rho T^2 g/||T g||, T = |w| + eta).", choices=VARIANTS),
        Option("m", None, ("--m-sharpness",), "m-sharpness: perturb each sub-batch of m samples with its own "
               "gradient (sample-weighted mean).", annotation=int, hidden_flags=("--m",)),
        Option("eta", 0.01, ("--eta",), "ASAM's eta in T = |w| + eta."),
    )


def curvature_options() -> tuple[Option, ...]:
    """The curvature operator an eigen solve, trace or density runs on."""
    return (
        Option("curvature", "hessian", ("--curvature",), CURVATURE_REGISTRY.help("Operator:"), choices=CURVATURES),
        Option("mc_samples", None, ("--mc-samples",), "fisher: labels drawn per loss term (seeded by --seed); "
               "default: enough to reach --tol, within a budget (docs/metrics.md, MC Fisher error).", annotation=int),
    )


def warm_started(ck: Any, cfg: dict[str, Any], carry: dict[str, Any], solve: Any) -> dict[str, Any]:
    """``solve(warm)`` for checkpoint ``ck`` of a run: ``warm`` is the previous checkpoint's Ritz
    vectors (``carry["warm"]``, which ``solve`` replaces with its own) under ``--warm-start``, else
    ``None``; a warm-started result records in ``warm_start_from`` the step they came from."""
    out = solve(carry.get("warm") if cfg["warm_start"] else None)
    if out.get("warm_start"):
        out["warm_start_from"] = carry.get("warm_step")
    carry["warm_step"] = ck.step
    return out


BASIS_DEVICES = ("device", "cpu")


def solver_options() -> tuple[Option, ...]:
    """Where the solvers' Krylov bases live (cost and memory only, never the numbers: unkeyed)."""
    return (
        Option("basis_device", "device", ("--basis-device",), "Where Krylov bases live: device (beside the "
               "products) or cpu (host memory, page-locked on CUDA; products stay on the GPU).",
               choices=BASIS_DEVICES),
        Option("basis_dir", None, ("--basis-dir",), "Keep Krylov bases in memory-mapped files in this existing "
               "directory (float32/float64 as the run; removed on exit, also on Ctrl-C; nothing written "
               "elsewhere).", annotation=str),
    )


def solver_config(opts: dict[str, Any], settings: Any = None) -> dict[str, Any]:
    """The checked ``basis_device`` / ``basis_dir`` entries of a config."""
    from pathlib import Path

    from ..errors import SpecError

    out: dict[str, Any] = {"basis_device": opts.get("basis_device") or "device", "basis_dir": None}
    dtype = getattr(settings, "dtype", None)
    if dtype in ("bfloat16", "float16") and opts.get("tol") is not None:  # before any checkpoint is read
        from ..core.precision import check_tol

        check_tol(float(opts["tol"]), dtype)
    if out["basis_device"] not in BASIS_DEVICES:
        raise SpecError(f"--basis-device {out['basis_device']}: choose device or cpu")
    if opts.get("basis_dir"):
        d = Path(str(opts["basis_dir"])).expanduser()
        if not d.is_dir():
            raise SpecError(f"--basis-dir {opts['basis_dir']}: not an existing directory; create it first")
        out["basis_dir"] = str(d.resolve())
    return out


def basis_where(cfg: dict[str, Any]) -> Any:
    """``where`` for the solvers (:mod:`sam_probe.core.vectors`): a directory, ``"cpu"`` or ``None``."""
    if cfg.get("basis_dir"):
        return cfg["basis_dir"]
    return "cpu" if cfg.get("basis_device") == "cpu" else None


def warm_start_option() -> Option:
    return Option("warm_start", True, ("--warm-start/--no-warm-start",),
                  "Start each checkpoint's eigen solve from the previous checkpoint's Ritz vectors (same "
                  "certificates, residuals and order check: cost only).")


def check_choice(value: Any, option: str, choices: tuple[str, ...] | list[str]) -> None:
    from ..errors import SpecError, suggest

    if value not in choices:
        raise SpecError(f"{option} {value}: unknown{suggest(str(value), choices)}; choose one of {', '.join(choices)}")


def check_sharding(analysis: Analysis, settings: Any) -> None:
    """``--shard-model`` only for the analyses that compute on shards (one-line error otherwise)."""
    if getattr(settings, "shard_model", False) and not analysis.shardable:
        from ..errors import SpecError
        from . import all_analyses

        can = ", ".join(a.name for a in all_analyses() if a.shardable)
        raise SpecError(f"--shard-model is available for {can} so far, not {analysis.name}; run {analysis.name} "
                        "without it (data parallel: --distributed or torchrun)")


def check_options(analysis: Analysis, opts: dict[str, Any]) -> None:
    """Every option with ``choices`` holds one of them."""
    for o in analysis.options:
        if o.choices and opts.get(o.name) is not None:
            check_choice(opts[o.name], o.flag, o.choices)
