"""Options shared by every analysis (model, data, numerics, output), as plain data.

Torch-free at import time, so the command line can build its options without it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SpecError, opt

DTYPES = ("float32", "float64", "bfloat16", "float16")  # half: the model runs in it, solvers in float32


@dataclass
class Settings:
    """Options shared by every analysis command (model, data, numerics, output)."""

    model: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    data: str | None = None
    data_args: dict[str, Any] = field(default_factory=dict)
    split: str = "train"
    max_samples: int | None = None
    batch_size: int | None = None
    loss: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    bn_mode: str = "eval"
    seed: int = 0
    out: Path = Path("sam_probe_results")
    force: bool = False
    glob: str | None = None
    key: str | None = None
    trust_checkpoint: bool = False
    allow_models: list[str] = field(default_factory=list)  # factories a checkpoint may name (--allow-model)
    allow_nonfinite: bool = False
    store: bool = True
    max_memory: str | None = None  # e.g. "2GB": chunk and vector-block sizes from this budget (core/memory.py)
    hvp: str = "rev-rev"  # Hessian-vector products: rev-rev, fwd-rev, fd or auto (core/registry.py HVP_REGISTRY)
    distributed: bool = False  # data parallel over a torch.distributed group (also when torchrun set WORLD_SIZE)
    shard_model: bool = False  # FSDP2: every rank holds a shard of the model and of every vector (core/sharded.py)
    run_names: list[str] = field(default_factory=list)  # --run-name NAME or PATH=NAME (labels; numbers unchanged)
    base_model: str | None = None  # --base-model: the model a LoRA adapter checkpoint adapts (loading/peft.py)
    merge_adapter: bool = False  # --merge-adapter: analyse base + adapter merged instead of the adapter's factors

    def torch_dtype(self) -> Any:
        """The ``torch.dtype`` of :attr:`dtype`."""
        import torch

        if self.dtype not in DTYPES:
            raise SpecError("choose float32, float64, bfloat16 or float16", option="dtype", value=self.dtype)
        return getattr(torch, self.dtype)

    def torch_device(self) -> Any:
        """The ``torch.device`` of :attr:`device` (``auto``: CUDA when available)."""
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(self.device)
        except RuntimeError:
            raise SpecError("use auto, cpu, cuda or cuda:N", option="device", value=self.device) from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SpecError(f"CUDA is not available here; use {opt('device', 'cpu')}", option="device",
                            value=self.device)
        return dev

    def data_identity(self) -> dict[str, Any]:
        return {"data": self.data, "data_args": self.data_args, "split": self.split,
                "max_samples": self.max_samples, "seed": self.seed}
