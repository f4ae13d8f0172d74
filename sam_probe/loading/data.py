"""Data specs: the samples every analysis averages over.

``--data`` accepts

- ``digits``: scikit-learn's 8x8 digits (bundled, no download); stratified 80/20
  train/test split seeded by option ``data_seed`` (default 0); pixels standardised
  with the *train* split's mean/std (zero-std pixels stay 0); flat ``[N, 64]``
  float32 inputs (option ``flatten=false``: ``[N, 1, 8, 8]``), int64 labels.
  ``pixel_means`` holds the mean raw intensity (0..16) per pixel of the selection.
- ``synthetic-minor-major``: ``x_ij = s_ij · decay^j``, so feature ``j`` has strength
  ``mean|x_j| = decay^j`` (``decay=0.5``: ``2^-j``; feature 0 major, the last minor).
  Option ``features``: ``rademacher`` (default; independent ``s_ij = ±1``),
  ``gaussian`` (``s_ij ~ N(0, 1)``) or ``aligned`` (``s_ij = ±1`` shared by all
  features of a sample: ``x_i = ±(1, decay, decay², ...)``, the single-example
  separable setting of Moon, Si & Yun 2026, which implies ``labels=sign``).
  Linear teacher ``β* = 1`` (option ``teacher=`` d numbers): ``labels="regression"``
  gives float targets ``y = <β*, x>`` (mse), ``labels="sign"`` float ``1[<β*, x> > 0]``
  (bce). Options ``n=256`` (train samples), ``n_test=n//4``, ``d=10``,
  ``decay=0.5``, ``data_seed=0``; the test split is drawn after the train split
  from the same stream.
- a ``.pt``/``.pth`` file with ``{'inputs', 'targets'}`` (or ``x``/``y``) or a pair
  ``(inputs, targets)``, read with ``torch.load(weights_only=True)``;
- ``.npz`` with ``inputs``/``targets`` (or ``x``/``y``), ``allow_pickle=False``;
- ``.h5``/``.hdf5`` with datasets ``inputs``/``targets`` (or ``x``/``y``);
- ``cifar10:ROOT`` with torchvision installed and the data already in ROOT (never downloads);
- files may instead hold model fields (``input_ids``, ``attention_mask``,
  ``labels``, ``pixel_values``, ...): each batch is then a dict passed to the
  model as keyword arguments, ``labels`` being the targets; ``{'inputs'}`` alone
  is token-only data (for ``--loss lm``).  Integer and bool tensors keep their
  dtype (token ids, masks); floating ones follow ``--dtype``;
- ``pkg.module:factory`` / ``file.py:factory`` called with the options (plus
  ``split`` when it takes one), returning a pair of tensors or a dict (kept in
  memory), or a ``Dataset``, an ``IterableDataset`` or a ``DataLoader``, which are
  *streamed*: items (``(x, y)``, ``x`` or dicts) are read and collated chunk by
  chunk on every pass (a DataLoader lends its ``dataset``, ``collate_fn`` and
  ``batch_size`` as the default chunk; its sampler and workers are not used);
- ``hf:PATH``: a Hugging Face ``datasets`` dataset saved with ``save_to_disk``
  (``load_from_disk``; a DatasetDict's ``--split``; option ``columns=a,b``),
  streamed; ``torchvision:CLASS:ROOT``: ``torchvision.datasets.CLASS(ROOT,
  download=False)`` with ``ToTensor()``, streamed.  Neither ever downloads.

``max_samples``: a seeded random subset without replacement (indices sorted);
for streamed data only these positions are stored (an iterable without
``__len__`` is counted by one pass first).
Problems raise :class:`~sam_probe.errors.SpecError` with a one-line fix.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..core.batches import Batches, DataError, DatasetBatches, StreamBatches, TensorBatches, batch_len, count_items
from ..core.batches import index_batch
from ..errors import SpecError, suggest
from . import catalog
from .models import import_factory, is_factory_spec

BUILTIN = tuple(catalog.DATA)
MODEL_FIELDS = ("input_ids", "pixel_values", "input_values", "input_features", "inputs_embeds")
STREAM_CHUNK = 64  # default chunk of streamed data without --batch-size
SPLITS = ("train", "test")
KEY_PAIRS = (("inputs", "targets"), ("x", "y"), ("X", "y"), ("X", "Y"))
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class DataSelection:
    """Inputs and targets of one data selection, with what analyses need to know about them."""

    inputs: Any  # Tensor or dict of tensors in memory; None when streamed
    targets: Tensor | None
    name: str
    n_classes: int | None = None
    image_shape: tuple[int, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    pixel_means: Tensor | None = None  # [d] mean raw intensity per input feature (images), for background mass
    raw_affine: tuple[Tensor, Tensor] | None = field(default=None, repr=False)  # raw = flat inputs * a + b
    stream: Batches | None = field(default=None, repr=False)  # streamed source (datasets, iterables)
    chunk_hint: int | None = None  # default chunk of a streamed source (a DataLoader's batch_size)

    def __len__(self) -> int:
        return self.stream.n if self.stream is not None else batch_len(self.inputs)

    @property
    def streamed(self) -> bool:
        return self.stream is not None

    def batches(self) -> Batches:
        """The samples as a :class:`~sam_probe.core.batches.Batches` source for an Objective."""
        return self.stream if self.stream is not None else TensorBatches(self.inputs, self.targets)


# ------------------------------------------------------------------ public
def load_data(spec: str, split: str = "train", max_samples: int | None = None, seed: int = 0,
              options: dict[str, Any] | None = None, named_by: str | None = None) -> DataSelection:
    """The data selection of ``spec`` (see module docstring).

    ``named_by``: the checkpoint that chose this built-in data (the user passed no ``--data``); its errors
    then say so instead of blaming a ``--data`` the user never typed."""
    if named_by is None:
        return _load_data(spec, split, max_samples, seed, options)
    try:
        return _load_data(spec, split, max_samples, seed, options)
    except SpecError as exc:
        msg = str(exc).removeprefix(f"--data {spec}: ").removeprefix(f"{spec}: ")
        raise SpecError(f"{named_by}: the data the checkpoint names ({spec} with {options or 'its defaults'}) "
                        f"cannot be made: {msg}; pass --data to choose the data yourself") from None


def _load_data(spec: str, split: str, max_samples: int | None, seed: int,
               options: dict[str, Any] | None) -> DataSelection:
    options = dict(options or {})
    if split not in SPLITS:
        raise SpecError(f"--split {split}: unknown{suggest(split, SPLITS)}; choose train or test")
    if max_samples is not None and int(max_samples) <= 0:
        raise SpecError(f"--max-samples must be positive, got {max_samples}")
    sel = _load(str(spec), split, options)
    _check(sel)
    return select(sel, max_samples, seed)


def select(sel: DataSelection, max_samples: int | None, seed: int = 0) -> DataSelection:
    """A seeded random subset of ``max_samples`` samples (sorted indices), or ``sel`` itself."""
    n = len(sel)
    if max_samples is None or int(max_samples) >= n:
        return sel
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(n, generator=g)[: int(max_samples)].sort().values
    meta = {**sel.meta, "n_before_selection": n, "max_samples": int(max_samples), "selection_seed": int(seed)}
    if sel.stream is not None:
        return DataSelection(None, None, sel.name, sel.n_classes, sel.image_shape, meta,
                             stream=sel.stream.take(idx), chunk_hint=sel.chunk_hint)
    inputs = index_batch(sel.inputs, idx)
    return DataSelection(inputs, None if sel.targets is None else sel.targets[idx], sel.name, sel.n_classes,
                         sel.image_shape, meta,
                         raw_means(inputs, sel.raw_affine) if sel.raw_affine else sel.pixel_means, sel.raw_affine)


def raw_means(inputs: Tensor, affine: tuple[Tensor, Tensor]) -> Tensor:
    """Mean raw intensity per feature, ``mean_i (x_i · a + b)`` over flat inputs."""
    a, b = affine
    return (inputs.reshape(len(inputs), -1).double() * a.double() + b.double()).mean(0).float()


def raw_image_means(spec: str, split: str = "train", max_samples: int | None = None, seed: int = 0,
                    options: dict[str, Any] | None = None) -> Tensor | None:
    """Mean raw intensity per pixel of the selection (``None`` when the data has none)."""
    return load_data(spec, split, max_samples, seed, options).pixel_means


def is_builtin_data(spec: str) -> bool:
    """Data a checkpoint's hyper-parameters may name: built-in generators, never files or factories."""
    return spec in catalog.CHECKPOINT_DATA


# ---------------------------------------------------------------- dispatch
def _load(spec: str, split: str, options: dict[str, Any]) -> DataSelection:
    if spec == "digits":
        return digits(split, **_opts(digits, options, spec))
    if spec == "synthetic-minor-major":
        return synthetic_minor_major(split, **_opts(synthetic_minor_major, options, spec))
    if spec.startswith("cifar10:") or spec == "cifar10":
        return cifar10(spec.partition(":")[2], split, **_opts(cifar10, options, spec))
    if spec.startswith("hf:"):
        return hf_disk(spec[3:], split, **_opts(hf_disk, options, spec))
    if spec.startswith("torchvision:"):
        return torchvision_dataset(spec[len("torchvision:"):], split, **_opts(torchvision_dataset, options, spec))
    suffix = Path(spec).suffix.lower()
    if suffix in (".pt", ".pth", ".npz", ".h5", ".hdf5"):
        return _from_file(spec, suffix, options)
    if is_factory_spec(spec):
        return _from_factory(spec, split, options)
    if Path(spec).exists():
        raise SpecError(f"--data {spec}: unsupported file type {suffix or '(none)'}; use .pt, .npz or .h5 "
                        "with inputs/targets, or a file.py:factory")
    raise SpecError(f"--data {spec}: unknown data{suggest(spec, BUILTIN)}; use digits, synthetic-minor-major, "
                    "cifar10:ROOT, a .pt/.npz/.h5 file, or pkg.module:factory / file.py:factory")


def _opts(fn: Any, options: dict[str, Any], spec: str) -> dict[str, Any]:
    accepted = [n for n in inspect.signature(fn).parameters if n not in ("split", "root", "path", "where")]
    for k in options:
        if k not in accepted:
            raise SpecError(f"--data {spec}: unknown option {k!r}{suggest(k, accepted)}; accepted: {', '.join(accepted)}")
    return options


def _check(sel: DataSelection) -> None:
    if sel.stream is None:
        try:
            TensorBatches(sel.inputs, sel.targets)
        except DataError as exc:
            raise SpecError(f"--data {sel.name}: {exc}; give one target per input") from None
    if len(sel) == 0:
        raise SpecError(f"--data {sel.name}: no samples; check the file or the split")
    if sel.stream is not None:
        try:
            sel.stream.first(1)
        except DataError as exc:
            raise SpecError(f"--data {sel.name}: {exc}") from None


# ------------------------------------------------------------------ digits
# The test rows of scikit-learn's ``train_test_split(arange(1797), test_size=0.2, stratify=y,
# random_state=0)`` as a packed bitmask (base64 of ``np.packbits``): the default split, so a command on
# digits does not import scikit-learn (about 2 s per process) just to split it.  Other seeds call
# scikit-learn; tests/loading/test_data.py checks this mask against it.
DIGITS_TEST_ROWS = {0: (
    "AAAEiDUkEEAABkEAk0IFABoACAEAJAAoBiwSABAAlAoAkBkSBCD4oAKBEKAACAqIIEQVJElCQKAKAAAAQATYAACBgCAASAXEABBACKAQ"
    "AAVASAAwEAACDsQJAAIkhACDqAE8IKaYCgAAAAsIQAgEoBhIAgJAQcEAgARARoQ3aoECFgBEgABAQqCkGApQAIQLhWHGCBCACABMgMAgB"
    "AaOAAEIggCBADgIA8AIGQAAEA4BAIQQoCEAMygpBMBEwIBoDgECgwCCAIgipkAsJAQhCKhggJCBoAwCggJCEgE4pBUA")}


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``(X [1797, 64] float64, y [1797] int)``: scikit-learn's ``load_digits(return_X_y=True)``, read
    from the CSV file scikit-learn ships (located without importing scikit-learn; its own loader when the
    file is not where it used to be)."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    csv = (Path(next(iter(spec.submodule_search_locations)), "datasets", "data", "digits.csv.gz")
           if spec is not None and spec.submodule_search_locations else None)
    if csv is None or not csv.is_file():
        from sklearn.datasets import load_digits

        return load_digits(return_X_y=True)
    with gzip.open(csv, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1], data[:, -1].astype(int)


@functools.lru_cache(maxsize=4)
def _digits_split(data_seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(X, y, train indices, test indices)``: stratified 80/20, sorted indices (cached, read-only)."""
    import base64

    X, y = digits_arrays()
    n = len(y)
    if data_seed in DIGITS_TEST_ROWS and n == 1797:
        test = np.unpackbits(np.frombuffer(base64.b64decode(DIGITS_TEST_ROWS[data_seed]), np.uint8))[:n].astype(bool)
        idx_train, idx_test = np.flatnonzero(~test), np.flatnonzero(test)
    else:
        from sklearn.model_selection import train_test_split

        idx_train, idx_test = train_test_split(np.arange(n), test_size=0.2, stratify=y, random_state=data_seed)
    for a in (X, y):
        a.setflags(write=False)
    return X, y, np.sort(idx_train), np.sort(idx_test)


def digits(split: str = "train", data_seed: int = 0, flatten: bool = True) -> DataSelection:
    """scikit-learn digits, standardised with train statistics (module docstring)."""
    X, y, idx_train, idx_test = _digits_split(int(data_seed))
    mean = X[idx_train].mean(0)
    std = X[idx_train].std(0)
    std = np.where(std > 0, std, 1.0)
    idx = idx_train if split == "train" else idx_test
    inputs = torch.from_numpy((X[idx] - mean) / std).float()
    if not flatten:
        inputs = inputs.reshape(-1, 1, 8, 8)
    meta = {"split": split, "data_seed": int(data_seed), "n_train": len(idx_train), "n_test": len(idx_test),
            "standardised": "train mean/std", "loss": "ce"}
    affine = (torch.from_numpy(std).float(), torch.from_numpy(mean).float())
    return DataSelection(inputs, torch.from_numpy(y[idx]).long(), "digits", 10, (1, 8, 8), meta,
                         raw_means(inputs, affine), affine)


# -------------------------------------------------------- minor / major
FEATURE_KINDS = ("rademacher", "gaussian", "aligned")
MAX_SYNTHETIC_VALUES = 2**24  # (n + n_test) x d: ~0.5 GB at the peak of generation; larger sets go in a file


def synthetic_minor_major(split: str = "train", n: int = 256, n_test: int | None = None, d: int = 10,
                          decay: float = 0.5, labels: str | None = None, teacher: Any = None,
                          features: str = "rademacher", data_seed: int = 0) -> DataSelection:
    """Features of geometrically decaying scale with a linear teacher (module docstring)."""
    try:
        n, d = int(n), int(d)
        n_test = n // 4 if n_test is None else int(n_test)
    except (TypeError, ValueError):
        raise SpecError("synthetic-minor-major: n, n_test and d must be whole numbers (e.g. n=256 d=10)") from None
    if n <= 0 or d <= 0 or n_test < 0:
        raise SpecError("synthetic-minor-major: n and d must be positive (e.g. n=256 d=10)")
    if (n + n_test) * d > MAX_SYNTHETIC_VALUES:
        raise SpecError(f"synthetic-minor-major: (n + n_test) x d = {(n + n_test) * d:,} values, more than the "
                        f"{MAX_SYNTHETIC_VALUES:,} it generates; save larger data to a .pt/.npz file")
    if features not in FEATURE_KINDS:
        raise SpecError(f"synthetic-minor-major: features={features!r}{suggest(str(features), FEATURE_KINDS)}; "
                        f"choose one of {', '.join(FEATURE_KINDS)}")
    labels = labels or ("sign" if features == "aligned" else "regression")
    if labels not in ("regression", "sign"):
        raise SpecError(f"synthetic-minor-major: labels={labels!r}; choose regression or sign")
    beta = torch.ones(d, dtype=torch.float64) if teacher is None else torch.as_tensor(
        teacher if isinstance(teacher, list) else [teacher] * d, dtype=torch.float64)
    if beta.shape != (d,):
        raise SpecError(f"synthetic-minor-major: teacher has {beta.numel()} entries for d={d}; give d numbers")
    g = torch.Generator().manual_seed(int(data_seed))
    total = n + n_test
    if features == "gaussian":
        s = torch.randn(total, d, generator=g, dtype=torch.float64)
    else:
        s = torch.randint(0, 2, (total, 1 if features == "aligned" else d), generator=g, dtype=torch.float64) * 2 - 1
        s = s.expand(total, d)
    scale = float(decay) ** torch.arange(d, dtype=torch.float64)
    X = s * scale
    z = X @ beta
    part = slice(0, n) if split == "train" else slice(n, total)
    y = z if labels == "regression" else (z > 0).double()
    meta = {"split": split, "n": n, "n_test": n_test, "d": d, "decay": float(decay), "labels": labels,
            "features": features, "data_seed": int(data_seed), "teacher": [float(b) for b in beta],
            "loss": "mse" if labels == "regression" else "bce"}
    return DataSelection(X[part].float(), y[part].float(), "synthetic-minor-major",
                         None if labels == "regression" else 2, None, meta)


# ------------------------------------------------------------------ cifar10
def cifar10(root: str, split: str = "train", normalize: bool = True) -> DataSelection:
    """CIFAR-10 from ``root`` through torchvision (``download=False``), ``[N, 3, 32, 32]``."""
    if not root:
        raise SpecError("--data cifar10 needs a directory: cifar10:ROOT (the folder holding cifar-10-batches-py)")
    try:
        from torchvision.datasets import CIFAR10
    except ImportError:
        raise SpecError("--data cifar10:ROOT needs torchvision: pip install torchvision "
                        "(or pass a .pt/.npz/.h5 file with inputs/targets)") from None
    try:
        ds = CIFAR10(root, train=split == "train", download=False)
    except (RuntimeError, OSError):
        raise SpecError(f"--data cifar10:{root}: no CIFAR-10 found there; sam-probe never downloads — fetch it once "
                        f"with torchvision.datasets.CIFAR10({root!r}, download=True)") from None
    x = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).float() / 255.0
    std = torch.tensor(CIFAR_STD if normalize else (1.0, 1.0, 1.0))
    mean = torch.tensor(CIFAR_MEAN if normalize else (0.0, 0.0, 0.0))
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    affine = (std.repeat_interleave(32 * 32), mean.repeat_interleave(32 * 32))
    return DataSelection(x.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long), "cifar10", 10, (3, 32, 32),
                         {"split": split, "root": str(root), "normalized": bool(normalize), "loss": "ce"},
                         raw_means(x, affine), affine)


# ------------------------------------------------------------------- files
def _from_file(spec: str, suffix: str, options: dict[str, Any]) -> DataSelection:
    path = Path(spec).expanduser()
    if not path.is_file():
        raise SpecError(f"--data {spec}: file not found; check the path")
    if options:
        raise SpecError(f"--data {spec}: files take no --data-arg options (got {', '.join(options)})")
    try:
        if suffix in (".pt", ".pth"):
            from .safe_pickle import safe_load  # hostile input too: the checkpoint loader's checks and bounds

            obj = safe_load(str(path))[0]
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                _check_inflated(spec, path, sum(i.file_size for i in z.zip.infolist()))
                obj = {k: z[k] for k in z.files}
        else:
            import h5py

            from ..store import ReadBudget, hard_member, plain_dataset  # the results reader's checks

            with h5py.File(path, "r") as f:
                budget = ReadBudget(f)
                obj = {}
                for k in f.keys():
                    item = hard_member(f, k)
                    if isinstance(item, h5py.Dataset):
                        obj[k] = plain_dataset(item, budget)
    except SpecError:
        raise
    except Exception as exc:
        raise SpecError(f"--data {spec}: cannot read it ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                        "save plain tensors/arrays named inputs and targets") from None
    x, y = _pair(obj, spec)
    return from_tensors(x, y, path.name, {"path": str(path)})


INFLATE_FACTOR, INFLATE_FLOOR = 256, 256 << 20  # an archive may inflate to max(floor, factor x its size)


def _check_inflated(spec: str, path: Path, inflated: int) -> None:
    """Refuse an archive whose members inflate far beyond its own size (a zip bomb)."""
    limit = max(INFLATE_FLOOR, INFLATE_FACTOR * path.stat().st_size)
    if inflated > limit:
        raise SpecError(f"--data {spec}: its arrays inflate to {inflated:,} bytes from {path.stat().st_size:,} "
                        "(a zip bomb?); save the arrays uncompressed")


MAX_FIELDS = 256  # model fields of one data file (a forward takes a handful)


def _pair(obj: Any, spec: str) -> tuple[Any, Any]:
    """``(inputs, targets)`` from a dict (inputs/targets, x/y, inputs alone, or model fields) or a 2-sequence."""
    if isinstance(obj, dict):
        for a, b in KEY_PAIRS:
            if a in obj and b in obj:
                return obj[a], obj[b]
        if "inputs" in obj and len(obj) == 1:
            return obj["inputs"], None
        if any(k in obj for k in MODEL_FIELDS):
            if len(obj) > MAX_FIELDS:
                raise SpecError(f"--data {spec}: {len(obj):,} fields, more than the {MAX_FIELDS} model fields "
                                "sam-probe passes to a forward; keep the model's inputs only")
            return {str(k): v for k, v in obj.items()}, None
        found = ", ".join(str(k)[:40] for k in list(obj)[:12]) + (f", ... ({len(obj):,} in all)" if len(obj) > 12 else "")
        raise SpecError(f"--data {spec}: expected keys inputs/targets (or x/y), or model fields such as "
                        f"input_ids/attention_mask/labels; found {found or 'none'}")
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        return obj[0], obj[1]
    raise SpecError(f"--data {spec}: expected {{'inputs', 'targets'}} or (inputs, targets), got {type(obj).__name__}")


INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _as_tensor(a: Any, what: str, spec: str) -> Tensor:
    try:
        t = torch.as_tensor(np.asarray(a)) if not isinstance(a, Tensor) else a
    except Exception:
        raise SpecError(f"--data {spec}: {what} is not numeric ({type(a).__name__}); store arrays or tensors") from None
    if not (t.is_floating_point() or t.dtype in INT_DTYPES or t.dtype == torch.bool):
        raise SpecError(f"--data {spec}: {what} has dtype {t.dtype}; store real numbers")
    return t.detach().cpu()


def _labels(y: Tensor, name: str) -> tuple[Tensor, int | None]:
    """Integer targets as int64 class labels (``-100`` = ignored) and the class count."""
    y = y.long()
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    valid = y[y != -100]
    if valid.numel() and int(valid.min()) < 0:
        raise SpecError(f"--data {name}: integer targets must be class indices >= 0 (or -100 to ignore); "
                        "store float targets for regression")
    return y, (int(valid.max()) + 1 if valid.numel() else None)


def from_tensors(x: Any, y: Any, name: str, meta: dict[str, Any] | None = None) -> DataSelection:
    """A selection from raw inputs (a tensor, or a dict of model fields) and targets (or ``None``).

    Integer and bool inputs keep their dtype; integer targets become int64 class labels
    (``n_classes = max + 1``); a dict's ``labels``/``label`` are its targets; image shape
    from 3-D/4-D float inputs."""
    if isinstance(x, dict):
        xi: Any = {k: _as_tensor(v, f"field {k!r}", name) for k, v in x.items()}
        lab = next((k for k in ("labels", "label") if k in xi), None)
        yt = xi[lab] if lab and y is None else None
    else:
        xi = _as_tensor(x, "inputs", name)
        yt = None
        if xi.dim() == 0:
            raise SpecError(f"--data {name}: inputs and targets need a leading sample dimension")
    yi = None if y is None else _as_tensor(y, "targets", name)
    if yi is not None and yi.dtype == torch.bool:
        yi = yi.float()
    if yi is not None and yi.dim() == 0:
        raise SpecError(f"--data {name}: inputs and targets need a leading sample dimension")
    n_classes = None
    labels = yi if yi is not None else yt
    if labels is not None and not labels.is_floating_point():
        fixed, n_classes = _labels(labels, name)
        if yi is not None:
            yi = fixed
        else:
            xi[lab] = fixed.reshape(xi[lab].shape)
    image_shape = None
    if isinstance(xi, Tensor) and xi.is_floating_point():
        image_shape = tuple(xi.shape[1:]) if xi.dim() == 4 else ((1, *xi.shape[1:]) if xi.dim() == 3 else None)
    tokens = isinstance(xi, dict) and "input_ids" in xi or (isinstance(xi, Tensor) and not xi.is_floating_point()
                                                              and xi.dim() == 2)
    if labels is None:
        loss = "lm" if tokens else None
    elif labels.is_floating_point():
        loss = "mse"
    else:
        loss = "ce"
    meta = {**(meta or {}), **({"loss": loss} if loss else {})}
    sel = DataSelection(xi, yi, name, n_classes, image_shape, meta)
    _check(sel)
    return sel


# ---------------------------------------------------------------- factories
def _from_factory(spec: str, split: str, options: dict[str, Any]) -> DataSelection:
    fn = import_factory(spec, "data")
    kwargs = dict(options)
    try:
        params = inspect.signature(fn).parameters
        if "split" in params and "split" not in kwargs:
            kwargs["split"] = split
    except (TypeError, ValueError):
        pass
    try:
        obj = fn(**kwargs)
    except SpecError:
        raise
    except (TypeError, ValueError) as exc:
        raise SpecError(f"--data {spec}: calling it with {kwargs} failed: {exc}") from exc
    if isinstance(obj, DataSelection):
        return obj
    if isinstance(obj, dict) or _is_tensor_pair(obj) or isinstance(obj, Tensor):
        x, y = (obj, None) if isinstance(obj, Tensor) else _pair(obj, spec)
        return from_tensors(x, y, spec, {"factory": spec})
    return streamed(obj, spec, {"factory": spec})


def _is_tensor_pair(obj: Any) -> bool:
    return (isinstance(obj, (tuple, list)) and len(obj) == 2
            and all(isinstance(o, (Tensor, np.ndarray)) for o in obj))


def streamed(obj: Any, name: str, meta: dict[str, Any] | None = None) -> DataSelection:
    """A streamed selection over a ``Dataset``, ``IterableDataset`` or ``DataLoader`` (module docstring)."""
    from torch.utils.data import DataLoader, IterableDataset

    meta = {**(meta or {}), "streamed": True}
    collate_fn, hint = None, None
    if isinstance(obj, DataLoader):
        collate_fn, hint = obj.collate_fn, obj.batch_size
        meta["dataloader"] = {"batch_size": obj.batch_size, "dataset": type(obj.dataset).__name__}
        obj = obj.dataset
    if isinstance(obj, IterableDataset) or not (hasattr(obj, "__getitem__") and hasattr(obj, "__len__")):
        if not hasattr(obj, "__iter__"):
            raise SpecError(f"--data {name}: the factory returned {type(obj).__name__}; return a Dataset, an "
                            "IterableDataset, a DataLoader, a pair of tensors or {'inputs','targets'}")
        try:
            total = len(obj)
        except TypeError:
            total = count_items(obj)  # one pass, nothing kept
        source: Batches = StreamBatches(obj, total, collate_fn=collate_fn)
    else:
        source = DatasetBatches(obj, collate_fn=collate_fn)
    sel = DataSelection(None, None, name, None, None, meta, stream=source, chunk_hint=hint)
    _check(sel)
    try:
        _, y = source.first(1)
    except DataError as exc:
        raise SpecError(f"--data {name}: {exc}") from None
    x0 = source.first(1)[0]
    if y is None and isinstance(x0, dict):
        y = next((x0[k] for k in ("labels", "label") if k in x0), None)
    if y is not None:
        sel.meta["loss"] = "mse" if y.is_floating_point() else "ce"
    elif isinstance(x0, dict) and "input_ids" in x0 or isinstance(x0, Tensor) and not x0.is_floating_point():
        sel.meta["loss"] = "lm"
    return sel


def hf_disk(where: str, split: str = "train", columns: Any = None) -> DataSelection:
    """A ``datasets`` dataset saved with ``save_to_disk`` at ``where``, streamed (never downloads)."""
    if not where:
        raise SpecError("--data hf:PATH needs the folder written by Dataset.save_to_disk")
    try:
        import datasets
    except ImportError:
        raise SpecError("--data hf:PATH needs the datasets package: pip install datasets") from None
    path = Path(where).expanduser()
    if not path.exists():
        raise SpecError(f"--data hf:{where}: no such folder")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001
        raise SpecError(f"--data hf:{where}: not a saved dataset ({type(exc).__name__}: {str(exc)[:120]})") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        pick = split if split in ds else ("validation" if split == "test" and "validation" in ds else None)
        if pick is None:
            raise SpecError(f"--data hf:{where}: no split {split!r} (has {', '.join(names)}); choose --split")
        ds = ds[pick]
    if columns:
        cols = columns if isinstance(columns, list) else [c for c in str(columns).split(",") if c]
        missing = [c for c in cols if c not in ds.column_names]
        if missing:
            raise SpecError(f"--data hf:{where}: no column {missing[0]!r}{suggest(missing[0], ds.column_names)}")
        ds = ds.select_columns(cols)
    return streamed(ds.with_format("torch"), f"hf:{where}", {"path": str(path), "split": split})


def torchvision_dataset(where: str, split: str = "train") -> DataSelection:
    """``torchvision.datasets.CLASS(ROOT, train=..., download=False, transform=ToTensor())``, streamed."""
    cls_name, _, root = where.partition(":")
    if not cls_name or not root:
        raise SpecError("--data torchvision:CLASS:ROOT, e.g. torchvision:MNIST:~/data (the data already in ROOT)")
    try:
        from torchvision import datasets as tv_datasets
        from torchvision import transforms
    except Exception:  # noqa: BLE001 - ImportError, or a torchvision built for another torch
        raise SpecError("--data torchvision:...: torchvision is not installed (or not built for this torch)") from None
    cls = getattr(tv_datasets, cls_name, None)
    if not isinstance(cls, type):
        names = [n for n in dir(tv_datasets) if n[:1].isupper()]
        raise SpecError(f"--data torchvision:{where}: no dataset {cls_name!r}{suggest(cls_name, names)}")
    root = str(Path(root).expanduser())
    try:
        ds = cls(root, train=split == "train", download=False, transform=transforms.ToTensor())
    except TypeError:
        try:
            ds = cls(root, split=split, download=False, transform=transforms.ToTensor())
        except Exception as exc:  # noqa: BLE001
            raise SpecError(f"--data torchvision:{where}: cannot open it ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # noqa: BLE001
        raise SpecError(f"--data torchvision:{where}: no {cls_name} in {root} ({type(exc).__name__}); sam-probe "
                        f"never downloads, fetch it once with torchvision") from None
    return streamed(ds, f"torchvision:{cls_name}", {"root": root, "split": split})


# ---------------------------------------------------------------- data against a model
def check_token_ids(sel: DataSelection, model: Any) -> None:
    """Refuse token ids the model cannot embed, naming its vocabulary size (instead of torch's
    ``IndexError: index out of range in self`` deep inside the forward)."""
    emb = getattr(model, "get_input_embeddings", None)
    layer = emb() if callable(emb) else None
    vocab = getattr(layer, "num_embeddings", None)
    if not isinstance(vocab, int) or sel.streamed:
        return
    x = sel.inputs
    ids = x.get("input_ids") if isinstance(x, dict) else (x if isinstance(x, Tensor) and not x.is_floating_point()
                                                           else None)
    if not isinstance(ids, Tensor) or ids.numel() == 0 or ids.is_floating_point():
        return
    hi, lo = int(ids.max()), int(ids.min())
    if hi >= vocab or lo < 0:
        bad = hi if hi >= vocab else lo
        raise SpecError(f"--data {sel.name}: token id {bad} is outside the model's vocabulary of {vocab:,} ids "
                        f"(0..{vocab - 1}); tokenize the data for this model")


def unused_fields(sel: DataSelection, model: Any) -> list[str]:
    """Fields of dict data that the model's ``forward`` does not name when it takes ``**kwargs`` (a model
    may silently ignore them); ``[]`` otherwise (without ``**kwargs`` a wrong field is an error anyway)."""
    x = sel.inputs
    if not isinstance(x, dict):
        return []
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return []
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    return [k for k in x if k not in params]
