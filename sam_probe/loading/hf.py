"""Hugging Face models: the ``transformers`` model a ``config.json`` describes, built safely.

The folders themselves (``save_pretrained`` folders, Trainer runs) are checkpoint
sources: :mod:`.sources.hf_folder` and :mod:`.sources.trainer_run`.

The model (``--model hf``, or automatically for folders) is built from
``config.json`` with ``transformers``: class from ``config.architectures``
(``--model hf:ClassName`` overrides), ``--model-arg key=value`` overriding config
fields (``attn_implementation=eager`` chooses the attention code).  Only classes
defined by ``transformers`` itself are used: ``auto_map`` / remote code is never
run, and nothing is downloaded (``HF_HUB_OFFLINE`` and ``TRANSFORMERS_OFFLINE``
are forced on).  A file may not choose code: implementation selectors
(``attn_implementation``, ``experts_implementation``, their ``_..._internal``
forms, ``quantization_config``, at any depth) are dropped from ``config.json``
and from a checkpoint's saved model arguments; only ``--model-arg`` sets them.
Sizes are bounded before anything is allocated: label maps of at most
``MAX_LABELS`` entries, counts of repeated parts (``*_layers``, ``*_heads``,
``*_experts``, ...) at most :attr:`.bounded_build.Budget.max_count`, and the
architecture is first built on the meta device within the weights' budget
(:mod:`.bounded_build`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, SpecError
from .bounded_build import SIZE_SLACK, Budget, TooLarge, meta_build  # noqa: F401 - SIZE_SLACK re-exported
from .files import display, printable, read_json

CONFIG = "config.json"
MAX_CONFIG = 16 * 2**20  # bytes of config.json
MAX_LABELS = 2**15  # id2label / label2id entries and num_labels (ImageNet-21k has 21,843)
_COUNT_RE = re.compile(r"(?:^|_)(?:layers?|heads?|experts?|blocks?|stages?)$", re.IGNORECASE)


def config_path(path: str | Path) -> Path | None:
    """``config.json`` of a folder checkpoint or beside a weight file, if anything by that name is there (a
    FIFO or device by that name is then refused when read, never ignored)."""
    p = Path(path)
    c = p / CONFIG if p.is_dir() else p.parent / CONFIG
    return c if os.path.lexists(c) else None


def read_config(path: Path) -> dict[str, Any]:
    """``config.json`` as a JSON object (a regular file of at most ``MAX_CONFIG`` bytes)."""
    return read_json(path, CONFIG, MAX_CONFIG)


# ------------------------------------------------------------------- models
def is_hf_spec(name: str | None) -> bool:
    return bool(name) and (name == "hf" or name.startswith("hf:"))


def _transformers():
    os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the network, whatever the environment says
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True  # read at its import: an earlier import may have seen other values
    except ImportError:
        pass
    try:
        import transformers
    except ImportError:
        raise SpecError("--model hf needs transformers: pip install 'sam-probe[hf]' "
                        "(or pip install torch==<your torch> transformers)") from None
    transformers.logging.set_verbosity_error()  # its advice lines would interleave with ours
    return transformers


def _check_sizes(cfg_file: Path, raw: Any, budget: Budget, depth: int = 0) -> None:
    """Refuse label maps and counts of repeated parts that no weights of this size can match (module docstring)."""
    if not isinstance(raw, dict) or depth > 8:
        return
    for k, v in raw.items():
        where = f"{display(cfg_file)}: {k}"
        if k in ("id2label", "label2id") and isinstance(v, (dict, list)) and len(v) > MAX_LABELS:
            raise CheckpointError(f"{where} has {len(v):,} entries, more than the {MAX_LABELS:,} sam-probe reads; "
                                  "config and weights do not belong together")
        if isinstance(v, int) and not isinstance(v, bool):
            if k == "num_labels" and not 0 <= v <= MAX_LABELS:
                raise CheckpointError(f"{where} = {v:,} is outside 0..{MAX_LABELS:,}; config and weights do not "
                                      "belong together")
            if isinstance(k, str) and _COUNT_RE.search(k) and not 0 <= v <= budget.max_count:
                raise CheckpointError(f"{where} = {v:,} cannot match weights of {budget.tensors:,} tensors (at most "
                                      f"{budget.max_count:,}); config and weights do not belong together")
        elif isinstance(v, dict):
            _check_sizes(cfg_file, v, budget, depth + 1)


def build_model(path: str | Path, spec: str = "hf", args: dict[str, Any] | None = None,
                expected_numel: int | None = None, budget: Budget | None = None):
    """The ``transformers`` model described by the ``config.json`` of ``path`` (module docstring).

    ``budget`` (or only ``expected_numel``): what the weights hold; the architecture must fit it
    (:mod:`.bounded_build`) before it is built for real.  ``args`` are the user's (and the plain
    arguments a checkpoint saved, selectors already dropped): they may choose implementations."""
    from .state import without_selectors

    tf = _transformers()
    cfg_file = config_path(path)
    if cfg_file is None:
        raise SpecError(f"--model hf: no config.json beside {display(path)}; give the save_pretrained folder "
                        "(config.json + weights) or use --model pkg.module:factory")
    raw = without_selectors(read_config(cfg_file))[0]
    if budget is None and expected_numel is not None:
        budget = Budget.from_numel(expected_numel)
    if budget is not None:
        _check_sizes(cfg_file, raw, budget)
    args = dict(args or {})
    attn = args.pop("attn_implementation", None)
    name = spec.partition(":")[2] or None
    archs = raw.get("architectures")
    if name is None:
        if not (isinstance(archs, list) and archs and isinstance(archs[0], str)):
            raise SpecError(f"{display(cfg_file)}: no 'architectures' entry; name the class with --model "
                            "hf:ClassName (e.g. hf:BertForSequenceClassification)")
        name = archs[0]
    cls = getattr(tf, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, tf.PreTrainedModel)):
        hint = " (custom code via auto_map is never run; use --model pkg.module:factory)" if raw.get("auto_map") else ""
        raise SpecError(f"--model hf: {name[:80]!r} is not a transformers model class{hint}; "
                        "use --model hf:ClassName with a class from transformers")
    model_type = raw.get("model_type")
    mapping = tf.CONFIG_MAPPING
    if not isinstance(model_type, str) or model_type not in mapping:
        raise SpecError(f"{display(cfg_file)}: unknown model_type {str(model_type)[:80]!r} for this transformers "
                        f"{tf.__version__}; upgrade transformers or use --model pkg.module:factory")
    fields = {k: v for k, v in raw.items() if k not in ("auto_map", "_name_or_path")}
    fields.update(args)
    fields["use_cache"] = False  # no key/value cache: one forward per chunk, nothing kept

    def config():
        try:
            return mapping[model_type].from_dict(dict(fields))
        except Exception as exc:  # noqa: BLE001 - a bad config is the user's input
            raise SpecError(f"{display(cfg_file)}: cannot build the config ({type(exc).__name__}: "
                            f"{printable(str(exc))[:160]})") from None

    kw = {"attn_implementation": attn} if attn else {}
    try:
        if budget is not None:
            try:
                meta_build(lambda: cls._from_config(config(), **kw), budget)
            except TooLarge as exc:
                raise CheckpointError(f"{display(cfg_file)}: describes {exc} but the weights hold {budget.numel:,} "
                                      f"parameters in {budget.tensors:,} tensors; config and weights do not belong "
                                      "together") from None
        model = cls._from_config(config(), **kw)
    except (SpecError, CheckpointError):
        raise
    except Exception as exc:  # noqa: BLE001
        raise SpecError(f"--model hf: building {name} failed ({type(exc).__name__}: {printable(str(exc))[:160]})") \
            from None
    return model.eval()
