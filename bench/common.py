"""Plumbing shared by the benchmarks: the machine description and writing results."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any


def environment(**extra: Any) -> dict[str, Any]:
    """Versions and machine facts recorded beside every measurement."""
    env: dict[str, Any] = {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                           "machine": platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import torch
        env.update(torch=torch.__version__, threads=torch.get_num_threads(),
                   cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except ImportError:  # pragma: no cover
        pass
    return {**env, **extra}


def write_results(path: str | Path, results: dict[str, Any], seconds_total: float) -> None:
    """Write ``results`` (with ``seconds_total``) as JSON and say where."""
    results["seconds_total"] = seconds_total
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print(f"total {seconds_total:.0f} s; wrote {path}")


def train(model, X, y, epochs: int, lr: float, seed: int = 0):
    """A few seeded epochs of SGD with momentum (batch 64) so benchmarks measure a trained model."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=g)
        for s in range(0, len(X), 64):
            idx = perm[s:s + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    return model.eval()
