"""Shared plumbing of the gallery scripts (``docs/gallery/<name>.py``).

Every entry is ``python docs/gallery/<name>.py [--quick] [--out DIR]``: it trains what it
needs in-process with :func:`sam_probe.training.train` (seeded, deterministic), measures
with the sam_probe Python API, writes ``<out>/<name>.png`` (and ``<name>.json`` with the
numbers it measured) and returns those numbers from ``main(argv)`` (tests/test_gallery.py).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent

# one colour per optimiser across every gallery figure (seaborn's colour-blind palette)
RUN_ORDER = ("gd", "sgd", "sam", "late-sam", "masked")


def colors() -> dict[str, Any]:
    import seaborn as sns

    pal = sns.color_palette("colorblind", 8)
    return {"gd": pal[0], "sgd": pal[0], "sam": pal[1], "late-sam": pal[2], "masked": pal[4],
            "baseline": (0.35, 0.35, 0.35), "event": pal[3]}


def parse(name: str, doc: str, argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=f"{name}.py", description=doc.splitlines()[0] if doc else name)
    ap.add_argument("--quick", action="store_true", help="CI size (seconds), not the committed figure's size")
    ap.add_argument("--out", type=Path, default=HERE, help="folder for the figure and the JSON (default docs/gallery)")
    ap.add_argument("--replot", action="store_true", help="redraw the figure from the JSON already in --out "
                    "(no training)")
    return ap.parse_args(list(argv) if argv is not None else None)


def replot(out: Path, name: str, figure) -> dict[str, Any]:
    """``--replot``: the numbers of ``<out>/<name>.json`` drawn again by ``figure(numbers)`` into ``<name>.png``."""
    from sam_probe.report.figures import save

    numbers = json.loads((out / f"{name}.json").read_text())
    path = save(figure(numbers), out / f"{name}.png", "png")
    os.chmod(path, 0o644)
    print(f"{name}: redrew {path}")
    return numbers


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models run fastest (and steadiest on shared cores) on one thread; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_run(model_spec: str, model_args: dict[str, Any], data, *, seed: int = 0, init_scale: float = 1.0,
              keep: Sequence[int] | None = None, checkpoint_every: int = 0, weights: dict | None = None,
              start: Any = None, stream_seed: int | None = None, **train_kw: Any):
    """Build ``model_spec`` under ``torch.manual_seed(seed)`` (weights times ``init_scale``), train it
    with :func:`sam_probe.training.train` and return ``(model, [(step, state_dict, metrics)])``.

    States are kept at steps in ``keep`` (every step is visited) or every ``checkpoint_every``
    steps (and the first and the last); ``None``/``0`` keeps only the last.  ``weights`` and
    ``start`` (a :class:`~sam_probe.training.TrainState`) continue a run exactly like
    ``sam-probe train --resume``; ``stream_seed`` draws the minibatches from another seed.
    """
    from sam_probe.loading.models import build_model
    from sam_probe.training import train

    torch.manual_seed(seed)
    model = build_model(model_spec, model_args)
    if weights is not None:
        model.load_state_dict(weights)
    elif init_scale != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(init_scale)
    steps = int(train_kw.get("steps", 200))
    wanted = None if keep is None else set(int(s) for s in keep) | {steps}
    states: list[tuple[int, dict[str, torch.Tensor], dict[str, Any]]] = []

    def on_ckpt(step: int, state: dict[str, torch.Tensor], metrics: dict[str, Any]) -> None:
        if wanted is None or step in wanted:
            states.append((step, state, metrics))

    every = 1 if wanted is not None else (checkpoint_every or steps)
    train(model, data, seed=seed if stream_seed is None else stream_seed, checkpoint_every=every,
          on_checkpoint=on_ckpt, start=start, **train_kw)
    return model, states


def mean_std(v) -> list[float | None]:
    """``[mean, std over seeds (ddof 1; None for one seed)]`` of the values that exist."""
    import numpy as np

    v = [x for x in v if x is not None]
    if not v:
        return [None, None]
    return [float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else None]


def verdict(word: str) -> str:
    """One of the three words every gallery paragraph states."""
    assert word in ("reproduced", "partly reproduced", "not reproduced"), word
    return word


def objective(model, state: dict[str, torch.Tensor], data, loss: str | None = None, dtype=torch.float64):
    """The loss of ``model`` at ``state`` over ``data`` (an :class:`~sam_probe.Objective`, float64)."""
    import sam_probe as sp

    params = {n: state[n] for n, _ in model.named_parameters()}
    buffers = {n: state[n] for n, _ in model.named_buffers() if n in state}
    return sp.Objective(model, data.inputs, data.targets, loss or data.meta.get("loss"), params=params,
                        buffers=buffers, dtype=dtype)


def caption(fig, title: str, settings: str) -> None:
    """Title plus one caption line naming the settings (above the panels, so tight_layout keeps it)."""
    fig.suptitle(f"{title}\n{settings}", fontsize=10)


def legend_outside(ax, **kw: Any) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False, **kw)


def finite(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars/arrays -> Python."""
    if hasattr(x, "tolist"):
        x = x.tolist()
    if isinstance(x, dict):
        return {str(k): finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write(out: Path, name: str, fig, numbers: dict[str, Any], t0: float) -> dict[str, Any]:
    """Save ``<out>/<name>.png`` (sam_probe's style and atomic save) and ``<out>/<name>.json``."""
    from sam_probe.report.figures import save

    out.mkdir(parents=True, exist_ok=True)
    path = save(fig, out / f"{name}.png", "png")
    os.chmod(path, 0o644)  # a figure to share, not a secret (save() writes through mkstemp, 0600)
    numbers = {**numbers, "figure": path.name, "seconds": round(time.time() - t0, 1)}
    (out / f"{name}.json").write_text(json.dumps(finite(numbers), indent=1) + "\n")
    print(f"{name}: wrote {path} in {numbers['seconds']} s")
    return numbers


def plain_log(ax, axis: str = "y") -> None:
    """Log axis with plain tick labels at 1, 2, 5 x 10^k (no 10^k mathtext, no crowded minor labels)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    a = ax.yaxis if axis == "y" else ax.xaxis
    a.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    a.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    a.set_minor_formatter(NullFormatter())
