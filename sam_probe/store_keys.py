"""What names a stored unit and what it records: its key (reuse) and its attributes (provenance).

A unit is reused only when everything that changes its numbers is equal: the
analysis and its version, the keyed part of its config, the model/data/loss
settings and the sha256 of every checkpoint it read (:func:`unit_key`).  Its
attributes (:func:`unit_meta`) say how it was made: versions, command, config,
checkpoints, specs, device, host and time.  Torch-free: versions are passed in.
"""
from __future__ import annotations

import os
import socket
from typing import Any

from . import __version__
from .store import config_key, unit_path
from .settings import Settings

__all__ = ["unit_key", "unit_meta", "unit_path"]


def unit_key(analysis: Any, config: dict[str, Any], settings: Settings, shas: list[str]) -> str:
    """The 12-hex-digit key of a unit of ``analysis`` (an :class:`~sam_probe.analyses.base.Analysis`):
    config entries listed in ``analysis.unkeyed`` (cost only, e.g. warm starts) are left out."""
    s = settings
    ident = {"model": s.model, "model_args": s.model_args, "loss": s.loss, "dtype": s.dtype,
             "bn_mode": s.bn_mode, "key": s.key, **s.data_identity()}
    if s.base_model:  # an adapter's numbers depend on the base model's bytes, and on merging or not
        from .loading.checkpoints import file_sha256

        ident.update(base_model=file_sha256(s.base_model), merge_adapter=bool(s.merge_adapter))
    keyed = {k: v for k, v in config.items() if k not in analysis.unkeyed}
    return config_key(analysis.name, analysis.version, keyed, ident, shas)


def unit_meta(analysis: Any, config: dict[str, Any], settings: Settings, *, command: list[str],
              paths: list[str], shas: list[str], step: int | None, model_spec: Any, used_data: dict[str, Any] | None,
              device: str, torch_version: str, world_size: int, seconds: float,
              shard_plan: dict[str, Any] | None = None) -> dict[str, Any]:
    """The attributes stored with a unit (one checkpoint: scalars; several: lists); ``shard_plan``: what one
    rank held under ``--shard-model`` (:meth:`~sam_probe.core.sharded.ShardedObjective.shard_plan`)."""
    s = settings
    return {**({"shard_plan": dict(shard_plan)} if shard_plan else {}),
        "sam_probe_version": __version__, "torch_version": torch_version,
        "analysis": analysis.name, "analysis_version": analysis.version, "command": list(command),
        "config": config,
        "checkpoint": paths[0] if len(paths) == 1 else paths, "sha256": shas[0] if len(shas) == 1 else shas,
        "step": step if step is not None else -1, "model_spec": model_spec,
        "data_spec": {**s.data_identity(), **(used_data or {})}, "seed": s.seed, "device": device,
        "dtype": s.dtype, "bn_mode": s.bn_mode, "wall_time": seconds, "host": socket.gethostname(),
        "created": _now(), "pid": os.getpid(),
        "world_size": world_size, "shard_model": bool(getattr(s, "shard_model", False)),
    }


def _now() -> str:
    """Local time to the microsecond (``2026-12-06T12:41:46.123456+0000``): two units stored within one
    second still order by age (a report shows the newest of equal units)."""
    import datetime

    return datetime.datetime.now().astimezone().strftime("%Y-%m-%dT%H:%M:%S.%f%z")
