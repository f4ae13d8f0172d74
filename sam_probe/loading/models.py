"""Model specs: a small built-in zoo and user factories.

``--model`` accepts

- a zoo name (:data:`ZOO`): ``mlp``, ``cnn`` (with BatchNorm), ``resnet18`` (CIFAR
  variant), ``wrn`` / ``wrn-D-W`` (Wide ResNet of depth D, width W), ``linear``,
  ``diag-linear``;
- ``package.module:factory`` or ``path/to/file.py:factory`` (the file is imported
  by path), called as ``factory(**args)``.

Keyword args come from repeated ``--model-arg key=value`` (:func:`parse_kv`).
All zoo models are deterministic under ``torch.manual_seed``.  Image models
accept ``[N, C, H, W]`` or flat ``[N, C*H*W]`` inputs; ``mlp`` and ``linear``
flatten ``[N, ...]``; every model returns ``[N, out]`` (``diag-linear``: ``[N, 1]``).
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, SpecError, suggest
from . import catalog

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
WRN_PATTERN = re.compile(r"^wrn-(\d+)-(\d+)$")


# ------------------------------------------------------------------ helpers
def _int_list(value: Any, what: str) -> list[int]:
    """``"256,256"`` / ``[256, 256]`` / ``256`` / ``""`` -> list of ints."""
    if value is None or value == "":
        return []
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [int(value)]
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    try:
        return [int(v) for v in value]
    except (TypeError, ValueError):
        raise SpecError(f"{what} must be integers like 256,256; got {value!r}") from None


def as_image(x: Tensor, channels: int, size: int) -> Tensor:
    """``[N, C*H*W]`` / ``[N, H, W]`` (C = 1) / ``[N, C, H, W]`` -> ``[N, C, H, W]``."""
    if x.dim() == 4:
        return x
    if x.dim() == 3 and channels == 1:
        return x.unsqueeze(1)
    if x.dim() == 2 and x.shape[1] == channels * size * size:
        return x.reshape(x.shape[0], channels, size, size)
    raise RuntimeError(f"expected inputs [N, {channels}, {size}, {size}] or [N, {channels * size * size}], "
                       f"got {list(x.shape)}; set the model args in_channels / image_size")


# ---------------------------------------------------------------------- mlp
class MLP(nn.Module):
    """Fully connected net on flattened inputs: ``Linear -> act -> ... -> Linear``."""

    def __init__(self, in_dim: int, hidden: list[int], out_dim: int, activation: str):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_dim
        for h in hidden:
            layers += [nn.Linear(prev, h), ACTIVATIONS[activation]()]
            prev = h
        layers.append(nn.Linear(prev, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.reshape(x.shape[0], -1))


def mlp(in_dim: int = 64, hidden: Any = "256,256", out_dim: int = 10, activation: str = "relu") -> MLP:
    """MLP; ``hidden`` = comma list or list of widths (empty: a linear classifier)."""
    if activation not in ACTIVATIONS:
        raise SpecError(f"mlp activation {activation!r} unknown{suggest(str(activation), ACTIVATIONS)}; "
                        f"choose one of {', '.join(ACTIVATIONS)}")
    return MLP(int(in_dim), _int_list(hidden, "mlp hidden"), int(out_dim), activation)


# ---------------------------------------------------------------------- cnn
class SmallCNN(nn.Module):
    """3 x (conv3x3 -> BatchNorm -> ReLU), strides 1, 2, 2; avg-pool to 2x2; Linear."""

    def __init__(self, in_channels: int, num_classes: int, width: int, image_size: int):
        super().__init__()
        self.in_channels, self.image_size = in_channels, image_size
        w = width

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(*block(in_channels, w, 1), *block(w, 2 * w, 2), *block(2 * w, 2 * w, 2),
                                      nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(2 * w * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(as_image(x, self.in_channels, self.image_size))
        return self.head(h.flatten(1))


def cnn(in_channels: int = 1, num_classes: int = 10, width: int = 8, image_size: int = 8) -> SmallCNN:
    """Small conv net with BatchNorm for 8x8 (digits) or 32x32 (CIFAR) images."""
    return SmallCNN(int(in_channels), int(num_classes), int(width), int(image_size))


# ----------------------------------------------------------------- resnet18
class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs with BatchNorm, 1x1 projection shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3x3 stem, no max-pool, stages [2, 2, 2, 2] of widths w, 2w, 4w, 8w."""

    def __init__(self, num_classes: int, in_channels: int, width: int, image_size: int):
        super().__init__()
        self.in_channels, self.image_size = in_channels, image_size
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2 ** i
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(as_image(x, self.in_channels, self.image_size))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


def resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64, image_size: int = 32) -> ResNet18:
    """CIFAR-variant ResNet-18 (``width`` = channels of the first stage)."""
    return ResNet18(int(num_classes), int(in_channels), int(width), int(image_size))


# ---------------------------------------------------------------------- wrn
class WideBlock(nn.Module):
    """Pre-activation wide block: BN-ReLU-conv3x3-(dropout)-BN-ReLU-conv3x3 + shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = None if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        o = torch.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(o)
        out = self.conv1(o)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        return out + skip


class WideResNet(nn.Module):
    """WRN-D-W (Zagoruyko & Komodakis 2016), CIFAR style: 3 groups of (D-4)/6 blocks,
    widths 16W, 32W, 64W, final BN-ReLU, global average pool, Linear."""

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int, image_size: int, dropout: float):
        super().__init__()
        n = (depth - 4) // 6
        self.in_channels, self.image_size = in_channels, image_size
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        groups, cin = [], 16
        for i, stride in enumerate((1, 2, 2)):
            cout = 16 * 2 ** i * widen
            groups.append(nn.Sequential(*[WideBlock(cin if b == 0 else cout, cout, stride if b == 0 else 1, dropout)
                                          for b in range(n)]))
            cin = cout
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(as_image(x, self.in_channels, self.image_size))
        out = torch.relu(self.bn(self.block3(self.block2(self.block1(out)))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


def wrn(depth: int = 16, widen: int = 4, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
        dropout: float = 0.0) -> WideResNet:
    """Wide ResNet; ``depth`` must be 6n + 4 (e.g. 16, 22, 28); ``wrn-16-4`` sets depth and widen."""
    depth, widen = int(depth), int(widen)
    if depth < 10 or (depth - 4) % 6:
        raise SpecError(f"wrn depth must be 6n+4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
    if widen < 1:
        raise SpecError(f"wrn width must be >= 1, got {widen}")
    return WideResNet(depth, widen, int(num_classes), int(in_channels), int(image_size), float(dropout))


# ------------------------------------------------------------ linear models
class LinearNet(nn.Linear):
    """``nn.Linear`` on flattened inputs (parameters ``weight [out, d]``, ``bias``)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.reshape(x.shape[0], -1))

    def end_to_end_coefficients(self, params: dict[str, Tensor]) -> Tensor:
        """``β [d]``: the weight row when ``out_dim = 1``, else the column norms ``||W[:, j]||``."""
        w = _leaf_param(params, "weight")
        return w[0] if w.shape[0] == 1 else w.norm(dim=0)


def linear(in_dim: int = 64, out_dim: int = 10, bias: bool = True) -> LinearNet:
    """A linear model ``f(x) = W x + b``."""
    return LinearNet(int(in_dim), int(out_dim), bias=bool(bias))


class DiagLinear(nn.Module):
    """Depth-2 diagonal linear net ``f(x) = <u ⊙ v, x>`` (output ``[N, 1]``).

    Initialised at scale ``alpha``: ``u = v = alpha · 1`` (so ``β = u ⊙ v = alpha² · 1``);
    the init does not depend on the random seed.
    """

    def __init__(self, in_dim: int, alpha: float):
        super().__init__()
        self.u = nn.Parameter(torch.full((in_dim,), float(alpha)))
        self.v = nn.Parameter(torch.full((in_dim,), float(alpha)))

    def forward(self, x: Tensor) -> Tensor:
        return (x.reshape(x.shape[0], -1) * (self.u * self.v)).sum(-1, keepdim=True)

    def end_to_end_coefficients(self, params: dict[str, Tensor]) -> Tensor:
        """``β = u ⊙ v`` (``[d]``)."""
        return _leaf_param(params, "u") * _leaf_param(params, "v")


def diag_linear(in_dim: int = 10, alpha: float = 0.1) -> DiagLinear:
    """Diagonal linear net of init scale ``alpha`` (``u = v = alpha``)."""
    return DiagLinear(int(in_dim), float(alpha))


def _leaf_param(params: dict[str, Tensor], leaf: str) -> Tensor:
    for name, t in params.items():
        if name.rsplit(".", 1)[-1] == leaf:
            return t
    raise KeyError(f"no parameter named {leaf!r} in {sorted(params)}")


ZOO: dict[str, Callable[..., nn.Module]] = {name: globals()[name.replace("-", "_")] for name in catalog.ZOO}


# -------------------------------------------------------------- factories
_FILE_MODULES: dict[tuple[str, float], Any] = {}


def _import_file(path: Path) -> Any:
    """Import a Python file by path (cached per path and modification time)."""
    key = (str(path.resolve()), path.stat().st_mtime)
    if key in _FILE_MODULES:
        return _FILE_MODULES[key]
    name = "sam_probe_user_" + hashlib.sha1(key[0].encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SpecError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's file failed: say so in one line
        sys.modules.pop(name, None)
        raise SpecError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    _FILE_MODULES[key] = module
    return module


def is_factory_spec(spec: str) -> bool:
    """``pkg.module:factory`` or ``path/to/file.py:factory``."""
    if ":" not in spec:
        return False
    left, right = spec.rsplit(":", 1)
    if not right.isidentifier() or not left:
        return False
    return left.endswith(".py") or all(part.isidentifier() for part in left.split("."))


def import_factory(spec: str, what: str = "model") -> Callable[..., Any]:
    """The callable named by ``pkg.module:factory`` or ``path/to/file.py:factory``."""
    left, attr = spec.rsplit(":", 1)
    if left.endswith(".py"):
        path = Path(left).expanduser()
        if not path.is_file():
            raise SpecError(f"--{what} {spec}: file {left} not found; give an existing path/to/file.py:factory")
        module = _import_file(path)
    else:
        try:
            module = importlib.import_module(left)
        except ImportError as exc:
            raise SpecError(f"--{what} {spec}: cannot import module {left!r} ({exc}); "
                            "install it or use path/to/file.py:factory") from None
        except Exception as exc:
            raise SpecError(f"--{what} {spec}: importing {left!r} failed: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, attr, None)
    if fn is None:
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise SpecError(f"--{what} {spec}: {left} has no {attr!r}{suggest(attr, names)}")
    if not callable(fn):
        raise SpecError(f"--{what} {spec}: {left}.{attr} is not callable")
    return fn


def factory_for(spec: str) -> Callable[..., nn.Module]:
    """The factory of a model spec (zoo name, ``wrn-D-W``, or user factory)."""
    if spec in ZOO:
        return ZOO[spec]
    m = WRN_PATTERN.match(spec)
    if m:
        return functools.partial(wrn, depth=int(m.group(1)), widen=int(m.group(2)))
    if is_factory_spec(spec):
        return import_factory(spec, "model")
    names = [*ZOO, "wrn-16-4", "wrn-28-10"]
    raise SpecError(f"--model {spec}: unknown model{suggest(spec, names)}; use one of {', '.join(ZOO)}, "
                    "wrn-D-W, package.module:factory or path/to/file.py:factory")


def is_builtin_model(spec: str) -> bool:
    """Zoo names, ``wrn-D-W`` and ``hf`` / ``hf:ClassName`` (a transformers class from the config.json
    beside the weights, never remote code): models a checkpoint may name, since they run no code
    of its choosing."""
    from .hf import is_hf_spec

    return spec in ZOO or bool(WRN_PATTERN.match(spec)) or is_hf_spec(spec)


def check_args(fn: Callable[..., Any], args: dict[str, Any], label: str, strict: bool = False) -> None:
    """SpecError when ``args`` do not fit ``fn``'s signature (naming the accepted args).

    ``strict`` (arguments chosen by a checkpoint): a factory taking ``**kwargs`` accepts
    only its named arguments, never a passthrough."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        if strict and args:
            raise SpecError(f"{label}: cannot check the saved arguments against the factory; pass --model-arg") from None
        return
    params = sig.parameters
    if not strict and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items()
                if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    unknown = [k for k in args if k not in accepted]
    if unknown:
        k = unknown[0]
        raise SpecError(f"{label}: unknown argument {k!r}{suggest(k, accepted)}; "
                        f"accepted: {', '.join(accepted) or '(none)'}")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in args
               and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    if missing:
        raise SpecError(f"{label}: missing argument(s) {', '.join(missing)}; pass them as key=value")


def build_model(spec: str, args: dict[str, Any] | None = None, strict: bool = False,
                expected_numel: int | None = None, budget: Any = None) -> nn.Module:
    """Build the model of ``spec`` with keyword ``args`` (see module docstring).

    Seed with ``torch.manual_seed`` before calling for a reproducible init.
    ``strict``: the arguments came from a checkpoint (see :func:`check_args`).
    ``budget`` (a :class:`~.bounded_build.Budget`, or only ``expected_numel``): what the weights hold;
    a zoo model is then first built on the meta device and refused when it cannot fit them
    (a checkpoint's ``hidden=[25000, 25000]`` never allocates).  User factories are called once.
    """
    from .bounded_build import Budget, TooLarge, meta_build

    args = dict(args or {})
    fn = factory_for(spec)
    check_args(fn, args, f"--model {spec}", strict=strict)
    if budget is None and expected_numel is not None:
        budget = Budget.from_numel(expected_numel)
    if budget is not None and is_builtin_model(spec):
        try:
            meta_build(lambda: fn(**args), budget)
        except TooLarge as exc:
            shown = ", ".join(f"{k}={str(v)[:40]}" for k, v in args.items()) or "its defaults"
            raise CheckpointError(f"--model {spec} with {shown} describes {exc}, but the weights hold "
                                  f"{budget.numel:,} parameters in {budget.tensors:,} tensors; the model arguments "
                                  "and the weights do not belong together") from None
        except SpecError:
            raise
        except (TypeError, ValueError) as exc:
            raise SpecError(f"--model {spec}: building it with {args} failed: {exc}") from exc
    try:
        model = fn(**args)
    except SpecError:
        raise
    except (TypeError, ValueError) as exc:
        raise SpecError(f"--model {spec}: building it with {args} failed: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise SpecError(f"--model {spec}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


# -------------------------------------------------------------- key=value
from .kv import parse_kv, parse_value  # noqa: E402,F401 - torch-free, re-exported
