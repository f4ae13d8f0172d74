"""The built-in names users and checkpoints may use: zoo models and data, declared once (torch-free).

:mod:`.models` builds the zoo from :data:`ZOO` (each name's factory is the function of
that name in ``models.py``, dashes as underscores); :mod:`.data` dispatches
:data:`DATA`; a checkpoint may name only the zoo models and :data:`CHECKPOINT_DATA`.
Help texts and the README's lists come from here (``--help`` imports no torch).
"""
from __future__ import annotations

ZOO: dict[str, str] = {
    "mlp": "fully connected net on flattened inputs (in_dim, hidden=256,256, out_dim, activation)",
    "cnn": "3 conv + BatchNorm blocks for 8x8 or 32x32 images (in_channels, num_classes, width, image_size)",
    "resnet18": "CIFAR ResNet-18 (num_classes, in_channels, width, image_size)",
    "wrn": "Wide ResNet, also as wrn-D-W (depth 6n+4, widen, num_classes, dropout)",
    "linear": "linear model f(x) = Wx + b (in_dim, out_dim, bias)",
    "diag-linear": "diagonal linear net f(x) = <u * v, x> at init scale alpha (in_dim, alpha)",
}

DATA: dict[str, str] = {
    "digits": "scikit-learn's 8x8 digits, standardised, seeded 80/20 split",
    "synthetic-minor-major": "features of geometrically decaying scale with a linear teacher (n, d, decay, ...)",
    "cifar10:ROOT": "CIFAR-10 through torchvision from ROOT (never downloads)",
    "hf:PATH": "a datasets dataset saved with save_to_disk, streamed",
    "torchvision:CLASS:ROOT": "torchvision.datasets.CLASS(ROOT), streamed (never downloads)",
}

CHECKPOINT_DATA = ("digits", "synthetic-minor-major")  # generators: what a checkpoint's hparams may name


def model_help() -> str:
    return (f"Zoo model ({', '.join(ZOO)}, wrn-D-W), hf / hf:ClassName (transformers, from the config.json beside "
            "the weights), or pkg.module:factory / file.py:factory. Default: the model named in the checkpoint, "
            "hf for Hugging Face folders.")


def data_help() -> str:
    return (f"{', '.join(DATA)}, FILE.pt/.npz/.h5, or pkg.module:factory / file.py:factory (tensors, Dataset, "
            "IterableDataset or DataLoader).")
