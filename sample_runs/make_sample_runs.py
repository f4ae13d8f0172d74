"""Regenerate ``sample_runs/`` deterministically: ``python sample_runs/make_sample_runs.py``.

Every run is written exactly as ``sam-probe train`` writes it (same trainer,
same checkpoint format); see ``sample_runs/README.md`` for what each run is.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from sam_probe.commands.train_cmd import write_run
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from writers import save_in_layout  # noqa: E402 - the tests' checkpoint writers

HERE = Path(__file__).resolve().parent

DIGITS_MLP = dict(model="mlp", model_args={"in_dim": 64, "hidden": [64, 64], "out_dim": 10}, data="digits",
                  steps=400, lr=0.1, batch_size=64, checkpoint_every=40, seed=0)
DIGITS_CNN = dict(model="cnn", model_args={"in_channels": 1, "num_classes": 10, "width": 8, "image_size": 8},
                  data="digits", steps=300, lr=0.05, batch_size=64, checkpoint_every=30, seed=0)
SWITCH = {"mlp": 200, "cnn": 150}

# Depth-2 diagonal linear nets on x = ±(1, q, q², ...) (minor first, major last): at the medium
# scale l2-SAM leads with the weakest feature and hands over feature by feature to the strongest
# (docs/gallery/minor_first.py sweeps the scale; the window is about 0.012-0.025 here).
DIAG = dict(model="diag-linear", data="synthetic-minor-major", seed=0)
DIAG_SCALES = {"small": 0.005, "medium": 0.0135, "large": 0.1}


def digits_runs(out: Path) -> None:
    for arch, base in (("mlp", DIGITS_MLP), ("cnn", DIGITS_CNN)):
        for opt, extra in (("sgd", {}), ("sam", {"rho": 0.1}), ("late-sam", {"rho": 0.3, "switch_step": SWITCH[arch]})):
            write_run(out / f"digits-{arch}-{opt}", optimizer=opt, **base, **extra)


def diag_runs(out: Path, settings: dict) -> None:
    for label, alpha in DIAG_SCALES.items():
        for opt in ("sgd", "sam"):
            write_run(out / f"diag-{label}-{'gd' if opt == 'sgd' else 'sam'}", optimizer=opt,
                      model_args={"in_dim": settings["d"], "alpha": alpha}, **DIAG, **settings["train"],
                      data_args=settings["data_args"])


def layout_examples(out: Path) -> None:
    """One checkpoint of the digits MLP SAM run in each layout researchers meet."""
    src = torch.load(out / "digits-mlp-sam" / "step_000400.pt", weights_only=True)
    target = out / "layouts"
    target.mkdir(parents=True, exist_ok=True)
    names = {"lightning": "epoch=3-step=400.ckpt", "ddp": "ddp_step_400.pt", "compiled": "compiled_400.pth",
             "ddp-compiled": "ddp_compiled_400.pt", "safetensors": "model_400.safetensors",
             "namespace": "namespace_hparams_400.pt", "legacy": "legacy_400.pt", "plain": "plain_state_dict_400.pt"}
    for layout, name in names.items():
        save_in_layout(src["model"], target / name, layout, step=400, hparams={"lr": 0.1, "rho": 0.1})


DIAG_SETTINGS = {
    "d": 10,
    "data_args": {"n": 16, "d": 10, "decay": 0.92, "features": "aligned"},
    "train": {"steps": 400, "lr": 0.1, "batch_size": 0, "checkpoint_every": 20, "rho": 0.05, "loss": "bce"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--only", choices=("all", "digits", "diag"), default="all",
                    help="regenerate only the digits runs (and layouts) or only the diag-linear runs")
    args = ap.parse_args()
    t0 = time.time()
    prefixes = {"all": ("digits-", "diag-", "layouts"), "digits": ("digits-", "layouts"), "diag": ("diag-",)}[args.only]
    for child in args.out.iterdir() if args.out.exists() else []:
        if child.is_dir() and child.name.startswith(prefixes):
            shutil.rmtree(child)
    if args.only in ("all", "digits"):
        digits_runs(args.out)
        layout_examples(args.out)
    if args.only in ("all", "diag"):
        diag_runs(args.out, DIAG_SETTINGS)
    print(f"sample runs written to {args.out} in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
